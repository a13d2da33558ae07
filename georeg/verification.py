"""Checking that a secondary holds what the primary holds, without trusting georeg's own records.

The quick check compares a checksum over each side's sorted (tag, digest) list. The deep check also
walks every manifest the secondary serves and asks, blob by blob, whether it is there with the
digest and size the manifest promises.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from georeg.concurrency import bounded
from georeg.config import ReplicationConfig
from georeg.errors import GeoregError
from georeg.registry import Descriptor, RegistryClient
from georeg.repository_sync import tag_digests, tags_checksum

_SHOWN = 5  # differences named in a failure message; the rest are counted


@dataclass
class RepositoryVerification:
    repository: str
    primary_checksum: str
    secondary_checksum: str
    problems: list[str] = field(default_factory=list)
    blobs_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def failure(self) -> str | None:
        if self.ok:
            return None
        shown = "; ".join(self.problems[:_SHOWN])
        more = len(self.problems) - _SHOWN
        return shown + (f"; and {more} more" if more > 0 else "")


async def verify_repository(
    primary: RegistryClient,
    secondary: RegistryClient,
    repository: str,
    settings: ReplicationConfig,
    *,
    deep: bool = False,
) -> RepositoryVerification:
    wanted, present = await asyncio.gather(
        tag_digests(primary, repository, settings), tag_digests(secondary, repository, settings)
    )
    result = RepositoryVerification(repository, tags_checksum(wanted), tags_checksum(present))
    if result.primary_checksum != result.secondary_checksum:
        for tag in sorted(set(wanted) | set(present)):
            if tag not in present:
                result.problems.append(f"tag {tag} missing on the secondary")
            elif tag not in wanted:
                result.problems.append(f"tag {tag} is on the secondary only")
            elif wanted[tag] != present[tag]:
                result.problems.append(f"tag {tag} is {present[tag]} on the secondary, {wanted[tag]} on the primary")
    if deep:
        await _check_blobs(secondary, repository, sorted(set(present.values())), result)
    return result


def failed_verification(repository: str, error: GeoregError) -> RepositoryVerification:
    """A repository that could not be checked counts as not verified."""
    return RepositoryVerification(repository, "", "", problems=[f"could not be checked: {error}"])


_ROWS_SHOWN = 50


def report_rows(results: list[RepositoryVerification]) -> list[dict[str, object]]:
    """A verification's report: the repositories that differ (the first 50); its summary counts the rest."""
    mismatched = sorted((r for r in results if not r.ok), key=lambda r: r.repository)[:_ROWS_SHOWN]
    return [{"repository": r.repository, "blobs checked": r.blobs_checked, "problem": r.failure()} for r in mismatched]


async def _check_blobs(
    secondary: RegistryClient, repository: str, digests: list[str], result: RepositoryVerification
) -> None:
    """Every blob referenced by the secondary's manifests (children of indexes too) must be present."""
    seen: set[str] = set()
    blobs: dict[str, Descriptor] = {}
    pending = list(digests)
    while pending:
        digest = pending.pop()
        if digest in seen:
            continue
        seen.add(digest)
        manifest = await secondary.get_manifest(repository, digest)
        pending += [child.digest for child in manifest.children()]
        blobs.update({blob.digest: blob for blob in manifest.blobs()})

    room = asyncio.Semaphore(16)
    sizes = await asyncio.gather(*(bounded(room, secondary.blob_size(repository, d)) for d in blobs))
    for blob, size in zip(blobs.values(), sizes, strict=True):
        if size is None:
            result.problems.append(f"blob {blob.digest} missing on the secondary")
        elif size != blob.size:
            result.problems.append(f"blob {blob.digest} has {size} bytes on the secondary, {blob.size} expected")
    result.blobs_checked = len(blobs)
