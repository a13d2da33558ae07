"""Scaled out on Prefect, for real: PostgreSQL behind a Prefect server and behind georeg's state, two
`prefect worker` processes on the `georeg` pool, a per-registry copy limit, and no secret in any log,
parameter or artifact."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from georeg.limits import RegistryPause
from georeg.state import StateStore
from tests.support.images import Pusher, build_image, random_blob
from tests.support.postgres import PostgresServer
from tests.support.proxy import FaultProxy
from tests.support.registry import RegistryProcess, make_token_auth_setup
from tests.support.services import (
    BackgroundProcess,
    PrefectServer,
    PrefectWorker,
    clean_environment,
    deploy_georeg,
    prefect_cli,
    wait_until,
)

PASSWORD = f"basic-password-{uuid.uuid4().hex}"
NOTIFICATION_SECRET = f"notification-secret-{uuid.uuid4().hex}"
COPY_LIMIT = 2
# A 429 pauses the primary this long; PAUSE_LAG is how late after the look interval a worker may still
# send: the pause is committed, looked up and a request sent by a dozen processes on two cores, where
# a database round trip or a request already past its check can take seconds (4.1 s once in CI).
# Every worker must still be silent for the 5.9 s between.
PAUSE_SECONDS = 12
PAUSE_LAG = 5.0


@dataclass
class Cluster:
    root: Path
    primary: RegistryProcess
    secondary: RegistryProcess
    primary_proxy: FaultProxy
    secondary_proxy: FaultProxy
    server: PrefectServer
    workers: list[PrefectWorker]
    environment: dict[str, str]
    state_url: str
    key_path: Path

    def run_backfill(self) -> str:
        """Run the backfill deployment on the workers and wait for it; the CLI's output."""
        return prefect_cli(
            self.environment, "deployment", "run", "backfill/backfill", "--watch", "--watch-timeout", "600"
        )

    def batch_workers(self) -> set[str]:
        """Which workers ran the batches (each batch records its worker's host and pid)."""

        async def read() -> list[dict[str, Any]]:
            store = StateStore(self.state_url)
            try:
                return await store.runs.summaries("backfill-batch", "secondary")
            finally:
                await store.close()

        return {summary["worker"] for summary in asyncio.run(read())}

    def paused_until(self, registry: str) -> float:
        async def read() -> float:
            store = StateStore(self.state_url)
            try:
                return await store.pauses.paused_until(registry)
            finally:
                await store.close()

        return asyncio.run(read())

    def repository_states(self) -> dict[str, str]:
        async def read() -> dict[str, str]:
            store = StateStore(self.state_url)
            try:
                return {name: row.state for name, row in (await store.sync.repository_states("secondary")).items()}
            finally:
                await store.close()

        return asyncio.run(read())


@pytest.fixture(scope="module")
def cluster(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("scale-out")
    prefect_db, georeg_db = (
        postgres.create_database(f"{name}_{uuid.uuid4().hex[:6]}") for name in ("prefect", "georeg")
    )
    keys = make_token_auth_setup(root / "keys")
    with (
        PrefectServer(
            root / "prefect-home", database_url=postgres.url(prefect_db.rsplit("/", 1)[1], "asyncpg")
        ) as server,
        RegistryProcess(root / "primary") as primary,
        RegistryProcess(root / "secondary") as secondary,
        FaultProxy(primary.url) as primary_proxy,
        FaultProxy(secondary.url) as secondary_proxy,
    ):
        config = root / "georeg.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    # These registries run without auth and ignore credentials; georeg still sends them, so the
                    # password and minted tokens travel, which is what the secret check below needs.
                    "primary": {
                        "url": primary_proxy.url,
                        "auth": {"type": "basic", "username": "georeg", "password": PASSWORD},
                    },
                    "secondaries": [
                        {
                            "name": "secondary",
                            "url": secondary_proxy.url,
                            "max_concurrent_copies": COPY_LIMIT,
                            "auth": {
                                "type": "jwt",
                                "key_file": str(keys.key_path),
                                "issuer": keys.issuer,
                                "service": keys.service,
                            },
                        }
                    ],
                    "notifications": {"secret": NOTIFICATION_SECRET},
                    "state": {"url": georeg_db},
                    "replication": {
                        "concurrency": 4,
                        "retry_backoff_base_seconds": 0,
                        "chunk_size": 262_144,
                        "monolithic_max": 65_536,
                    },
                    # A lease short enough for the kill test not to wait long for the dead worker's batches.
                    "backfill": {"batch_size": 8, "lease_seconds": 20},
                }
            )
        )
        environment = clean_environment(
            PREFECT_API_URL=server.api_url,
            PREFECT_HOME=str(root / "prefect-home"),
            GEOREG_CONFIG=str(config),
        )
        deploy_georeg(environment)
        limits = subprocess.run(
            [sys.executable, "-m", "georeg.cli", "limits"], env=environment, capture_output=True, text=True, timeout=120
        )
        assert limits.returncode == 0 and f"georeg-copies-127.0.0.1-{secondary_proxy.port}: 2" in limits.stdout
        workers = [
            PrefectWorker(root / f"{name}.log", environment, name=name, limit=2).start()
            for name in ("worker-1", "worker-2")
        ]
        try:
            yield Cluster(
                root,
                primary,
                secondary,
                primary_proxy,
                secondary_proxy,
                server,
                workers,
                environment,
                georeg_db,
                keys.key_path,
            )
        finally:
            for worker in workers:
                worker.stop()


def populate(cluster: Cluster, prefix: str, count: int, layer_size: int) -> dict[str, str]:
    images = {}
    with Pusher(cluster.primary.url) as pusher:
        for number in range(count):
            image = build_image("oci", layers=[random_blob(layer_size), random_blob(layer_size)])
            pusher.push_image(f"{prefix}/app{number}", image, "v1")
            images[f"{prefix}/app{number}"] = image.digest
    return images


def assert_replicated(cluster: Cluster, images: dict[str, str]) -> None:
    with Pusher(cluster.secondary.url) as secondary:
        assert {name: secondary.head_manifest(name, "v1") for name in images} == images


def assert_no_broken_manifest(cluster: Cluster, repositories: list[str]) -> None:
    """Every manifest the secondary serves has all its blobs: a crash never leaves half an image."""
    with Pusher(cluster.secondary.url) as secondary:
        for repository in repositories:
            for tag in secondary.tags(repository):
                content, _ = secondary.get_manifest(repository, tag)
                document = yaml.safe_load(content)
                for blob in [document["config"], *document["layers"]]:
                    assert secondary.blob_exists(repository, blob["digest"]), f"{repository}:{tag} lacks a blob"


def test_a_backfill_is_shared_by_two_workers_within_the_copy_limit(cluster: Cluster):
    images = populate(cluster, "fleet", 40, 20_000)
    cluster.secondary_proxy.clear()

    output = cluster.run_backfill()

    assert "Completed" in output, output
    assert_replicated(cluster, images)
    assert_no_broken_manifest(cluster, list(images))
    assert len(cluster.batch_workers()) == 2  # both workers took batches
    assert 1 <= cluster.secondary_proxy.max_concurrent_transfers <= COPY_LIMIT


def test_a_429_from_the_primary_pauses_every_worker(cluster: Cluster):
    images = populate(cluster, "throttled", 16, 20_000)
    cluster.primary_proxy.clear()
    cluster.primary_proxy.add_fault(
        "GET", r"^/v2/throttled/.+/manifests/", status=429, times=1, headers={"Retry-After": str(PAUSE_SECONDS)}
    )

    output = cluster.run_backfill()

    assert "Completed" in output, output
    assert_replicated(cluster, images)
    requests = cluster.primary_proxy.requests
    [told] = [request for request in requests if request.status == 429]
    # The pause every worker shares, as the told worker wrote it: PAUSE_SECONDS from when it read the answer.
    until = cluster.paused_until(f"georeg-pause-127.0.0.1-{cluster.primary_proxy.port}")
    assert told.arrived_at + PAUSE_SECONDS <= until < told.arrived_at + PAUSE_SECONDS + 30
    # Another worker may have looked for pauses just before the pause was committed; it learns of it at its
    # next look, a second later. PAUSE_LAG allows for the commit, the look and the send on a loaded machine.
    paused = (until - PAUSE_SECONDS + RegistryPause.REFRESH_SECONDS + PAUSE_LAG, until - 0.1)
    during = [(r.path, round(r.arrived_at - until, 2)) for r in requests if paused[0] < r.arrived_at < paused[1]]
    assert during == [], f"requests (path, seconds before the pause ended) while every worker should wait: {during}"
    assert [r for r in requests if r.arrived_at >= paused[1]]  # and then the backfill went on


def test_a_worker_killed_mid_copy_loses_nothing(cluster: Cluster):
    images = populate(cluster, "crash", 32, 300_000)
    cluster.secondary_proxy.clear()
    backfill = BackgroundProcess(
        [sys.executable, "-m", "prefect", "deployment", "run", "backfill/backfill", "--watch"],
        cluster.root / "crash-backfill.log",
        cluster.environment,
    ).start()
    victim: PrefectWorker | None = None
    try:
        victim = wait_for_a_batch_mid_copy(cluster, deadline=240)
        victim.kill_with_descendants()  # the worker and its flow runs, as when its machine dies
        assert backfill.process is not None
        try:
            backfill.process.wait(timeout=600)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the backfill did not end within 600 s of the kill; its flow runs: {describe_runs(cluster)}")
    finally:
        backfill.stop()
        cancel_unfinished_runs(cluster)  # a backfill still waiting must not hold the next test's lease
        if victim is not None:
            victim.start()
    output = backfill.log_path.read_text()

    assert "Completed" in output, output
    crashed = [run for run in flow_runs(cluster, "backfill-batch") if run.state.is_crashed()]
    assert any((run.state.message or "").startswith("georeg: its worker") for run in crashed), crashed
    assert_replicated(cluster, images)
    assert_no_broken_manifest(cluster, list(images))
    states = cluster.repository_states()
    assert {states[name] for name in images} == {"synced"}


def wait_for_a_batch_mid_copy(cluster: Cluster, deadline: float) -> PrefectWorker:
    """The worker running a batch (and not the backfill that waits for it) once that batch's first upload
    has reached the secondary."""
    found: list[PrefectWorker] = []

    def mid_copy() -> bool:
        uploading = {
            r.path.removeprefix("/v2/").split("/blobs/uploads/")[0]
            for r in cluster.secondary_proxy.requests
            if "/blobs/uploads/" in r.path
        }
        batches = {str(run.id): run for run in flow_runs(cluster, "backfill-batch") if run.state.is_running()}
        backfills = {str(run.id) for run in flow_runs(cluster, "backfill")}
        for worker in cluster.workers:
            ids = worker.running_flow_runs()
            if ids & backfills:
                continue  # this worker runs the backfill itself: the one to keep
            if any(set(batches[i].parameters["repositories"]) & uploading for i in ids & batches.keys()):
                found.append(worker)
                return True
        return False

    wait_until(mid_copy, deadline=deadline, what="a batch flow run copying on a worker of its own", interval=0.2)
    return found[-1]


def describe_runs(cluster: Cluster) -> str:
    runs = flow_runs(cluster, "backfill", "backfill-batch")
    return "; ".join(
        f"{run.name} {run.state.type.value if run.state else '-'} {run.state.timestamp if run.state else ''} "
        f"{(run.state.message or '') if run.state else ''}".strip()
        for run in runs
    )


def cancel_unfinished_runs(cluster: Cluster) -> None:
    from prefect.client.orchestration import PrefectClient
    from prefect.states import Cancelling

    unfinished = [
        run.id for run in flow_runs(cluster, "backfill", "backfill-batch") if run.state and not run.state.is_final()
    ]

    async def cancel() -> None:
        async with PrefectClient(cluster.server.api_url) as client:
            for run_id in unfinished:
                await client.set_flow_run_state(run_id, Cancelling(), force=True)

    asyncio.run(cancel())


def flow_runs(cluster: Cluster, *flows: str) -> list[Any]:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    async def read() -> list[Any]:
        async with PrefectClient(cluster.server.api_url) as client:
            return await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=list(flows))))

    return asyncio.run(read())


def test_no_secret_reaches_a_log_a_parameter_or_an_artifact(cluster: Cluster):
    from prefect.client.orchestration import PrefectClient

    # Records of this test's own: a backfill through the workers, with tokens minted and artifacts made.
    images = populate(cluster, "secrets", 3, 1000)
    assert "Completed" in cluster.run_backfill()
    assert_replicated(cluster, images)

    async def prefect_records() -> str:
        async with PrefectClient(cluster.server.api_url) as client:
            runs = await _every(client.read_flow_runs)
            logs = await _every(client.read_logs)
            artifacts = await _every(client.read_artifacts)
        return "\n".join(
            [repr(run.parameters) for run in runs]
            + [log.message for log in logs]
            + [repr(artifact.data) + repr(artifact.description) for artifact in artifacts]
        )

    files = [path for path in cluster.root.rglob("*.log")] + list(cluster.root.rglob("*.yml"))
    text = asyncio.run(prefect_records()) + "\n".join(
        path.read_text(errors="replace") for path in files if path.name != "georeg.yaml"
    )
    assert len(text) > 10_000  # there is something to search
    key_body = cluster.key_path.read_text().splitlines()[1]
    for secret in (PASSWORD, NOTIFICATION_SECRET, key_body, "eyJhbGciOi"):  # the last: any JWT
        assert secret not in text


async def _every(read: Any, page: int = 200) -> list[Any]:
    """All records of a Prefect API listing (it answers at most 200 at a time)."""
    found: list[Any] = []
    while batch := await read(limit=page, offset=len(found)):
        found += batch
        if len(batch) < page:
            break
    return found


def test_a_batch_whose_worker_died_before_it_ran_is_ended_as_crashed(cluster: Cluster, monkeypatch: pytest.MonkeyPatch):
    """A worker killed between taking a batch (Pending) and starting it leaves the run Pending for ever:
    the backfill must not wait for it until `batch_timeout_seconds`."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Pending

    from georeg import batches
    from georeg.config import BackfillConfig

    monkeypatch.setattr(batches, "_STARTING_SECONDS", 1.0)

    async def orphan_and_wait() -> Any:
        async with get_client() as client:
            deployment = await client.read_deployment_by_name("backfill-batch/backfill-batch")
            # Created Pending, as a worker leaves it: no worker takes a Pending run (they poll Scheduled).
            orphan = await client.create_flow_run_from_deployment(
                deployment.id,
                parameters={"secondary": "secondary", "repositories": ["nowhere/app"], "dry_run": True},
                state=Pending(),
            )
        store = StateStore(cluster.state_url)
        try:
            await store.ensure_schema()
            started = asyncio.get_running_loop().time()
            settings = BackfillConfig(lease_seconds=5, batch_timeout_seconds=90)  # without the check: 90 s
            ended = await batches._batch_outcome(store, orphan.id, settings)
            return ended, asyncio.get_running_loop().time() - started
        finally:
            await store.close()

    with temporary_settings({PREFECT_API_URL: cluster.server.api_url}):
        ended, waited = asyncio.run(orphan_and_wait())

    assert ended.state.is_crashed()
    assert ended.state.message.startswith("georeg: it was still starting after"), ended.state.message
    assert waited < 60
