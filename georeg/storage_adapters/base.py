"""What a storage adapter answers about a registry's storage, whatever the backend.

Registries lay their storage out the same way on every driver (see `blob_path` and friends); an
adapter only knows how to ask its backend whether an object exists and how large it is. Paths are
built only from validated repository names and digests.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from georeg.errors import GeoregError
from georeg.references import validate_digest, validate_repository, validate_tag

REGISTRY_PREFIX = "docker/registry/v2"
BLOBS_DIRECTORY = f"{REGISTRY_PREFIX}/blobs/"
REPOSITORIES_DIRECTORY = f"{REGISTRY_PREFIX}/repositories/"
_MD5 = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class StorageLocation:
    """Where a registry keeps its data; two registries share storage when these are equal."""

    backend: str
    endpoint: str
    bucket: str
    root: str


class StorageError(GeoregError):
    """The backend could not answer (unreachable, denied, throttled): unlike None, this says nothing
    about whether the object exists. Messages name the backend, bucket and key, the HTTP status and
    the service's error code, never credentials nor the service's own message text (some services
    echo the access key id back)."""

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient
        # Each adapter's SDK retries its own calls (`georeg.retries`): nothing above retries them again.
        self.exhausted = True


class StorageAdapter(Protocol):
    """One per backend. Methods are blocking (the SDKs are); async callers use asyncio.to_thread."""

    def location(self) -> StorageLocation:
        """Where the data lives, normalised: equal for two configs naming the same storage."""
        ...

    def connect(self) -> None:
        """Import the SDK and make its client now, so that the first check does not wait for that."""
        ...

    def object_size(self, path: str) -> int | None:
        """Size of the object at `path` (relative to the registry root), or None if it is absent."""
        ...

    def read_small(self, path: str) -> bytes | None:
        """Contents of a small object (a link file), or None if it is absent."""
        ...

    def list_objects(self, directory: str) -> Iterator[tuple[str, int | None]]:
        """(path, size) of every object under `directory` (relative to the registry root, as `path`
        is above), page by page as the backend lists them; nothing if the directory is absent. The
        size is None where the listing may not show it (`object_size` then tells)."""
        ...

    def list_checksums(self, directory: str) -> Iterator[tuple[str, str | None]]:
        """(path, MD5 of the contents as 32 hex digits) of every object under `directory`, from the same
        listing: the MD5 is what the backend shows (an ETag, a content MD5), None where it shows none or
        one that is not the contents' MD5 (a multipart upload's ETag)."""
        ...

    def list_tag_links(self) -> Iterator[tuple[str, str | None]]:
        """(path, MD5) as `list_checksums` gives them, for at least every tag's current link
        (`repositories/<name>/_manifests/tags/<tag>/current/link`); other paths may come too and are the
        caller's to skip. An object store lists the repositories directory (`tag_links_in_listing`); a
        backend that can leave the rest unread does."""
        ...


def tag_links_in_listing(adapter: StorageAdapter) -> Iterator[tuple[str, str | None]]:
    """`list_tag_links` for a backend that cannot skip: one listing of the repositories directory."""
    return adapter.list_checksums(REPOSITORIES_DIRECTORY)


def blob_path(digest: str) -> str:
    algorithm, hex_digest = validate_digest(digest).split(":", 1)
    return f"{BLOBS_DIRECTORY}{algorithm}/{hex_digest[:2]}/{hex_digest}/data"


def manifest_revision_link(repository: str, digest: str) -> str:
    algorithm, hex_digest = validate_digest(digest).split(":", 1)
    repository = validate_repository(repository)
    return f"{REGISTRY_PREFIX}/repositories/{repository}/_manifests/revisions/{algorithm}/{hex_digest}/link"


def tag_link(repository: str, tag: str) -> str:
    repository, tag = validate_repository(repository), validate_tag(tag)
    return f"{REGISTRY_PREFIX}/repositories/{repository}/_manifests/tags/{tag}/current/link"


def blob_size(adapter: StorageAdapter, digest: str) -> int | None:
    """The size of a blob's data in the registry's storage, or None if the storage lacks it."""
    return adapter.object_size(blob_path(digest))


def tag_digest(adapter: StorageAdapter, repository: str, tag: str) -> str | None:
    """The digest a tag points at according to the storage, or None."""
    link = adapter.read_small(tag_link(repository, tag))
    return link.decode().strip() if link else None


def has_manifest_revision(adapter: StorageAdapter, repository: str, digest: str) -> bool:
    return adapter.read_small(manifest_revision_link(repository, digest)) is not None


def listed_md5(value: str | bytes | None, *, base64: bool = False) -> str | None:
    """A backend's MD5 of an object as 32 lowercase hex digits, or None when it is not a plain MD5."""
    if value is None:
        return None
    if base64:
        try:
            value = binascii.a2b_base64(value)
        except (binascii.Error, ValueError):
            return None
    text = value.hex() if isinstance(value, (bytes, bytearray)) else value.strip('"').lower()
    return text if _MD5.fullmatch(text) else None


def backend_failure(backend: str, operation: str, where: str, status: int | None, code: str | None) -> StorageError:
    """A StorageError from what a service answered; only status and error code, never its message text."""
    detail = f"HTTP {status}" if status is not None else "no answer"
    if code:
        detail += f" {code}"
    transient = status is None or status >= 500 or status in (408, 429)
    return StorageError(f"{backend} {operation} {where}: {detail}", transient=transient)
