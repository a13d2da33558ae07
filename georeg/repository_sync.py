"""Bringing whole repositories on a secondary level with the primary: what a backfill does per repository.

For each repository: compare tag -> digest on both sides, replicate what is missing or different,
remove what the primary no longer has. Every tag's outcome is collected: a repository counts as synced
only if every tag in it succeeded.

Each side's tag -> digest comes from the cheapest source that can be trusted:

- the secondary: georeg's record of what it wrote there (`georeg.tag_records`) while the secondary's
  tag list matches it and no re-check is due; else a HEAD per tag (with every manifest media type, so
  indexes are never skipped);
- the primary: its storage's tag links (`TagLinks`) when its `storage:` block is given and readable;
  else its tag list and a HEAD per tag.

So a no-op pass costs a tag list per repository and one listing of the primary's storage.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

from georeg.blob_copy import BlobOutcome
from georeg.concurrency import bounded
from georeg.config import ReplicationConfig
from georeg.deletion import DeletionOutcome, converge_deletion
from georeg.errors import GeoregError, NotFound
from georeg.references import ImageReference
from georeg.registry import RegistryClient
from georeg.replication import replicate
from georeg.storage_adapters import StorageAdapter, TagLinks
from georeg.tag_records import WrittenTags


async def list_repositories(
    primary: RegistryClient, secondary: RegistryClient, settings: ReplicationConfig, *, shared: bool = False
) -> list[str]:
    """Every repository on either side that the filters want (the secondary's own, to clean them up).
    `shared`: the secondary's storage is the primary's, so is its catalog, which is not asked again."""

    async def names(client: RegistryClient) -> set[str]:
        return {name async for name in client.catalog()}

    sides = [primary] if shared else [primary, secondary]
    found = set().union(*await asyncio.gather(*(names(client) for client in sides)))
    return sorted(name for name in found if settings.repositories.wants(name))


async def tag_digests(client: RegistryClient, repository: str, settings: ReplicationConfig) -> dict[str, str]:
    """tag -> digest for the wanted tags of `repository` (empty if the repository does not exist)."""
    return await client.manifest_digests(
        repository, [tag for tag in await client.tags(repository) if settings.tags.wants(tag)]
    )


async def _present(
    secondary: RegistryClient, repository: str, listed: list[str], trusted_record: dict[str, str] | None
) -> dict[str, str]:
    """The secondary's tag -> digest: the record when it is trusted, else a HEAD per listed tag."""
    if trusted_record is not None:
        return dict(trusted_record)
    return await secondary.manifest_digests(repository, listed)


async def _nothing() -> None:
    return None


def tags_checksum(digests: dict[str, str]) -> str:
    """One value for a repository's tag -> digest list: equal on both sides means equal content."""
    listing = "".join(f"{tag} {digest}\n" for tag, digest in sorted(digests.items()))
    return "sha256:" + hashlib.sha256(listing.encode()).hexdigest()


@dataclass
class RepositorySync:
    """What a backfill did (or, in a dry run, would do) to one repository."""

    repository: str
    copied: list[str] = field(default_factory=list)
    confirmed: list[str] = field(default_factory=list)  # shared storage: present and checked, nothing sent
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # tag (or "*" for the whole repository) -> why
    unchanged: int = 0
    # What the secondary holds afterwards as far as georeg knows (None: a dry run or shared storage), and
    # whether this pass HEADed every tag of the secondary's rather than trusting the record.
    written: dict[str, str] | None = None
    checked: bool = False
    bytes_copied: int = 0
    bytes_skipped: int = 0
    blobs: dict[str, int] = field(default_factory=lambda: {outcome.value: 0 for outcome in BlobOutcome})
    transient: bool = False  # whether another attempt may fix the failures
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def failure_summary(self) -> str:
        return "; ".join(f"tag {tag}: {why}" if tag != "*" else why for tag, why in sorted(self.failed.items()))

    def as_row(self) -> dict[str, object]:
        return {
            "repository": self.repository,
            "replicated": len(self.copied),
            "confirmed": len(self.confirmed),
            "removed": len(self.removed),
            "failed": len(self.failed),
            "unchanged": self.unchanged,
            "bytes copied": self.bytes_copied,
            "bytes skipped": self.bytes_skipped,
            "seconds": round(self.seconds, 2),
            "failure": self.failure_summary(),
        }


class RepositorySyncFailed(GeoregError):
    """Some tags of a repository could not be made equal; carries the full result."""

    def __init__(self, result: RepositorySync) -> None:
        super().__init__(f"{result.repository}: {result.failure_summary()}")
        self.result = result
        self.transient = result.transient


async def sync_repository(
    primary: RegistryClient,
    secondary: RegistryClient,
    repository: str,
    settings: ReplicationConfig,
    *,
    dry_run: bool = False,
    shared_storage: StorageAdapter | None = None,
    record: WrittenTags | None = None,
    primary_links: TagLinks | None = None,
) -> RepositorySync:
    """Make `repository` on the secondary equal to the primary's; raise RepositorySyncFailed if any tag failed.

    `shared_storage` is the secondary's storage when the primary shares it: tags are confirmed, not copied.
    `record` is what georeg wrote to the secondary; `primary_links` reads the primary's storage."""
    started = time.monotonic()
    result = RepositorySync(repository)
    try:
        await _sync(
            primary,
            secondary,
            repository,
            settings,
            result,
            dry_run=dry_run,
            shared_storage=shared_storage,
            record=record,
            primary_links=primary_links,
        )
    finally:
        result.seconds = time.monotonic() - started
    if result.failed:
        raise RepositorySyncFailed(result)
    return result


async def _sync(
    primary: RegistryClient,
    secondary: RegistryClient,
    repository: str,
    settings: ReplicationConfig,
    result: RepositorySync,
    *,
    dry_run: bool,
    shared_storage: StorageAdapter | None,
    record: WrittenTags | None,
    primary_links: TagLinks | None,
) -> None:
    if shared_storage:
        # The secondary lists what the primary lists, from the same storage: every tag is confirmed, not
        # compared, because what makes it synced is that its manifests and blobs really are there.
        # Neither the secondary's listing nor HEADs would decide anything.
        wanted = dict.fromkeys((tag for tag in await primary.tags(repository) if settings.tags.wants(tag)), "")
        present: dict[str, str] = {}
        listed_empty_at: float | None = None
    else:
        recorded = record.tags if record is not None else {}
        listing_started = time.monotonic()
        from_storage, secondary_tags = await asyncio.gather(
            asyncio.to_thread(primary_links.tags, repository, recorded) if primary_links else _nothing(),
            secondary.tags(repository),
        )
        listed_on_secondary = [tag for tag in secondary_tags if settings.tags.wants(tag)]
        # A repository the secondary lists no tag of gets every tag copied whatever its digest: the
        # primary's HEADs would decide nothing, and no blob HEAD is needed for its small blobs either.
        listed_empty_at = None if secondary_tags else listing_started
        # georeg is the secondary's only writer: while the secondary lists exactly the tags it recorded,
        # they hold the digests it recorded. A re-check due, or any difference, and every tag is asked.
        trusted = record is not None and record.trusted and set(listed_on_secondary) == set(recorded)
        result.checked = not trusted
        if from_storage is not None:
            wanted = {tag: digest for tag, digest in from_storage.digests.items() if settings.tags.wants(tag)}
            unsure = [tag for tag in from_storage.unsure if settings.tags.wants(tag)]
            wanted_from_registry, present = await asyncio.gather(
                primary.manifest_digests(repository, unsure),
                _present(secondary, repository, listed_on_secondary, recorded if trusted else None),
            )
            wanted.update(wanted_from_registry)
        else:
            wanted_tags = [tag for tag in await primary.tags(repository) if settings.tags.wants(tag)]
            wanted, present = await asyncio.gather(
                primary.manifest_digests(repository, wanted_tags if secondary_tags else []),
                _present(secondary, repository, listed_on_secondary, recorded if trusted else None),
            )
            if not secondary_tags:
                wanted = dict.fromkeys(wanted_tags, "")
        result.written = dict(present)
    to_copy = sorted(tag for tag, digest in wanted.items() if shared_storage or present.get(tag) != digest)
    to_remove = sorted(set(present) - set(wanted)) if settings.delete_extra_tags else []
    result.unchanged = len(wanted) - len(to_copy)
    if dry_run:
        result.copied, result.removed = to_copy, to_remove
        return

    async def copy(tag: str) -> None:
        try:
            image = await replicate(
                primary,
                secondary,
                ImageReference(repository, tag),
                settings,
                shared_storage=shared_storage,
                listed_empty_at=listed_empty_at,
            )
        except NotFound as error:
            # Listed but not HEADed first: a tag deleted on the primary since is no longer wanted.
            if listed_empty_at is not None and await primary.head_manifest(repository, tag) is None:
                return
            _record_failure(result, tag, error)
            return
        except GeoregError as error:
            _record_failure(result, tag, error)
            return
        (result.confirmed if shared_storage else result.copied).append(tag)
        if result.written is not None:
            result.written[tag] = image.digest
        result.bytes_copied += image.bytes_copied
        result.bytes_skipped += image.bytes_skipped
        for outcome in BlobOutcome:
            result.blobs[outcome.value] += image.count(outcome)

    # Tags at once, like repositories: a repository of many tags is not one long queue. A blob that
    # several tags share still travels once (`copy_blob` waits for a copy under way, then asks again),
    # and each tag's manifest goes up only after its own blobs are in.
    room = asyncio.Semaphore(settings.concurrency.tags_per_repository)
    await asyncio.gather(*(bounded(room, copy(tag)) for tag in to_copy))
    result.copied.sort()
    result.confirmed.sort()
    for tag in to_remove:
        try:
            # What the secondary holds as far as this pass knows (copies included): only tags at the
            # removed digest, or not known, are asked whether they must be put back.
            deletion = await converge_deletion(
                primary, secondary, ImageReference(repository, tag), known=result.written
            )
        except GeoregError as error:
            _record_failure(result, tag, error)
            continue
        if deletion.outcome is DeletionOutcome.REMOVED:
            result.removed.append(tag)
        if deletion.outcome is not DeletionOutcome.KEPT and result.written is not None:
            result.written.pop(tag, None)
    if result.written is not None:
        for tag in result.failed:  # what a failed copy or removal left there is not known
            result.written.pop(tag, None)


def failed_sync(repository: str, error: GeoregError) -> RepositorySync:
    """What a repository whose sync ended in `error` came to, one that could not even be listed included."""
    if isinstance(error, RepositorySyncFailed):
        return error.result
    return RepositorySync(repository, failed={"*": str(error)}, transient=error.worth_retrying)


_ROWS_SHOWN = {"failed": 50, "slowest": 20}


def report_rows(results: list[RepositorySync]) -> list[dict[str, object]]:
    """The rows of a backfill's report: its failures, then its slowest repositories; the counts of
    everything are in its summary. At 10^4 repositories a row each would be a table nobody reads."""
    failed = sorted((r for r in results if not r.ok), key=lambda r: r.repository)[: _ROWS_SHOWN["failed"]]
    slowest = sorted((r for r in results if r.ok), key=lambda r: r.seconds, reverse=True)[: _ROWS_SHOWN["slowest"]]
    return [result.as_row() for result in failed + slowest]


def _record_failure(result: RepositorySync, tag: str, error: GeoregError) -> None:
    result.failed[tag] = str(error)
    result.transient = result.transient or error.worth_retrying


# The counts a backfill's summary adds up over repositories (and a fanned-out backfill over its batches).
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
_FAILURES_SHOWN = 3


def summarise(results: list[RepositorySync]) -> dict[str, Any]:
    """The counts of a backfill (or of one batch of it) over its repositories, and the first failures."""
    failed = [result for result in results if not result.ok]
    return {
        "synced": len(results) - len(failed),
        "failed": len(failed),
        "failures": [f"{r.repository} ({r.failure_summary()})" for r in failed[:_FAILURES_SHOWN]],
        "tags_replicated": sum(len(r.copied) for r in results),
        "tags_confirmed": sum(len(r.confirmed) for r in results),
        "tags_removed": sum(len(r.removed) for r in results),
        "tags_unchanged": sum(r.unchanged for r in results),
        "bytes_copied": sum(r.bytes_copied for r in results),
        "bytes_skipped": sum(r.bytes_skipped for r in results),
    }


def add_up(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary from the summaries of a backfill's batches."""
    total: dict[str, Any] = dict.fromkeys(COUNTS, 0)
    failures: list[str] = []
    for part in parts:
        for count in COUNTS:
            total[count] += part[count]
        failures += part["failures"]
    total["failures"] = failures[:_FAILURES_SHOWN]
    return total
