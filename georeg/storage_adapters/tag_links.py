"""The primary's tag -> digest, read from its storage instead of asked of it one HEAD a tag.

The registry keeps each tag's digest in a small link object,
`repositories/<name>/_manifests/tags/<tag>/current/link`, holding the text `sha256:<hex>`. One listing
of the repositories directory shows every tag of every repository, and on an object store each
object's MD5 too (`list_tag_links`). The registry writes a link in one PUT, so a link whose MD5 is the
MD5 of the digest georeg recorded for that tag still holds that digest: only the links that differ
are read. A file system shows no MD5: its walk reads each tag's link (and nothing else) for one, which
on a local disk costs microseconds.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from georeg.errors import InvalidReference
from georeg.references import validate_digest, validate_repository, validate_tag
from georeg.storage_adapters.base import REPOSITORIES_DIRECTORY, StorageAdapter, StorageError, tag_link

logger = logging.getLogger("georeg.storage")

_TAGS = "/_manifests/tags/"
_CURRENT_LINK = "/current/link"


@dataclass
class StorageTags:
    """One repository's tags as its storage shows them."""

    digests: dict[str, str] = field(default_factory=dict)  # tag -> digest
    # Tags whose link did not hold a digest when read: the file system driver rewrites a link in place,
    # so a reader may see it empty or half-written. The registry is asked about these.
    unsure: list[str] = field(default_factory=list)
    links_read: int = 0


class TagLinks:
    """Answers tag -> digest per repository from one listing of the storage, taken when first needed.

    Once the storage fails to answer (or shows no tag at all, which a wrong `storage:` block would), it
    is asked nothing more: one warning is logged and every repository is left to HEAD requests."""

    def __init__(self, storage: StorageAdapter) -> None:
        self.storage = storage
        self.listings = 0  # for the tests and benchmarks
        self._tags: dict[str, dict[str, str | None]] | None = None  # repository -> tag -> link MD5
        self._failed = False
        self._lock = threading.Lock()  # asked from many threads at once: one listing, which the others wait for

    def __repr__(self) -> str:
        return f"TagLinks({self.storage!r})"

    @property
    def failed(self) -> bool:
        return self._failed

    def tags(self, repository: str, recorded: Mapping[str, str]) -> StorageTags | None:
        """`repository`'s tags and digests, reading only links whose MD5 differs from `recorded`'s digest.

        None when the storage cannot answer, or does not show the repository (the registry then tells)."""
        listing = self._listing()
        links = None if listing is None else listing.get(repository)
        if links is None:
            return None
        found = StorageTags()
        for tag, md5 in links.items():
            known = recorded.get(tag)
            if md5 is not None and known is not None and md5 == hashlib.md5(known.encode()).hexdigest():
                found.digests[tag] = known
                continue
            try:
                link = self.storage.read_small(tag_link(repository, tag))
            except StorageError as error:
                self._fail(f"reading a tag link failed ({error})")
                return None
            found.links_read += 1
            if link is None:
                continue  # deleted since the listing
            digest = _digest(link)
            if digest is None:
                found.unsure.append(tag)
            else:
                found.digests[tag] = digest
        return found

    def _listing(self) -> dict[str, dict[str, str | None]] | None:
        with self._lock:
            if self._failed:
                return None
            if self._tags is None:
                try:
                    tags = self._take()
                except StorageError as error:
                    self._fail(f"listing the repositories failed ({error})")
                    return None
                if not tags:
                    self._fail("it shows no tag at all (check primary.storage)")
                    return None
                self._tags = tags
                self.listings += 1
            return self._tags

    def _take(self) -> dict[str, dict[str, str | None]]:
        tags: dict[str, dict[str, str | None]] = {}
        for path, md5 in self.storage.list_tag_links():
            # A repository name's components never start with '_', so "/_manifests/tags/" ends the name.
            repository, found, rest = path[len(REPOSITORIES_DIRECTORY) :].partition(_TAGS)
            tag = rest[: -len(_CURRENT_LINK)]
            if found and rest.endswith(_CURRENT_LINK) and _valid(repository, tag):
                tags.setdefault(repository, {})[tag] = md5
        logger.debug("listed %d repositories' tags in %r", len(tags), self.storage)
        return tags

    def _fail(self, why: str) -> None:
        if not self._failed:
            logger.warning("the primary's storage cannot be read (%s): tags are compared by HEAD requests instead", why)
        self._failed = True


def _valid(repository: str, tag: str) -> bool:
    """Whether the names are ones the registry could have written (anything else is not a tag of it)."""
    try:
        validate_repository(repository), validate_tag(tag)
    except InvalidReference:
        return False
    return True


def _digest(link: bytes) -> str | None:
    try:
        return validate_digest(link.decode().strip())
    except (UnicodeDecodeError, InvalidReference):
        return None
