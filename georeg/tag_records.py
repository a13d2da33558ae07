"""georeg's record of what it wrote to each repository of a secondary: tag -> digest.

georeg is a secondary's only writer, as in Geo, so while the secondary's tag list is the record's, the
record stands in for one HEAD per tag. Every repository is also re-checked one HEAD a tag at the first
backfill after a fixed fraction (between half and all, from its name) of `backfill.recheck_days`, so a
tag changed behind georeg's back is found within that time, and the re-checks spread over the passes.
`georeg verify` trusts no record.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

from georeg.references import is_digest


@dataclass(frozen=True)
class WrittenTags:
    """A repository's record, as a backfill pass uses it."""

    tags: dict[str, str]
    trusted: bool  # False while the repository is due for its re-check by HEAD


def encode(tags: Mapping[str, str]) -> str:
    return json.dumps(dict(sorted(tags.items())), separators=(",", ":"))


def decode(text: str | None) -> dict[str, str] | None:
    """The record's tags; None when there is no record (or one this georeg cannot read: HEADs then tell)."""
    if text is None:
        return None
    try:
        tags = json.loads(text)
    except ValueError:
        return None
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        return None
    return tags


def recheck_due(repository: str, checked_at: float | None, now: float, period_seconds: float) -> bool:
    """Whether `repository`, last checked one HEAD a tag at `checked_at`, is due for that again."""
    if checked_at is None:
        return True
    share = int.from_bytes(hashlib.sha256(repository.encode()).digest()[:8], "big") / 2**64
    return now - checked_at >= period_seconds * (0.5 + share / 2)


def written_tags(
    repository: str, stored: tuple[str | None, float | None] | None, now: float, period_seconds: float
) -> WrittenTags | None:
    """The record of a repository from its state row's (written_tags, checked_at); None if it has none."""
    if stored is None:
        return None
    tags = decode(stored[0])
    if tags is None:
        return None
    return WrittenTags(tags, trusted=not recheck_due(repository, stored[1], now, period_seconds))


def record_columns(tags: Mapping[str, str], *, checked_at: float | None) -> dict[str, object]:
    """A state row's columns for a record; `checked_at` None keeps the row's last check."""
    return {"written_tags": encode(tags), "checked_at": checked_at}


def changed(text: str | None, *, wrote: Mapping[str, str], removed: str | None) -> str | None:
    """A record after an event's flow put `wrote` (tag -> digest) or removed `removed` (a tag, or a digest
    and with it every tag that pointed at it). No record stays no record: the next backfill makes one."""
    tags = decode(text)
    if tags is None:
        return None
    tags.update(wrote)
    if removed is not None:
        tags = {tag: digest for tag, digest in tags.items() if removed not in (tag, digest)}
    return encode(tags)


def reference_tag(reference: str) -> str | None:
    """The tag a reference names, or None for a digest (which writes no tag)."""
    return None if is_digest(reference) else reference
