"""`georeg serve` as a long-running service, over real sockets: what an over-limit client reads."""

from __future__ import annotations

import http.client
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from georeg.events import EVENTS_MEDIA_TYPE
from tests.support.services import GeoregServe, clean_environment
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
