"""The backfill's and verification's units as Prefect tasks (the logic: `georeg.repository_sync`,
`georeg.verification`).

A repository is one task: a retry redoes the whole repository, which costs only its listing and
HEADs for what was already copied.
"""

from __future__ import annotations

from prefect import task

from georeg import repository_sync, verification
from georeg.config import ReplicationConfig
from georeg.registry import RegistryClient
from georeg.storage_adapters import StorageAdapter, TagLinks
from georeg.tag_records import WrittenTags
from georeg.tasks.retries import RETRYING


@task(name="list-repositories", **RETRYING)
async def list_repositories_task(
    primary: RegistryClient, secondary: RegistryClient, settings: ReplicationConfig, shared: bool = False
) -> list[str]:
    return await repository_sync.list_repositories(primary, secondary, settings, shared=shared)


@task(name="sync-repository", task_run_name="sync {repository}", **RETRYING)
async def sync_repository_task(
    primary: RegistryClient,
    secondary: RegistryClient,
    repository: str,
    settings: ReplicationConfig,
    dry_run: bool,
    shared_storage: StorageAdapter | None,
    record: WrittenTags | None = None,
    primary_links: TagLinks | None = None,
) -> repository_sync.RepositorySync:
    return await repository_sync.sync_repository(
        primary,
        secondary,
        repository,
        settings,
        dry_run=dry_run,
        shared_storage=shared_storage,
        record=record,
        primary_links=primary_links,
    )


@task(name="verify-repository", task_run_name="verify {repository}", **RETRYING)
async def verify_repository_task(
    primary: RegistryClient, secondary: RegistryClient, repository: str, settings: ReplicationConfig, deep: bool
) -> verification.RepositoryVerification:
    return await verification.verify_repository(primary, secondary, repository, settings, deep=deep)
