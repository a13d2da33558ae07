"""Removing from a secondary what the primary no longer has, and nothing more."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from georeg.references import ImageReference, is_digest
from georeg.registry import RegistryClient


class DeletionOutcome(str, Enum):
    KEPT = "kept"  # the primary still has it: nothing to delete (a later push re-created it)
    ABSENT = "absent"  # the secondary did not have it either
    REMOVED = "removed"


@dataclass(frozen=True)
class Deletion:
    reference: ImageReference
    outcome: DeletionOutcome
    digest: str | None = None
    restored_tags: tuple[str, ...] = field(default_factory=tuple)


async def converge_deletion(
    primary: RegistryClient,
    secondary: RegistryClient,
    reference: ImageReference,
    known: Mapping[str, str] | None = None,
) -> Deletion:
    """Remove from the secondary what the primary no longer has, and nothing more.

    Registries delete by digest only, which drops every tag pointing at it; tags that the secondary
    still has for the same digest are therefore put back right after the delete. `known` is the
    secondary's tag -> digest as the caller knows it (a backfill's record or HEADs): a tag it shows at
    another digest is not asked, so removing a tag from a repository of thousands costs a few requests,
    not a HEAD of every other tag.
    """
    repository = reference.repository
    if await primary.head_manifest(repository, reference.reference) is not None:
        return Deletion(reference, DeletionOutcome.KEPT)
    current = await secondary.head_manifest(repository, reference.reference)
    if current is None:
        return Deletion(reference, DeletionOutcome.ABSENT)
    if is_digest(reference.reference):
        await secondary.delete_manifest(repository, current.digest)
        return Deletion(reference, DeletionOutcome.REMOVED, current.digest)

    manifest = await secondary.get_manifest(repository, current.digest)
    known = known or {}
    candidates = [
        tag
        for tag in await secondary.tags(repository)
        if tag != reference.reference and known.get(tag, current.digest) == current.digest
    ]
    digests = await secondary.manifest_digests(repository, candidates)
    survivors = [tag for tag in candidates if digests.get(tag) == current.digest]
    await secondary.delete_manifest(repository, current.digest)
    for tag in survivors:
        await secondary.put_manifest(repository, tag, manifest)
    return Deletion(reference, DeletionOutcome.REMOVED, current.digest, tuple(survivors))
