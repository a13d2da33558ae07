"""End to end, inline dispatch: a real registry's notifications reach a real `georeg serve`, which
replicates to a real secondary. The registry's notifications block is the one in deployments/."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.images import Pusher, build_image, build_index
from tests.support.registry import RegistryProcess, free_port
from tests.support.services import REPOSITORY_ROOT, GeoregServe, clean_environment, wait_until

SECRET = "e2e-notification-secret"


def deployments_notifications(receiver_url: str, secret: str) -> list[dict[str, Any]]:
    """deployments/registry-primary.yml's endpoint, pointed at this test's receiver and secret."""
    config = yaml.safe_load((REPOSITORY_ROOT / "deployments" / "registry-primary.yml").read_text())
    [endpoint] = config["notifications"]["endpoints"]
    endpoint["url"] = f"{receiver_url}/api/v4/container_registry_event/events"
    endpoint["headers"]["Authorization"] = [secret]
    return [endpoint]


@dataclass
class Site:
    primary: RegistryProcess
    secondary: RegistryProcess
    receiver: GeoregServe
    prefect_api_url: str

    def pusher(self) -> Pusher:
        return Pusher(self.primary.url)

    def secondary_digest(self, repository: str, reference: str) -> str | None:
        with Pusher(self.secondary.url) as secondary:
            return secondary.head_manifest(repository, reference)

    def wait_replicated(self, repository: str, reference: str, digest: str, deadline: float = 60) -> None:
        wait_until(
            lambda: self.secondary_digest(repository, reference) == digest,
            deadline=deadline,
            what=f"{repository}:{reference} to reach the secondary as {digest}",
        )

    def flow_runs_named(self, name: str) -> int:
        """How many flow runs Prefect recorded under `name` (e.g. 'replicate group/app:1.0')."""
        import asyncio

        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

        async def count() -> int:
            async with get_client() as client:
                runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
                return len(runs)

        return asyncio.run(count())

    def batched_images(self, repository_prefix: str) -> list[int]:
        """How many images each `replicate-images` run of these repositories took."""
        import asyncio

        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName

        async def read() -> list[int]:
            async with get_client() as client:
                runs = await client.read_flow_runs(
                    flow_filter=FlowFilter(name=FlowFilterName(any_=["replicate-images"]))
                )
            items = [run.parameters["items"] for run in runs]
            return [len(batch) for batch in items if batch[0]["repository"].startswith(repository_prefix)]

        return asyncio.run(read())

    def journal_depth(self) -> int:
        metrics = httpx.get(f"{self.receiver.url}/metrics").text
        return int(
            float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("georeg_journal_depth ")))
        )


def write_georeg_config(path: Path, primary: str, secondary: str, **dispatch: Any) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "primary": {"url": primary},
                "secondaries": [{"name": "secondary", "url": secondary}],
                "notifications": {"secret": SECRET},
                "state": {"url": f"sqlite:///{path.parent / 'georeg.db'}"},
                "dispatch": {"mode": "inline", "poll_seconds": 0.5, **dispatch},
                "replication": {"retry_delay_seconds": 0.2},
            }
        )
    )
    return path


@contextlib.contextmanager
def running_site(root: Path, prefect_api_url: str, **dispatch: Any) -> Iterator[Site]:
    receiver_port = free_port()
    receiver_url = f"http://127.0.0.1:{receiver_port}"
    with (
        RegistryProcess(root / "primary", notifications=deployments_notifications(receiver_url, SECRET)) as primary,
        RegistryProcess(root / "secondary") as secondary,
    ):
        config = write_georeg_config(root / "georeg.yaml", primary.url, secondary.url, **dispatch)
        environment = clean_environment(PREFECT_API_URL=prefect_api_url, PREFECT_LOGGING_LEVEL="INFO")
        with GeoregServe(config, root / "serve.log", environment, port=receiver_port) as receiver:
            yield Site(primary, secondary, receiver, prefect_api_url)


@pytest.fixture
def site(tmp_path: Path, prefect_api_url: str) -> Iterator[Site]:
    """A site of its own for every test: registries, journal and receiver start empty."""
    with running_site(tmp_path, prefect_api_url) as started:
        yield started


def test_a_push_reaches_the_secondary_within_seconds(site: Site, repo_name: str):
    image = build_image("docker")
    index = build_index([build_image("oci", platform=("linux", "arm64")), build_image("oci")], kind="oci")
    with site.pusher() as pusher:
        pusher.push_image(repo_name, image, "v1")
        pusher.push_image(repo_name, index, "multi")

    site.wait_replicated(repo_name, "v1", image.digest)
    site.wait_replicated(repo_name, "multi", index.digest)
    for child in index.children:
        assert site.secondary_digest(repo_name, child.digest) == child.digest


def test_a_delete_on_the_primary_reaches_the_secondary(site: Site, repo_name: str):
    image = build_image("oci")
    with site.pusher() as pusher:
        pusher.push_image(repo_name, image, "gone")
    site.wait_replicated(repo_name, "gone", image.digest)

    with site.pusher() as pusher:
        pusher.delete_manifest(repo_name, image.digest)

    wait_until(lambda: site.secondary_digest(repo_name, "gone") is None, deadline=60, what="the delete to arrive")


def test_a_burst_of_pushes_to_one_tag_is_coalesced(site: Site, repo_name: str):
    # Pushed while the receiver is down, the burst reaches it in one stream of redeliveries: the first
    # event starts a run, and the events that arrive while a run is in flight bump its work row, which
    # then runs once more. Each run covers every push that arrived before it, so there are as many runs
    # as the stream lasts runs, a few however slow the machine, never one per push.
    site.receiver.stop()
    images = [build_image("oci", layer_sizes=[100]) for _ in range(20)]
    with site.pusher() as pusher:
        for image in images:
            pusher.push_image(repo_name, image, "hot")
    site.receiver.start()

    site.wait_replicated(repo_name, "hot", images[-1].digest)
    wait_until(lambda: site.journal_depth() == 0, deadline=60, what="the work to be done")
    assert 1 <= site.flow_runs_named(f"replicate {repo_name}:hot") <= len(images) // 4


def test_events_sent_while_the_receiver_is_down_arrive_after_it_restarts(site: Site, repo_name: str):
    site.receiver.stop()
    image = build_image("docker")
    with site.pusher() as pusher:
        pusher.push_image(repo_name, image, "late")  # the registry queues the event and keeps retrying
    assert site.secondary_digest(repo_name, "late") is None

    site.receiver.start()

    site.wait_replicated(repo_name, "late", image.digest)
    assert site.flow_runs_named(f"replicate {repo_name}:late") == 1


def push_burst(site: Site, repositories: list[str], clients: int) -> dict[tuple[str, str], str]:
    """Images pushed by `clients` at once, each repository with two tags and every third one an index
    (its children pushed by digest just before it); returns (repository, tag) -> digest."""
    expected: dict[tuple[str, str], str] = {}
    work: list[tuple[str, str, Any]] = []
    for number, repository in enumerate(repositories):
        for tag in ("1.0", "latest"):
            if number % 3 == 0 and tag == "1.0":
                image = build_index([build_image("oci", platform=("linux", arch)) for arch in ("amd64", "arm64")])
            else:
                image = build_image("oci", layer_sizes=[200, 300])
            work.append((repository, tag, image))
            expected[(repository, tag)] = image.digest
    errors: list[BaseException] = []

    def push(share: list[tuple[str, str, Any]]) -> None:
        try:
            with site.pusher() as pusher:
                for repository, tag, image in share:
                    pusher.push_image(repository, image, tag)
        except BaseException as error:  # reported by the test, not lost in a thread
            errors.append(error)

    threads = [threading.Thread(target=push, args=(work[index::clients],)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return expected


def wait_all_replicated(site: Site, expected: dict[tuple[str, str], str], deadline: float = 120) -> None:
    def missing() -> list[tuple[str, str]]:
        return [key for key, digest in expected.items() if site.secondary_digest(*key) != digest]

    wait_until(lambda: not missing(), deadline=deadline, what="every image of the burst on the secondary")


def test_a_burst_from_several_clients_converges_in_shared_runs(tmp_path: Path, prefect_api_url: str, repo_name: str):
    # A long wait for a push by digest: the index behind it must cover it, however loaded the machine.
    with running_site(tmp_path, prefect_api_url, digest_push_delay_seconds=60) as site:
        repositories = [f"{repo_name}-{number}" for number in range(12)]
        moving: list[str] = []
        expected = push_burst(site, repositories, clients=4)
        with site.pusher() as pusher:  # meanwhile, one tag moves eight times: the last push must win
            for _ in range(8):
                image = build_image("oci", layer_sizes=[100])
                pusher.push_image(repositories[0], image, "moving")
                moving.append(image.digest)
        expected[(repositories[0], "moving")] = moving[-1]

        wait_all_replicated(site, expected)
        wait_until(lambda: site.journal_depth() == 0, deadline=60, what="the journal to empty")

        batches = site.batched_images(repo_name)
        assert batches and all(size > 1 for size in batches), "33 images, 4 runs at a time: runs must be shared"
        for number, repository in enumerate(repositories):
            if number % 3 == 0:
                with Pusher(site.primary.url) as primary:
                    content, _ = primary.get_manifest(repository, "1.0")
                for child in yaml.safe_load(content)["manifests"]:
                    assert site.secondary_digest(repository, child["digest"]) == child["digest"]
                    assert site.flow_runs_named(f"replicate {repository}:{child['digest']}") == 0


def test_a_push_by_digest_whose_index_never_comes_still_reaches_the_secondary(tmp_path: Path, prefect_api_url: str):
    # Pushes by digest wait for an index that would cover them; this one waits in vain and is replicated alone.
    with running_site(tmp_path, prefect_api_url, digest_push_delay_seconds=1) as site:
        image = build_image("oci", layer_sizes=[300])
        with site.pusher() as pusher:
            pusher.push_image("orphans/app", image)  # no tag, no index
        site.wait_replicated("orphans/app", image.digest, image.digest)
        assert site.flow_runs_named(f"replicate orphans/app:{image.digest}") == 1


def test_serve_restarted_mid_burst_loses_nothing(site: Site, repo_name: str):
    first = push_burst(site, [f"{repo_name}-a{number}" for number in range(6)], clients=3)
    site.receiver.stop()  # mid-burst: some of it replicated, some journaled, some still in the registry
    second = push_burst(site, [f"{repo_name}-b{number}" for number in range(6)], clients=3)
    site.receiver.start()

    wait_all_replicated(site, first | second)
