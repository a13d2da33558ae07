"""The `backfill` flow: make every repository on a secondary equal to the primary's, and record it."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from prefect import flow
from prefect.artifacts import acreate_table_artifact

from georeg.backfill import RepositorySync, RepositorySyncFailed
from georeg.config import GeoregConfig, load_config
from georeg.errors import GeoregError, ReplicationError
from georeg.flows.common import for_each_secondary, open_state, run_holder
from georeg.progress import Progress, artifact_key
from georeg.registry import RegistryClient
from georeg.replication import bounded
from georeg.sharing import decide_mode
from georeg.state import FAILED, STARTED, RepositoryState, StateStore
from georeg.storage_adapters import StorageAdapter
from georeg.tasks import list_repositories_task, sync_repository_task, with_retry_settings

logger = logging.getLogger("georeg.backfill")
LEASE_SECONDS = 300.0


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

        return await for_each_secondary(config, secondary, backfill_one)


async def _backfill_secondary(
    config: GeoregConfig, store: StateStore, primary: RegistryClient, target: RegistryClient, dry_run: bool
) -> dict[str, Any]:
    lease, holder = f"backfill:{target.name}", run_holder()
    if await store.acquire_lease(lease, holder, LEASE_SECONDS) is None:
        other = await store.lease_holder(lease)
        logger.warning("a backfill of %s is already running (%s); this one stops here", target.name, other)
        return {"secondary": target.name, "skipped": f"a backfill of {target.name} is already running ({other})"}
    keep_lease = asyncio.create_task(_renew(store, lease, holder))
    run_id = None if dry_run else await store.run_started("backfill", target.name)
    try:
        summary, failed = await _sync_all(config, store, primary, target, dry_run)
        if run_id is not None:
            await store.run_finished(run_id, "failed" if failed else "completed", json.dumps(summary))
            run_id = None
    finally:
        keep_lease.cancel()
        if run_id is not None:
            await store.run_finished(run_id, "crashed", "{}")
        await store.release_lease(lease, holder)
    if failed:
        named = "; ".join(f"{r.repository} ({r.failure_summary()})" for r in failed[:3])
        raise ReplicationError(f"{len(failed)} of {summary['repositories']} repositories failed: {named}")
    return summary


async def _sync_all(
    config: GeoregConfig, store: StateStore, primary: RegistryClient, target: RegistryClient, dry_run: bool
) -> tuple[dict[str, Any], list[RepositorySync]]:
    settings = config.replication
    mode = decide_mode(config, config.select_secondaries(target.name)[0])
    repositories = await with_retry_settings(list_repositories_task, settings)(primary, target, settings)
    states = await store.repository_states(target.name)
    due = [name for name in repositories if _due(states.get(name))]
    progress = Progress(artifact_key("backfill", target.name), f"Backfill of {target.name}", len(due))
    await progress.start()

    async def sync(repository: str) -> RepositorySync:
        result = await _sync_one(config, store, primary, target, repository, dry_run, mode.storage)
        await progress.advance()
        return result

    room = asyncio.Semaphore(settings.concurrency)
    results = await asyncio.gather(*(bounded(room, sync(name)) for name in due))
    if not dry_run:
        for gone in set(states) - set(repositories):  # no longer on either side (or filtered out)
            await store.forget_repository(target.name, gone)
    await acreate_table_artifact(
        table=[result.as_row() for result in results],
        key=artifact_key("backfill", target.name, "report"),
        description=f"{'Dry run of the b' if dry_run else 'B'}ackfill of {target.name} ({mode.mode.value} mode: "
        f"{mode.reason})",
    )
    failed = [result for result in results if not result.ok]
    summary = {
        "secondary": target.name,
        "mode": mode.mode.value,
        "dry_run": dry_run,
        "repositories": len(repositories),
        "deferred": len(repositories) - len(due),  # failed recently, waiting for their retry_at
        "synced": len(results) - len(failed),
        "failed": len(failed),
        "tags_replicated": sum(len(r.copied) for r in results),
        "tags_confirmed": sum(len(r.confirmed) for r in results),
        "tags_removed": sum(len(r.removed) for r in results),
        "tags_unchanged": sum(r.unchanged for r in results),
        "bytes_copied": sum(r.bytes_copied for r in results),
        "bytes_skipped": sum(r.bytes_skipped for r in results),
        "blobs": {kind: sum(r.blobs[kind] for r in results) for kind in results[0].blobs} if results else {},
    }
    return summary, failed


async def _sync_one(
    config: GeoregConfig,
    store: StateStore,
    primary: RegistryClient,
    target: RegistryClient,
    repository: str,
    dry_run: bool,
    shared_storage: StorageAdapter | None,
) -> RepositorySync:
    settings = config.replication
    if not dry_run:
        await store.set_repository_state(target.name, repository, state=STARTED)
    try:
        result = await with_retry_settings(sync_repository_task, settings)(
            primary, target, repository, settings, dry_run, shared_storage
        )
    except RepositorySyncFailed as failure:
        result = failure.result
    except GeoregError as error:  # the repository could not even be listed
        result = RepositorySync(repository, failed={"*": str(error)})
    if dry_run:
        return result
    if result.ok:
        await store.repository_synced(target.name, repository)
    else:
        await store.repository_failed(
            target.name,
            repository,
            result.failure_summary(),
            base=settings.retry_backoff_base_seconds,
            cap=settings.retry_backoff_cap_seconds,
        )
    return result


def _due(state: RepositoryState | None) -> bool:
    """Everything is due except a failed repository whose retry time has not come yet."""
    return state is None or state.state != FAILED or (state.retry_at or 0) <= time.time()


async def _renew(store: StateStore, lease: str, holder: str) -> None:
    while True:
        await asyncio.sleep(LEASE_SECONDS / 3)
        await store.acquire_lease(lease, holder, LEASE_SECONDS)
