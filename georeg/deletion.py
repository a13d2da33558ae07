"""Removing from a secondary what the primary no longer has, and nothing more."""

from __future__ import annotations

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


async def converge_deletion(primary: RegistryClient, secondary: RegistryClient, reference: ImageReference) -> Deletion:
    """Remove from the secondary what the primary no longer has, and nothing more.

    Registries delete by digest only, which drops every tag pointing at it; tags that the secondary
    still has for the same digest are therefore put back right after the delete.
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
    survivors = []
    for tag in await secondary.tags(repository):
        if tag != reference.reference:
            other = await secondary.head_manifest(repository, tag)
            if other is not None and other.digest == current.digest:
                survivors.append(tag)
    await secondary.delete_manifest(repository, current.digest)
    for tag in survivors:
        await secondary.put_manifest(repository, tag, manifest)
    return Deletion(reference, DeletionOutcome.REMOVED, current.digest, tuple(survivors))
