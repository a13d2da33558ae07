"""The `backfill` flow: make every repository on a secondary equal to the primary's, and record it.

Run as a deployment, a backfill shares its work: the due repositories are split into batches, each
a flow run of the `backfill-batch` deployment that any worker of the pool can take, on any machine.
Run anywhere else (the CLI, the embedded default) it does the same work in its own process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from uuid import UUID

from prefect import flow
from prefect.artifacts import acreate_table_artifact

from georeg.backfill import RepositorySync, RepositorySyncFailed
from georeg.config import BackfillConfig, GeoregConfig, ReplicationConfig, load_config
from georeg.errors import GeoregError, ReplicationError
from georeg.flows.common import for_each_secondary, open_state, run_holder
from georeg.progress import Progress, artifact_key
from georeg.registry import RegistryClient
from georeg.replication import bounded
from georeg.sharing import ModeDecision, decide_mode
from georeg.state import FAILED, STARTED, RepositoryState, StateStore
from georeg.storage_adapters import BlobInventory, StorageAdapter
from georeg.tasks import list_repositories_task, sync_repository_task, with_retry_settings

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

logger = logging.getLogger("georeg.backfill")
_BATCH_POLL_SECONDS = 1.0
# The counts a summary adds up over repositories (and a fanned-out backfill over its batches).
COUNTS = (
    "synced",
    "failed",
    "tags_replicated",
    "tags_confirmed",
    "tags_removed",
    "tags_unchanged",
    "bytes_copied",
    "bytes_skipped",
)


@flow(name="backfill")
async def backfill(secondary: str | None = None, dry_run: bool = False) -> list[dict[str, Any]]:
    """Bring each secondary level with the primary: copy what is missing or different, remove what
    the primary no longer has, and record each repository's sync state.

    Repositories that failed recently wait for their `retry_at`. Two backfills of one secondary never
    overlap: the second one finds the lease taken and ends without doing anything.

    Args:
        secondary: one secondary's name; all of them when omitted.
        dry_run: only report what would be copied and removed.
    """
    config = load_config()
    async with open_state(config) as store:

        async def backfill_one(primary: RegistryClient, target: RegistryClient) -> dict[str, Any]:
            return await _backfill_secondary(config, store, primary, target, dry_run)

        return await for_each_secondary(config, secondary, backfill_one, store=store)


@flow(name="backfill-batch", flow_run_name="backfill-batch {secondary}")
async def backfill_batch(secondary: str, repositories: list[str], dry_run: bool = False) -> dict[str, Any]:
    """One share of a backfill: sync these repositories of one secondary. Started by `backfill`."""
    from prefect.runtime import flow_run

    config = load_config()
    async with open_state(config) as store:
        # The lease says this batch is alive. A batch whose worker died would show Running in Prefect for
        # ever; the backfill waiting for it ends it as crashed once the lease runs out, and runs it again.
        # It is left to run out, not released: the backfill releases it once the run has ended.
        lease, holder, lease_seconds = batch_lease(str(flow_run.id)), str(flow_run.id), config.backfill.lease_seconds
        await store.acquire_lease(lease, holder, lease_seconds)
        keep_lease = asyncio.create_task(_renew(store, lease, holder, lease_seconds))

        async def sync(primary: RegistryClient, target: RegistryClient) -> dict[str, Any]:
            run_id = await store.run_started("backfill-batch", target.name)
            async with _replication_mode(config, target.name, dry_run) as mode:
                summary = await _sync_repositories(config, store, primary, target, repositories, dry_run, mode)
            # Which worker did this share (a process worker's flow runs are its children).
            summary.update(flow_run_id=str(flow_run.id), worker=f"{socket.gethostname()}:{os.getppid()}")
            await store.run_finished(run_id, "failed" if summary["failed"] else "completed", json.dumps(summary))
            return summary

        try:
            [summary] = await for_each_secondary(config, secondary, sync, store=store)
        finally:
            keep_lease.cancel()
    if summary["failed"]:
        raise ReplicationError(
            f"{summary['failed']} of {len(repositories)} repositories failed: " + "; ".join(summary["failures"])
        )
    return summary


async def _backfill_secondary(
    config: GeoregConfig, store: StateStore, primary: RegistryClient, target: RegistryClient, dry_run: bool
) -> dict[str, Any]:
    lease, holder, lease_seconds = f"backfill:{target.name}", run_holder(), config.backfill.lease_seconds
    if await store.acquire_lease(lease, holder, lease_seconds) is None:
        other = await store.lease_holder(lease)
        logger.warning("a backfill of %s is already running (%s); this one stops here", target.name, other)
        return {"secondary": target.name, "skipped": f"a backfill of {target.name} is already running ({other})"}
    keep_lease = asyncio.create_task(_renew(store, lease, holder, lease_seconds))
    run_id = None if dry_run else await store.run_started("backfill", target.name)
    try:
        settings = config.replication
        async with _replication_mode(config, target.name, dry_run) as mode:
            repositories, states = await asyncio.gather(
                with_retry_settings(list_repositories_task, settings)(
                    primary, target, settings, shared=mode.storage is not None
                ),
                store.repository_states(target.name),
            )
            due = [name for name in repositories if _due(states.get(name))]
            if not dry_run:
                for gone in set(states) - set(repositories):  # no longer on either side (or filtered out)
                    await store.forget_repository(target.name, gone)
            if _fans_out(config, len(due)):
                summary = await _fan_out(config, store, target.name, due, dry_run)
            else:
                summary = await _sync_repositories(config, store, primary, target, due, dry_run, mode)
        summary.update(repositories=len(repositories), deferred=len(repositories) - len(due))
        if run_id is not None:
            await store.run_finished(run_id, "failed" if summary["failed"] else "completed", json.dumps(summary))
            run_id = None
    finally:
        keep_lease.cancel()
        if run_id is not None:
            await store.run_finished(run_id, "crashed", "{}")
        await store.release_lease(lease, holder)
    if summary["failed"]:
        raise ReplicationError(
            f"{summary['failed']} of {summary['repositories']} repositories failed: " + "; ".join(summary["failures"])
        )
    return summary


async def _sync_repositories(
    config: GeoregConfig,
    store: StateStore,
    primary: RegistryClient,
    target: RegistryClient,
    repositories: list[str],
    dry_run: bool,
    mode: ModeDecision,
) -> dict[str, Any]:
    """Sync `repositories` concurrently, record each one's state, publish progress and a table."""
    progress = Progress(artifact_key("backfill", target.name), f"Backfill of {target.name}", len(repositories))
    recorder = None if dry_run else _StateRecorder(store, target.name, config.replication)
    starting = [progress.start()]  # independent round trips, to the Prefect API and the state database
    if not dry_run:
        starting.append(store.set_repository_states(target.name, repositories, state=STARTED))
    await asyncio.gather(*starting)

    async def sync(repository: str) -> RepositorySync:
        result = await _sync_one(config, primary, target, repository, dry_run, mode.storage)
        if recorder is not None:
            await recorder.record(result)
        await progress.advance()
        return result

    room = asyncio.Semaphore(config.replication.concurrency)
    try:
        results = await asyncio.gather(*(bounded(room, sync(name)) for name in repositories))
    finally:
        if recorder is not None:
            await asyncio.shield(recorder.flush())  # what was learned is kept, even when cancelled
    await acreate_table_artifact(
        table=[result.as_row() for result in results],
        key=artifact_key("backfill", target.name, "report"),
        description=f"{'Dry run of the b' if dry_run else 'B'}ackfill of {target.name} ({mode.mode.value} mode: "
        f"{mode.reason})",
    )
    failed = [result for result in results if not result.ok]
    return {
        "secondary": target.name,
        "mode": mode.mode.value,
        "dry_run": dry_run,
        "synced": len(results) - len(failed),
        "failed": len(failed),
        "failures": [f"{r.repository} ({r.failure_summary()})" for r in failed[:3]],
        "tags_replicated": sum(len(r.copied) for r in results),
        "tags_confirmed": sum(len(r.confirmed) for r in results),
        "tags_removed": sum(len(r.removed) for r in results),
        "tags_unchanged": sum(r.unchanged for r in results),
        "bytes_copied": sum(r.bytes_copied for r in results),
        "bytes_skipped": sum(r.bytes_skipped for r in results),
    }


@contextlib.asynccontextmanager
async def _replication_mode(config: GeoregConfig, secondary: str, dry_run: bool) -> AsyncIterator[ModeDecision]:
    """How `secondary` is replicated. In shared mode, blobs are confirmed from one listing of the storage
    (`BlobInventory`; a dry run confirms nothing), taken meanwhile with the storage client: the SDK's
    import and client cost half a second to a second, which the listing of the repositories hides
    instead of the first check waiting."""
    mode = decide_mode(config, config.select_secondaries(secondary)[0])
    if mode.storage is not None and not dry_run:
        mode = dataclasses.replace(mode, storage=BlobInventory(mode.storage))
    connecting = asyncio.create_task(_connect_ahead(mode.storage)) if mode.storage else None
    try:
        yield mode
    finally:
        if connecting is not None:
            await connecting


async def _connect_ahead(storage: StorageAdapter) -> None:
    # A failure here is the same as at the first real check, which reports it where it matters.
    with contextlib.suppress(Exception):
        await asyncio.to_thread(storage.connect)


def _fans_out(config: GeoregConfig, due: int) -> bool:
    """Only a backfill that runs as a deployment has a pool of workers to share with."""
    return config.backfill.fan_out and _deployment_id() is not None and due > config.backfill.batch_size


def _deployment_id() -> UUID | None:
    """The running flow run's deployment, from the run's context. Not `prefect.runtime.deployment.id`:
    for a flow run of no deployment, that one asks the API and blocks the event loop while it waits
    (0.3 s on a busy server), holding up every repository in flight."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return context.flow_run.deployment_id if context is not None and context.flow_run is not None else None


async def _fan_out(
    config: GeoregConfig, store: StateStore, secondary: str, due: list[str], dry_run: bool
) -> dict[str, Any]:
    """Run the batches as flow runs of the batch deployment and add up what they recorded."""
    from prefect.deployments.flow_runs import arun_deployment

    size = config.backfill.batch_size
    batches = [due[start : start + size] for start in range(0, len(due), size)]
    progress = Progress(
        artifact_key("backfill", secondary, "batches"), f"Backfill batches of {secondary}", len(batches)
    )
    await progress.start()

    async def run(batch: list[str]) -> Any:
        parameters = {"secondary": secondary, "repositories": batch, "dry_run": dry_run}
        for _ in range(2):  # a batch whose worker died (crashed) runs once more
            started = await arun_deployment(config.backfill.batch_deployment, parameters=parameters, timeout=0)
            flow_run = await _batch_outcome(store, started.id, config.backfill)
            if not (flow_run.state and flow_run.state.is_crashed()):
                break
            logger.warning("batch flow run %s crashed; running its %d repositories again", flow_run.id, len(batch))
        await progress.advance()
        return flow_run

    flow_runs = await asyncio.gather(*(run(batch) for batch in batches))
    recorded = {summary["flow_run_id"]: summary for summary in await store.run_summaries("backfill-batch", secondary)}
    summary: dict[str, Any] = {"secondary": secondary, "dry_run": dry_run, "failures": [], "workers": []}
    summary.update(dict.fromkeys(COUNTS, 0))
    for batch, flow_run in zip(batches, flow_runs, strict=True):
        part = recorded.get(str(flow_run.id))
        if part is None:  # it never got to record anything: crashed, or still "running" on a dead worker
            summary["failed"] += len(batch)
            state = flow_run.state.type.value if flow_run.state else "unknown"
            summary["failures"].append(f"batch flow run {flow_run.id} ({len(batch)} repositories) ended {state}")
            continue
        for count in COUNTS:
            summary[count] += part[count]
        summary["failures"] += part["failures"]
        summary["workers"].append(part["worker"])
        summary["mode"] = part["mode"]
    summary["failures"] = summary["failures"][:3]
    summary["workers"] = sorted(set(summary["workers"]))
    return summary


def batch_lease(flow_run_id: str) -> str:
    return f"backfill-batch:{flow_run_id}"


async def _batch_outcome(store: StateStore, flow_run_id: UUID, settings: BackfillConfig) -> FlowRun:
    """Wait for a batch flow run to end, and end it as crashed if it never will.

    A worker killed with its machine leaves its flow run Running (or Pending) in Prefect for ever. A batch
    renews its lease while it runs: one that has been Running for `lease_seconds` without a live lease
    has lost its worker. So has one still not finished after `batch_timeout_seconds`.
    """
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    deadline = time.time() + settings.batch_timeout_seconds
    async with get_client() as client:
        while True:
            flow_run = await client.read_flow_run(flow_run_id)
            state = flow_run.state
            if state is None or state.is_final():
                break
            why = None
            if time.time() > deadline:
                why = f"it did not finish within backfill.batch_timeout_seconds ({settings.batch_timeout_seconds:g} s)"
            elif (
                state.is_running()  # a worker that died before Running is caught by the timeout only
                and time.time() - state.timestamp.timestamp() > settings.lease_seconds
                and await store.lease_holder(batch_lease(str(flow_run_id))) is None
            ):
                why = f"its worker stopped renewing its lease for {settings.lease_seconds:g} s: it died"
            if why is not None:
                logger.warning("batch flow run %s ends as crashed: %s", flow_run_id, why)
                await client.set_flow_run_state(flow_run_id, Crashed(message=f"georeg: {why}"), force=True)
                flow_run = await client.read_flow_run(flow_run_id)
                break
            await asyncio.sleep(_BATCH_POLL_SECONDS)
    await store.release_lease(batch_lease(str(flow_run_id)), str(flow_run_id))
    return flow_run


async def _sync_one(
    config: GeoregConfig,
    primary: RegistryClient,
    target: RegistryClient,
    repository: str,
    dry_run: bool,
    shared_storage: StorageAdapter | None,
) -> RepositorySync:
    settings = config.replication
    try:
        return await with_retry_settings(sync_repository_task, settings)(
            primary, target, repository, settings, dry_run, shared_storage
        )
    except RepositorySyncFailed as failure:
        return failure.result
    except GeoregError as error:  # the repository could not even be listed
        return RepositorySync(repository, failed={"*": str(error)})


class _StateRecorder:
    """Records each repository's outcome: a failure at once (it counts a retry and schedules the next
    attempt), successes a second's worth at a time in one statement, as a no-op backfill finishes
    hundreds of repositories a second and one transaction each would cost more than their HEADs."""

    INTERVAL_S = 1.0

    def __init__(self, store: StateStore, secondary: str, settings: ReplicationConfig) -> None:
        self._store, self._secondary, self._settings = store, secondary, settings
        self._synced: list[str] = []
        self._flushed_at = time.monotonic()

    async def record(self, result: RepositorySync) -> None:
        if not result.ok:
            await self._store.repository_failed(
                self._secondary,
                result.repository,
                result.failure_summary(),
                base=self._settings.retry_backoff_base_seconds,
                cap=self._settings.retry_backoff_cap_seconds,
            )
            return
        self._synced.append(result.repository)
        if time.monotonic() - self._flushed_at >= self.INTERVAL_S:
            await self.flush()

    async def flush(self) -> None:
        self._flushed_at = time.monotonic()
        batch, self._synced = self._synced, []
        if batch:
            await self._store.repositories_synced(self._secondary, batch)


def _due(state: RepositoryState | None) -> bool:
    """Everything is due except a failed repository whose retry time has not come yet."""
    return state is None or state.state != FAILED or (state.retry_at or 0) <= time.time()


async def _renew(store: StateStore, lease: str, holder: str, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds / 3)
        await store.acquire_lease(lease, holder, seconds)
