"""`georeg serve` as a long-running service, over real sockets and processes: what an over-limit client
reads, and what a SIGTERM leaves behind (in the journal, and in the process table)."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from georeg.events import EVENTS_MEDIA_TYPE
from georeg.state import StateStore
from tests.conftest import RegistryPair
from tests.support.images import Image, Pusher, build_image
from tests.support.proxy import FaultProxy
from tests.support.services import GeoregServe, answers, clean_environment, descendants, wait_until
from tests.test_serve import SECRET, write_georeg_config

PATH = "/api/v4/container_registry_event/events"
MAX_BODY = 1024 * 1024  # notifications.max_body_bytes's default
OVERSIZED = 3 * 1000 * 1000  # over the limit, within what the receiver reads and discards
ATTEMPTS = 20


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GeoregServe]:
    """A receiver that never needs Prefect: deployment dispatch with an empty journal asks it nothing."""
    root = tmp_path_factory.mktemp("receiver")
    config = write_georeg_config(root / "georeg.yaml", "http://127.0.0.1:1", "http://127.0.0.1:2", mode="deployment")
    environment = clean_environment(PREFECT_API_URL="http://127.0.0.1:1/api")
    with GeoregServe(config, root / "serve.log", environment) as serve:
        yield serve


def post_with_http_client(port: int, body: bytes) -> int | str:
    """What a plain standard-library client reads back: the status, or the error it got instead."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(
            "POST", PATH, body=body, headers={"Authorization": SECRET, "Content-Type": EVENTS_MEDIA_TYPE}
        )
        return connection.getresponse().status
    except OSError as error:
        return type(error).__name__
    finally:
        connection.close()


def post_with_urllib(port: int, body: bytes) -> int | str:
    """urllib.request, which asks for `Connection: close`: the server then closes right after its answer."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{PATH}",
        data=body,
        headers={"Authorization": SECRET, "Content-Type": EVENTS_MEDIA_TYPE},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except (OSError, urllib.error.URLError) as error:
        return type(error).__name__


def post_slowly(port: int, size: int, *, chunked: bool, close: bool = True) -> int | str:
    """A raw client that sends its body in small pieces with pauses, as a slow network delivers it."""
    head = f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {SECRET}\r\n"
    head += "Connection: close\r\n" if close else ""
    head += f"Content-Type: {EVENTS_MEDIA_TYPE}\r\n"
    head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {size}\r\n\r\n"
    piece = b"[" * 64 * 1024
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            client.sendall(head.encode())
            sent = 0
            while sent < size:
                client.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                sent += len(piece)
                time.sleep(0.002)  # the pacing is the point of this client, not a synchronisation
            if chunked:
                client.sendall(b"0\r\n\r\n")
            answer = b""
            while b"\r\n" not in answer:
                data = client.recv(4096)
                if not data:
                    return "closed without an answer"
                answer += data
            return int(answer.split(b" ", 2)[1])
    except OSError as error:
        return type(error).__name__


@pytest.mark.parametrize("client", [post_with_http_client, post_with_urllib], ids=["http.client", "urllib"])
def test_an_oversized_body_from_a_standard_client_always_reads_413(
    receiver: GeoregServe, client: Callable[[int, bytes], int | str]
):
    body = b"[" * OVERSIZED

    outcomes = [client(receiver.port, body) for _ in range(ATTEMPTS)]

    assert outcomes == [413] * ATTEMPTS


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_oversized_body_sent_slowly_always_reads_413(receiver: GeoregServe, chunked: bool):
    outcomes = [post_slowly(receiver.port, 2 * MAX_BODY, chunked=chunked) for _ in range(ATTEMPTS)]

    assert outcomes == [413] * ATTEMPTS


def test_a_client_that_expects_100_continue_gets_the_413_before_sending_its_body(receiver: GeoregServe):
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {SECRET}\r\n"
        f"Content-Type: {EVENTS_MEDIA_TYPE}\r\nContent-Length: {OVERSIZED}\r\nExpect: 100-continue\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as client:
        client.sendall(head.encode())
        status_line = client.recv(4096).split(b"\r\n", 1)[0]

    assert status_line == b"HTTP/1.1 413 Request Entity Too Large"


GRACE = 10.0


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting for its parent counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def push_event(repository: str, image: Image) -> dict[str, object]:
    target = {"mediaType": image.media_type, "repository": repository, "digest": image.digest, "tag": "v1"}
    return {"id": f"push-{repository}", "action": "push", "target": target}


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_lets_runs_finish_puts_the_rest_back_and_leaves_no_process(
    registry_pair: RegistryPair, tmp_path: Path, repo_name: str, stop_signal: signal.Signals
):
    finishing, unfinished = build_image("oci"), build_image("oci")
    repo_done, repo_left = f"{repo_name}-done", f"{repo_name}-left"
    with Pusher(registry_pair.primary.url) as pusher:
        pusher.push_image(repo_done, finishing, "v1")
        pusher.push_image(repo_left, unfinished, "v1")
    with FaultProxy(registry_pair.primary.url) as slow_primary:
        held_done = slow_primary.hold(f"^/v2/{repo_done}/manifests/")
        held_left = slow_primary.hold(f"^/v2/{repo_left}/manifests/")
        config = write_georeg_config(
            tmp_path / "georeg.yaml", slow_primary.url, registry_pair.secondary.url, shutdown_grace_seconds=GRACE
        )
        # No PREFECT_API_URL: Prefect starts its temporary server, a child process of georeg serve.
        environment = clean_environment(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_LOGGING_LEVEL="INFO")
        with GeoregServe(config, tmp_path / "serve.log", environment, ready_deadline=240) as serve:
            assert serve.process is not None
            body = json.dumps({"events": [push_event(repo_done, finishing), push_event(repo_left, unfinished)]})
            posted = httpx.post(
                f"{serve.url}{PATH}",
                content=body,
                headers={"Authorization": SECRET, "Content-Type": EVENTS_MEDIA_TYPE},
            )
            assert posted.json()["new"] == 2
            wait_until(
                lambda: held_done.waiting > 0 and held_left.waiting > 0, deadline=60, what="both runs to be in flight"
            )
            children = descendants(serve.process.pid)
            assert children, "Prefect's temporary server should run below georeg serve"

            serve.process.send_signal(stop_signal)
            stopped_at = time.monotonic()
            wait_until(lambda: not answers(f"{serve.url}/healthz")(), deadline=10, what="serve to stop accepting")
            held_done.release()  # this run finishes during the grace period; the other never does
            code = serve.process.wait(timeout=GRACE + 60)
            took = time.monotonic() - stopped_at

    assert code == 0, serve.log_tail()
    assert SECRET not in serve.log_path.read_text()  # the notification secret never reaches the log
    assert GRACE - 1 < took < GRACE + 30  # it waited for the held run, then gave up on it
    assert [pid for pid in children if alive(pid)] == [], "processes left behind"
    with Pusher(registry_pair.secondary.url) as secondary:
        assert secondary.head_manifest(repo_done, "v1") == finishing.digest
        assert secondary.head_manifest(repo_left, "v1") is None

    async def journal() -> tuple[list[str], list[str]]:
        store = StateStore(f"sqlite:///{tmp_path / 'georeg.db'}")
        try:
            running = [claim.repository for claim in await store.journal.running()]
            due = [claim.repository for claim in await store.journal.claim_due(10)]  # pending, and due at once
            return running, due
        finally:
            await store.close()

    assert asyncio.run(journal()) == ([], [repo_left])
