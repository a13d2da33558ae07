"""The `verify` flow: check, without trusting georeg's records, that each secondary matches the primary."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import acreate_table_artifact

from georeg.config import GeoregConfig, load_config
from georeg.dashboard import publish_dashboard
from georeg.errors import ReplicationError
from georeg.flows.common import for_each_secondary, open_state, run_name
from georeg.progress import Progress, artifact_key
from georeg.references import validate_repository
from georeg.registry import RegistryClient
from georeg.repository_groups import RepositoryGroup, in_groups
from georeg.state import StateStore
from georeg.tasks.repositories import list_repositories_task, verify_repositories_task
from georeg.tasks.retries import with_retry_settings
from georeg.verification import RepositoryVerification, failed_verification, report_rows


@flow(name="verify", flow_run_name=run_name("verify"))
async def verify(
    secondary: str | None = None, deep: bool = False, repositories: list[str] | None = None
) -> list[dict[str, Any]]:
    """Compare each repository's (tag, digest) checksum on both sides; with `deep`, also check that
    every blob the secondary's manifests reference is there with the right size. A mismatch sends
    the repository back to pending, so the next backfill resyncs it, and fails the run.

    Args:
        secondary: one secondary's name; all of them when omitted.
        deep: check the blobs too.
        repositories: only these (the automation on repeated replication failures names one); all when omitted.
    """
    config = load_config()
    chosen = None if repositories is None else [validate_repository(name) for name in repositories]
    async with open_state(config) as store:

        async def verify_one(primary: RegistryClient, target: RegistryClient) -> dict[str, Any]:
            return await _verify_secondary(config, store, primary, target, deep, chosen)

        return await for_each_secondary(config, secondary, verify_one, store=store)


async def _verify_secondary(
    config: GeoregConfig,
    store: StateStore,
    primary: RegistryClient,
    target: RegistryClient,
    deep: bool,
    chosen: list[str] | None,
) -> dict[str, Any]:
    settings = config.replication
    run_id = await store.runs.started("verify", target.name)
    repositories = chosen
    if repositories is None:
        repositories = await with_retry_settings(list_repositories_task, settings)(primary, target, settings)
    progress = Progress(artifact_key("verify", target.name), f"Verification of {target.name}", len(repositories))
    await progress.start()
    check_group = with_retry_settings(verify_repositories_task, settings)

    async def check(group: RepositoryGroup[RepositoryVerification]) -> None:
        await check_group(primary, target, group, settings, deep)

    async def record(result: RepositoryVerification) -> None:
        await store.sync.repository_verified(target.name, result.repository, result.failure())

    results = await in_groups(
        repositories,
        config.backfill.repositories_per_task,
        settings.concurrency.repositories,
        check,
        of_error=failed_verification,
        record=record,
        finished=progress.advance,
    )
    mismatched = [result for result in results if not result.ok]
    await acreate_table_artifact(
        table=report_rows(results),
        key=artifact_key("verify", target.name, "report"),
        description=f"Verification of {target.name}{' (deep)' if deep else ''}: {len(results) - len(mismatched)} "
        f"repositories verified, {len(mismatched)} differ. The table shows those that differ.",
    )
    summary = {
        "secondary": target.name,
        "repositories": len(results),
        "verified": len(results) - len(mismatched),
        "mismatched": len(mismatched),
        "blobs_checked": sum(r.blobs_checked for r in results),
    }
    await store.runs.finished(run_id, "failed" if mismatched else "completed", summary)
    await publish_dashboard(config, store, target.name)
    if mismatched:
        named = "; ".join(f"{r.repository}: {r.failure()}" for r in mismatched[:3])
        raise ReplicationError(f"{len(mismatched)} of {len(results)} repositories differ: {named}")
    return summary
