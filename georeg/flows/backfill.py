"""The `backfill` flow: make every repository on a secondary equal to the primary's, and record it.

Run as a deployment, a backfill shares its work: the due repositories are split into batches, each
a flow run of the `backfill-batch` deployment (`georeg.batches`). Run anywhere else (the CLI, the
embedded default) it does the same work in its own process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

from prefect import flow
from prefect.artifacts import acreate_table_artifact

from georeg.batches import BATCH_RUN, batch_lease, fans_out, run_batches
from georeg.config import GeoregConfig, load_config
from georeg.dashboard import publish_dashboard
from georeg.errors import ReplicationError
from georeg.flows.common import for_each_secondary, open_state, run_holder, run_name
from georeg.prefect_events import emit_backfill
from georeg.progress import Progress, artifact_key
from georeg.registry import RegistryClient
from georeg.repository_groups import RepositoryGroup, in_groups
from georeg.repository_sync import RepositorySync, failed_sync, report_rows, summarise
from georeg.sharing import ModeDecision, decide_mode
from georeg.state import StateStore
from georeg.state.sync import STARTED, SyncRecorder
from georeg.storage_adapters import BlobInventory, StorageAdapter, TagLinks, build_adapter
from georeg.tag_records import WrittenTags, record_columns, written_tags
from georeg.tasks.repositories import list_repositories_task, sync_repositories_task
from georeg.tasks.retries import with_retry_settings

logger = logging.getLogger("georeg.backfill")


@flow(name="backfill", flow_run_name=run_name("backfill"))
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


@flow(name="backfill-batch", flow_run_name=run_name("backfill-batch"))
async def backfill_batch(secondary: str, repositories: list[str], dry_run: bool = False) -> dict[str, Any]:
    """One share of a backfill: sync these repositories of one secondary. Started by `backfill`."""
    from prefect.runtime import flow_run

    config = load_config()
    this_run = str(flow_run.id)
    async with open_state(config) as store:
        # The lease says this batch is alive: the backfill waiting for it ends it as crashed once the
        # lease runs out. It is left to run out, not released: the backfill releases it once the run ended.
        lease, seconds = batch_lease(this_run), config.backfill.lease_seconds
        await store.leases.acquire(lease, this_run, seconds)

        async def sync(primary: RegistryClient, target: RegistryClient) -> dict[str, Any]:
            run_id = await store.runs.started(BATCH_RUN, target.name)
            async with _replication_mode(config, target.name, dry_run) as mode:
                summary = await _sync_repositories(config, store, primary, target, repositories, dry_run, mode)
            # Which worker did this share (a process worker's flow runs are its children).
            summary.update(flow_run_id=this_run, worker=f"{socket.gethostname()}:{os.getppid()}")
            await store.runs.finished(run_id, "failed" if summary["failed"] else "completed", summary)
            return summary

        async with store.leases.renewed(lease, this_run, seconds):
            [summary] = await for_each_secondary(config, secondary, sync, store=store)
    _raise_if_failed(summary, len(repositories))
    return summary


async def _backfill_secondary(
    config: GeoregConfig, store: StateStore, primary: RegistryClient, target: RegistryClient, dry_run: bool
) -> dict[str, Any]:
    """Take the secondary's lease, find the due repositories, sync them (here or in batches), record the run."""
    lease, holder, seconds = f"backfill:{target.name}", run_holder(), config.backfill.lease_seconds
    if await store.leases.acquire(lease, holder, seconds) is None:
        other = await store.leases.holder(lease)
        logger.warning("a backfill of %s is already running (%s); this one stops here", target.name, other)
        return {"secondary": target.name, "skipped": f"a backfill of {target.name} is already running ({other})"}
    run_id = None if dry_run else await store.runs.started("backfill", target.name)
    outcome = "crashed"
    try:
        async with (
            store.leases.renewed(lease, holder, seconds),
            _replication_mode(config, target.name, dry_run) as mode,
        ):
            settings = config.replication
            list_repositories = with_retry_settings(list_repositories_task, settings)
            repositories, known, deferred = await asyncio.gather(
                list_repositories(primary, target, settings, shared=mode.storage is not None),
                store.sync.known_repositories(target.name),
                store.sync.deferred_repositories(target.name),
            )
            due = [name for name in repositories if name not in deferred]
            if not dry_run:  # no longer on either side (or filtered out)
                await store.sync.forget_repositories(target.name, sorted(known - set(repositories)))
            if fans_out(config, len(due)):
                summary = await run_batches(config, store, target.name, due, dry_run)
            else:
                summary = await _sync_repositories(config, store, primary, target, due, dry_run, mode)
        summary.update(repositories=len(repositories), deferred=len(repositories) - len(due))
        outcome = "failed" if summary["failed"] else "completed"
    finally:
        if run_id is not None:
            await store.runs.finished(run_id, outcome, summary if outcome != "crashed" else {})
            emit_backfill(target.name, summary if outcome != "crashed" else {}, failed=outcome != "completed")
        await store.leases.release(lease, holder)
        if run_id is not None:
            await publish_dashboard(config, store, target.name)
    if not dry_run:  # the backfill's end is a quiet moment to forget old events and runs
        await store.retention.prune(config.state.retention_days)
    _raise_if_failed(summary, summary["repositories"])
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
    settings = config.replication
    progress = Progress(artifact_key("backfill", target.name), f"Backfill of {target.name}", len(repositories))
    recorder = None
    starting = [progress.start()]  # independent round trips, to the Prefect API and the state database
    if not dry_run:
        recorder = SyncRecorder(
            store.sync,
            target.name,
            backoff_base=settings.retry_backoff_base_seconds,
            backoff_cap=settings.retry_backoff_cap_seconds,
        )
        starting.append(store.sync.set_repository_states(target.name, repositories, state=STARTED))
    # In shared mode every tag is confirmed in the storage: neither records nor the primary's links decide.
    copying = mode.storage is None
    *_, stored = await asyncio.gather(*starting, store.sync.tag_records(target.name, repositories if copying else []))
    links = _primary_tag_links(config) if copying else None
    sync_group = with_retry_settings(sync_repositories_task, settings)
    now, recheck_seconds = time.time(), config.backfill.recheck_days * 86400

    def record_of(repository: str) -> WrittenTags | None:
        return written_tags(repository, stored.get(repository), now, recheck_seconds)

    async def record(result: RepositorySync) -> None:
        if recorder is None:
            return
        if not result.ok:
            await recorder.failed(result.repository, result.failure_summary())
            return
        columns = None
        if result.written is not None:
            columns = record_columns(result.written, checked_at=time.time() if result.checked else None)
        await recorder.synced(result.repository, columns)

    async def sync(group: RepositoryGroup[RepositorySync]) -> None:
        await sync_group(primary, target, group, settings, dry_run, mode.storage, record_of, links)

    try:
        results = await in_groups(
            repositories,
            config.backfill.repositories_per_task,
            settings.concurrency.repositories,
            sync,
            of_error=failed_sync,
            record=record,
            finished=progress.advance,
        )
    finally:
        if recorder is not None:
            await asyncio.shield(recorder.flush())  # what was learned is kept, even when cancelled
    await acreate_table_artifact(
        table=report_rows(results),
        key=artifact_key("backfill", target.name, "report"),
        description=f"{'Dry run of the b' if dry_run else 'B'}ackfill of {target.name} ({mode.mode.value} mode: "
        f"{mode.reason}): {_counts(summarise(results))}. The table shows its failures, then its slowest repositories.",
    )
    return {"secondary": target.name, "mode": mode.mode.value, "dry_run": dry_run, **summarise(results)}


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


def _primary_tag_links(config: GeoregConfig) -> TagLinks | None:
    """The primary's tags read from its storage, when the config has the primary's `storage:` block."""
    return TagLinks(build_adapter(config.primary.storage)) if config.primary.storage else None


async def _connect_ahead(storage: StorageAdapter) -> None:
    # A failure here is the same as at the first real check, which reports it where it matters.
    with contextlib.suppress(Exception):
        await asyncio.to_thread(storage.connect)


def _raise_if_failed(summary: dict[str, Any], repositories: int) -> None:
    if summary.get("failed"):
        raise ReplicationError(
            f"{summary['failed']} of {repositories} repositories failed: " + "; ".join(summary["failures"])
        )


def _counts(summary: dict[str, Any]) -> str:
    return (
        f"{summary['synced']} repositories synced, {summary['failed']} failed; tags: "
        f"{summary['tags_replicated']} replicated, {summary['tags_confirmed']} confirmed, "
        f"{summary['tags_removed']} removed, {summary['tags_unchanged']} unchanged"
    )
