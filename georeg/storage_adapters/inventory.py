"""A storage adapter that answers for blobs from one listing of the blob store, for bulk confirmation.

A backfill in shared mode confirms that every blob of every image is in the storage. Asked one at a
time, that is a request per blob per image, and a base layer forty images share is asked about forty
times. One listing of the blob store costs a request per thousand blobs and answers for all of them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

from georeg.storage_adapters.base import BLOBS_DIRECTORY, StorageAdapter, StorageError, StorageLocation

logger = logging.getLogger("georeg.storage")


class BlobInventory:
    """Wraps an adapter: a blob's size comes from the listing when the listing has the blob; everything
    else comes from the adapter, including a blob the listing lacks (written after it was taken, or
    beyond MAX_LISTED) or shows no size for (Swift's large objects). So the listing saves requests but
    never makes a present blob missing.

    A listing is taken when first needed (or by `connect`), and again once it is MAX_AGE_S old: until
    then a blob deleted since (by the registry's garbage collection, which only deletes blobs no
    manifest references) still counts as present. A listing that fails is not tried again; the adapter
    answers every blob, as it would without an inventory.
    """

    MAX_LISTED = 200_000  # about 40 MB of names and sizes; a larger store answers the rest blob by blob
    MAX_AGE_S = 300.0

    def __init__(self, storage: StorageAdapter) -> None:
        self.storage = storage
        self.listings = 0  # how many listings were taken, for the tests
        self._sizes: dict[str, int] | None = None
        self._taken_at = 0.0
        self._failed = False
        self._lock = threading.Lock()  # asked from many threads at once: one listing, which the others wait for

    def __repr__(self) -> str:
        return f"BlobInventory({self.storage!r})"

    def location(self) -> StorageLocation:
        return self.storage.location()

    def connect(self) -> None:
        """Make the client and take the listing now, so that the first confirmation does not wait."""
        self.storage.connect()
        self._listing()

    def object_size(self, path: str) -> int | None:
        if path.startswith(BLOBS_DIRECTORY):
            sizes = self._listing()
            if sizes is not None and path in sizes:
                return sizes[path]
        return self.storage.object_size(path)

    def read_small(self, path: str) -> bytes | None:
        return self.storage.read_small(path)

    def list_objects(self, directory: str) -> Iterator[tuple[str, int | None]]:
        return self.storage.list_objects(directory)

    def list_checksums(self, directory: str) -> Iterator[tuple[str, str | None]]:
        return self.storage.list_checksums(directory)

    def list_tag_links(self) -> Iterator[tuple[str, str | None]]:
        return self.storage.list_tag_links()

    def _listing(self) -> dict[str, int] | None:
        with self._lock:
            if self._failed:
                return None
            if self._sizes is None or time.monotonic() - self._taken_at > self.MAX_AGE_S:
                started = time.monotonic()
                try:
                    self._sizes = self._take()
                except StorageError as error:
                    logger.warning("listing the blobs failed (%s): each blob is asked about on its own", error)
                    self._failed = True
                    return None
                self._taken_at = started
                self.listings += 1
            return self._sizes

    def _take(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for path, size in self.storage.list_objects(BLOBS_DIRECTORY):
            if size is not None and path.endswith("/data"):
                sizes[path] = size
                if len(sizes) >= self.MAX_LISTED:
                    break
        logger.debug("listed %d blobs in %r", len(sizes), self.storage)
        return sizes
