"""Making one blob present in a repository of the secondary: skip it, mount it, or stream it across.

Small blobs travel in one PUT; large ones chunk by chunk, resumed at the registry's offset when a chunk
fails. Every byte is hashed on the way, and nothing is committed whose digest is not the one asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from enum import Enum

import httpx

from georeg.errors import IntegrityError, NotFound, TransientRegistryError
from georeg.registry import Descriptor, RegistryClient

logger = logging.getLogger("georeg.replication")


class BlobOutcome(str, Enum):
    PRESENT = "present"  # already linked in the repository: nothing sent
    MOUNTED = "mounted"  # linked from another repository of the secondary: nothing sent
    COPIED = "copied"  # streamed from the primary
    SHARED = "shared"  # in the storage both registries share: nothing sent


@dataclass(frozen=True)
class BlobCopy:
    digest: str
    outcome: BlobOutcome
    bytes_sent: int
    bytes_skipped: int = 0


class BlobLocations:
    """Which repository of a registry is known to hold a blob, so the next image can mount it; which
    blobs this process linked into which repository, so it never links one there twice; and which blobs
    are being copied right now, so concurrent copies of one blob send it only once.

    Linking twice matters: registry 2.8's filesystem driver rewrites a repository's link file in place
    (truncate, then write) on every upload or mount of the blob into it, and a manifest PUT or blob
    HEAD in that repository that reads the file meanwhile fails (400 DIGEST_INVALID, 500).

    Advisory and bounded: a wrong entry costs one refused mount, which falls back to an upload, or one
    HEAD that the procedure would have sent anyway.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self._capacity = capacity
        self._known: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._linked: OrderedDict[tuple[str, str, str], float] = OrderedDict()  # -> time.monotonic() seen
        # Per event loop: asyncio events cannot be shared between loops (tests run one per test).
        self._copying: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str], asyncio.Event]] = (
            weakref.WeakKeyDictionary()
        )

    async def wait_for_copies(self, registry_url: str, digest: str) -> bool:
        """Return once no copy of this blob to this registry is under way; whether there was one."""
        copying = self._copying.get(asyncio.get_running_loop(), {})
        waited = False
        while (done := copying.get((registry_url, digest))) is not None:
            waited = True
            await done.wait()
        return waited

    @contextlib.contextmanager
    def copying(self, registry_url: str, digest: str) -> Iterator[None]:
        """Mark a copy of this blob as under way while the block runs."""
        copying = self._copying.setdefault(asyncio.get_running_loop(), {})
        done = copying[(registry_url, digest)] = asyncio.Event()
        try:
            yield
        finally:
            del copying[(registry_url, digest)]
            done.set()

    def remember(self, registry_url: str, digest: str, repository: str) -> None:
        self._known[(registry_url, digest)] = repository
        self._known.move_to_end((registry_url, digest))
        self._linked[(registry_url, repository, digest)] = time.monotonic()
        self._linked.move_to_end((registry_url, repository, digest))
        for entries in (self._known, self._linked):
            while len(entries) > self._capacity:
                entries.popitem(last=False)

    def linked(self, registry_url: str, repository: str, digest: str, *, since: float) -> bool:
        """Whether this process has seen the blob linked in the repository (put it there, or found it)
        at or after `since`, a `time.monotonic()`."""
        seen = self._linked.get((registry_url, repository, digest))
        return seen is not None and seen >= since

    def find(self, registry_url: str, digest: str, *, other_than: str) -> str | None:
        repository = self._known.get((registry_url, digest))
        return repository if repository != other_than else None


# One per process: a backfill or a long-running receiver learns where blobs are as it copies.
BLOB_LOCATIONS = BlobLocations()


async def copy_blob(
    primary: RegistryClient,
    secondary: RegistryClient,
    repository: str,
    blob: Descriptor,
    locations: BlobLocations = BLOB_LOCATIONS,
    *,
    listed_empty_at: float | None = None,
) -> BlobCopy:
    """Make `blob` present in `repository` on the secondary: skip, mount, or stream it across.

    `listed_empty_at` is the `time.monotonic()` at which the secondary listed no tag of the repository,
    if it did: then a small blob (one PUT) is sent without a HEAD first, which would almost always
    answer 404. Should it be there after all, the registry takes the same bytes again and nothing is
    wrong. A blob this process has linked into such a repository since is known to be there without
    asking, as georeg only ever adds blob links: tags sharing layers sent 1.6 HEADs per tag of a
    cold backfill otherwise (benchmarks/scale.py). A link seen before the listing is not trusted: the
    registry's garbage collection may have emptied the repository in between."""

    def linked_since_listed_empty() -> bool:
        return listed_empty_at is not None and locations.linked(
            secondary.url, repository, blob.digest, since=listed_empty_at
        )

    if linked_since_listed_empty():
        return BlobCopy(blob.digest, BlobOutcome.PRESENT, 0, blob.size)
    ask_first = listed_empty_at is None or blob.size > secondary.settings.monolithic_max
    if ask_first and await secondary.blob_size(repository, blob.digest) is not None:
        locations.remember(secondary.url, blob.digest, repository)
        return BlobCopy(blob.digest, BlobOutcome.PRESENT, 0, blob.size)
    # Another image (of this repository too: a backfill copies its tags at once) may be sending this
    # blob: wait for it, then ask again, so that a blob shared by concurrent images travels once.
    # The loop ends only when no copy was under way, with no await since: this copy is the only one.
    while await locations.wait_for_copies(secondary.url, blob.digest):
        if linked_since_listed_empty() or await secondary.blob_size(repository, blob.digest) is not None:
            locations.remember(secondary.url, blob.digest, repository)
            return BlobCopy(blob.digest, BlobOutcome.PRESENT, 0, blob.size)
    with locations.copying(secondary.url, blob.digest):
        mount_from = locations.find(secondary.url, blob.digest, other_than=repository)
        location = await secondary.start_upload(repository, mount_from=mount_from, digest=blob.digest)
        if location is None:
            locations.remember(secondary.url, blob.digest, repository)
            return BlobCopy(blob.digest, BlobOutcome.MOUNTED, 0, blob.size)
        try:
            # Limits that hold across workers: one slot of each registry while bytes move.
            async with primary.limits.copy_slot(), secondary.limits.copy_slot():
                if blob.size <= secondary.settings.monolithic_max:
                    await _upload_whole(primary, secondary, repository, blob, location)
                else:
                    await _upload_in_chunks(primary, secondary, repository, blob, location)
        except BaseException:
            # Never leave an upload session behind; shielded so a cancelled task still cleans up.
            await asyncio.shield(secondary.cancel_upload(location))
            raise
        locations.remember(secondary.url, blob.digest, repository)
        return BlobCopy(blob.digest, BlobOutcome.COPIED, blob.size)


async def _upload_whole(
    primary: RegistryClient, secondary: RegistryClient, repository: str, blob: Descriptor, location: str
) -> None:
    """Small blobs: read, check, and send in one PUT."""
    async with primary.open_blob(repository, blob.digest) as response:
        data = b"".join([piece async for piece in response.aiter_raw()])
    _check_digest(blob, hashlib.sha256(data), len(data))
    await _commit(secondary, repository, blob, location, data)


async def _upload_in_chunks(
    primary: RegistryClient, secondary: RegistryClient, repository: str, blob: Descriptor, location: str
) -> None:
    """Large blobs: stream chunk by chunk through PATCH, hashing on the fly; memory stays one read buffer.

    When a chunk fails (the network, the secondary, or a token that expired mid-stream), ask the
    secondary how much it holds and resume from there, reading the primary from that offset with a
    Range request, instead of starting the blob again from zero.
    """
    chunk_size = secondary.settings.chunk_size
    hasher = hashlib.sha256()
    offset = 0
    resumes_left = secondary.settings.request_attempts
    while offset < blob.size:
        checkpoint, checkpoint_offset = hasher.copy(), offset
        try:
            async with primary.open_blob(repository, blob.digest, offset=offset) as response:
                chunks = _Chunks(response.aiter_raw(), hasher)
                while offset < blob.size:
                    checkpoint, checkpoint_offset = hasher.copy(), offset
                    length = min(chunk_size, blob.size - offset)
                    location = await secondary.upload_chunk(location, chunks.take(length), length)
                    offset += length
        except (TransientRegistryError, httpx.TransportError) as failure:
            if resumes_left == 0:
                raise _resumes_spent(secondary, blob, failure) from failure
            resumes_left -= 1
            received, location = await secondary.upload_offset(location)
            if received != checkpoint_offset:
                raise TransientRegistryError(
                    f"{secondary.name}: upload of {blob.digest} holds {received} bytes, expected "
                    f"{checkpoint_offset}; the copy restarts from zero"
                ) from failure
            logger.warning("%s; resuming %s at byte %d", failure, blob.digest, checkpoint_offset)
            hasher, offset = checkpoint, checkpoint_offset
    _check_digest(blob, hasher, offset)
    await _commit(secondary, repository, blob, location, b"")


class _Chunks:
    """Cuts a byte stream into bodies of exact lengths, hashing what passes; holds at most one read."""

    def __init__(self, source: AsyncIterator[bytes], hasher: hashlib._Hash) -> None:
        self._source = source
        self.hasher = hasher
        self._leftover = b""

    async def take(self, length: int) -> AsyncIterator[bytes]:
        remaining = length
        while remaining:
            piece, self._leftover = self._leftover, b""
            if not piece:
                try:
                    piece = await anext(self._source)
                except StopAsyncIteration:
                    raise TransientRegistryError(f"the primary's blob stream ended {remaining} bytes early") from None
            if len(piece) > remaining:
                piece, self._leftover = piece[:remaining], piece[remaining:]
            self.hasher.update(piece)
            remaining -= len(piece)
            yield piece


def _resumes_spent(
    secondary: RegistryClient, blob: Descriptor, failure: TransientRegistryError | httpx.TransportError
) -> TransientRegistryError:
    """The chunk copy is the layer that retries a stream: once its resumes are spent, nothing above retries."""
    spent = TransientRegistryError(
        f"{secondary.name}: copy of {blob.digest} failed after {secondary.settings.request_attempts} resumes: {failure}"
    )
    spent.exhausted = True
    return spent


def _check_digest(blob: Descriptor, hasher: hashlib._Hash, size: int) -> None:
    actual = "sha256:" + hasher.hexdigest()
    if actual != blob.digest or size != blob.size:
        raise IntegrityError(
            f"the primary served {size} bytes hashing to {actual} for blob {blob.digest} ({blob.size} bytes): "
            "the blob is corrupt on the primary; nothing was committed on the secondary"
        )


async def _commit(
    secondary: RegistryClient, repository: str, blob: Descriptor, location: str, last_bytes: bytes
) -> None:
    try:
        await secondary.complete_upload(location, blob.digest, last_bytes)
    except NotFound:
        # The commit may have landed before its answer was lost; an upload only vanishes once committed.
        if await secondary.blob_size(repository, blob.digest) != blob.size:
            raise
