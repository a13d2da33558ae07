"""The backfill's and verification's units as Prefect tasks (the logic: `georeg.repository_sync`,
`georeg.verification`).

A group of repositories is one task (`georeg.repository_groups`): a retry redoes only the
repositories that failed in a way another attempt may fix, each whole, which costs only its listing
and HEADs for what was already copied.
"""

from __future__ import annotations

from collections.abc import Callable

from prefect import task

from georeg import repository_sync, verification
from georeg.config import ReplicationConfig
from georeg.registry import RegistryClient
from georeg.repository_groups import RepositoryGroup
from georeg.storage_adapters import StorageAdapter, TagLinks
from georeg.tag_records import WrittenTags
from georeg.tasks.retries import RETRYING


@task(name="list-repositories", **RETRYING)
async def list_repositories_task(
    primary: RegistryClient, secondary: RegistryClient, settings: ReplicationConfig, shared: bool = False
) -> list[str]:
    return await repository_sync.list_repositories(primary, secondary, settings, shared=shared)


@task(name="sync-repositories", task_run_name="sync {group}", **RETRYING)
async def sync_repositories_task(
    primary: RegistryClient,
    secondary: RegistryClient,
    group: RepositoryGroup[repository_sync.RepositorySync],
    settings: ReplicationConfig,
    dry_run: bool,
    shared_storage: StorageAdapter | None,
    record_of: Callable[[str], WrittenTags | None] = lambda repository: None,
    primary_links: TagLinks | None = None,
) -> int:
    """`record_of` gives what georeg wrote to a repository of the secondary (a function, not a mapping:
    Prefect would walk a mapping of every repository's record for each group's task)."""

    async def sync(repository: str) -> repository_sync.RepositorySync:
        return await repository_sync.sync_repository(
            primary,
            secondary,
            repository,
            settings,
            dry_run=dry_run,
            shared_storage=shared_storage,
            record=record_of(repository),
            primary_links=primary_links,
        )

    return await group.run(sync)


@task(name="verify-repositories", task_run_name="verify {group}", **RETRYING)
async def verify_repositories_task(
    primary: RegistryClient,
    secondary: RegistryClient,
    group: RepositoryGroup[verification.RepositoryVerification],
    settings: ReplicationConfig,
    deep: bool,
) -> int:
    async def check(repository: str) -> verification.RepositoryVerification:
        return await verification.verify_repository(primary, secondary, repository, settings, deep=deep)

    return await group.run(check)
