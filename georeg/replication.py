"""Making one image on a secondary equal to the primary's: the procedure, as plain async functions.

The Prefect tasks in `georeg.tasks` wrap these one-to-one; everything here runs and is tested
without Prefect. The order is what keeps a secondary honest: every blob is in the repository
before any manifest that references it, child manifests before their index, and the tag last,
so a failure at any point leaves no manifest on the secondary that points at something missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import TypeVar

import httpx

from georeg.errors import IntegrityError, NotFound, ReplicationError, TransientRegistryError
from georeg.references import ImageReference, is_digest
from georeg.registry import Descriptor, Manifest, RegistryClient
from georeg.storage_adapters import StorageAdapter
from georeg.storage_adapters import blob_size as storage_blob_size

logger = logging.getLogger("georeg.replication")
T = TypeVar("T")


# --- what an image is made of --------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedImage:
    """An image as the primary has it: its manifests in push order (children first) and its blobs."""

    reference: ImageReference
    manifests: tuple[Manifest, ...]

    @property
    def top(self) -> Manifest:
        return self.manifests[-1]

    @property
    def digest(self) -> str:
        return self.top.digest

    def blobs(self) -> list[Descriptor]:
        unique: dict[str, Descriptor] = {}
        for manifest in self.manifests:
            for blob in manifest.blobs():
                unique.setdefault(blob.digest, blob)
        return list(unique.values())


async def resolve_image(primary: RegistryClient, reference: ImageReference) -> ResolvedImage:
    """Fetch the manifest and, for an index, every child (depth first, children before parents)."""

    async def collect(digest_or_tag: str) -> list[Manifest]:
        manifest = await primary.get_manifest(reference.repository, digest_or_tag)
        nested = await asyncio.gather(*(collect(child.digest) for child in manifest.children()))
        return [m for group in nested for m in group] + [manifest]

    manifests = await collect(reference.reference)
    unique = list({m.digest: m for m in manifests}.values())
    return ResolvedImage(reference, tuple(unique))


# --- blobs ---------------------------------------------------------------------------------------


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
    """Which repository of a registry is known to hold a blob, so the next image can mount it, and
    which blobs are being copied right now, so concurrent copies of one blob send it only once.

    Advisory and bounded: a wrong entry costs one refused mount, which falls back to an upload.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self._capacity = capacity
        self._known: OrderedDict[tuple[str, str], str] = OrderedDict()
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
        while len(self._known) > self._capacity:
            self._known.popitem(last=False)

    def holder(self, registry_url: str, digest: str) -> str | None:
        """The repository last known to hold the blob."""
        return self._known.get((registry_url, digest))

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
    fresh_repository: bool = False,
) -> BlobCopy:
    """Make `blob` present in `repository` on the secondary: skip, mount, or stream it across.

    `fresh_repository` says the secondary listed no tag of the repository: then a small blob (one
    PUT) is sent without a HEAD first, which would almost always answer 404. Should it be there after
    all, the registry takes the same bytes again and nothing is wrong; a blob this process has put
    in the repository itself is still asked for, so tags sharing layers do not send them twice."""
    ask_first = (
        not fresh_repository
        or blob.size > secondary.settings.monolithic_max
        or locations.holder(secondary.url, blob.digest) == repository
    )
    if ask_first and await secondary.blob_size(repository, blob.digest) is not None:
        locations.remember(secondary.url, blob.digest, repository)
        return BlobCopy(blob.digest, BlobOutcome.PRESENT, 0, blob.size)
    # Another image (of this repository too: a backfill copies its tags at once) may be sending this
    # blob: wait for it, then ask again, so that a blob shared by concurrent images travels once.
    # The loop ends only when no copy was under way, with no await since: this copy is the only one.
    while await locations.wait_for_copies(secondary.url, blob.digest):
        if await secondary.blob_size(repository, blob.digest) is not None:
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
                raise
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


# --- the whole image ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageReplication:
    reference: ImageReference
    digest: str
    manifests: int
    copies: tuple[BlobCopy, ...]

    @property
    def bytes_copied(self) -> int:
        return sum(copy.bytes_sent for copy in self.copies)

    @property
    def bytes_skipped(self) -> int:
        return sum(copy.bytes_skipped for copy in self.copies)

    def count(self, outcome: BlobOutcome) -> int:
        return sum(copy.outcome is outcome for copy in self.copies)


async def replicate(
    primary: RegistryClient,
    secondary: RegistryClient,
    reference: ImageReference,
    *,
    concurrency: int,
    shared_storage: StorageAdapter | None = None,
    fresh_repository: bool = False,
) -> ImageReplication:
    """The whole procedure for one image in one call, for bulk work (backfill). The replicate-image
    flow runs the same steps as separate Prefect tasks, for their retries and visibility.

    With `shared_storage` (the secondary's storage, which the primary shares), nothing is copied:
    the image is confirmed instead. `fresh_repository`: the secondary listed no tag of the repository,
    so its small blobs are sent without asking first whether it has them (see `copy_blob`)."""
    image = await resolve_image(primary, reference)
    if shared_storage is not None:
        copies = await confirm_shared(secondary, shared_storage, image)  # what verifying would ask, it asks
    else:
        copies = await copy_blobs(primary, secondary, image, concurrency, fresh_repository=fresh_repository)
        if not await put_manifests(secondary, image):
            await verify_replica(secondary, image)
    return ImageReplication(reference, image.digest, len(image.manifests), tuple(copies))


async def confirm_shared(secondary: RegistryClient, storage: StorageAdapter, image: ResolvedImage) -> list[BlobCopy]:
    """Shared storage: what the primary wrote is the secondary's. Confirm it rather than trust it: the
    secondary serves the image under its reference with the primary's digest, and an index's children
    by digest; every blob is in the storage with its size. Anything missing or different is an error."""
    repository = image.reference.repository
    blobs = image.blobs()
    # Every check at once: each is a round trip (a storage call in a worker thread, as the adapters'
    # SDKs block) and nothing about one depends on another.
    served, children, sizes = await asyncio.gather(
        secondary.head_manifest(repository, image.reference.reference),
        asyncio.gather(*(secondary.head_manifest(repository, child.digest) for child in image.manifests[:-1])),
        asyncio.gather(*(asyncio.to_thread(storage_blob_size, storage, blob.digest) for blob in blobs)),
    )
    hint = "although it shares the primary's storage: check that both registries use the same storage block"
    if served is None or served.digest != image.digest:
        raise ReplicationError(
            f"{secondary.name} serves {image.reference} as {served.digest if served else 'nothing'}, expected "
            f"{image.digest}, {hint}"
        )
    for child, head in zip(image.manifests[:-1], children, strict=True):
        if head is None:
            raise ReplicationError(
                f"{secondary.name} does not serve manifest {child.digest} of {image.reference} {hint}"
            )
    for blob, size in zip(blobs, sizes, strict=True):
        if size != blob.size:
            found = "is missing from" if size is None else f"has {size} bytes, not {blob.size}, in"
            raise ReplicationError(f"blob {blob.digest} of {image.reference} {found} the shared storage")
    return [BlobCopy(blob.digest, BlobOutcome.SHARED, 0, blob.size) for blob in blobs]


async def copy_blobs(
    primary: RegistryClient,
    secondary: RegistryClient,
    image: ResolvedImage,
    concurrency: int,
    *,
    fresh_repository: bool = False,
) -> list[BlobCopy]:
    room = asyncio.Semaphore(concurrency)
    repository = image.reference.repository
    return await asyncio.gather(
        *(
            bounded(room, copy_blob(primary, secondary, repository, blob, fresh_repository=fresh_repository))
            for blob in image.blobs()
        )
    )


async def bounded(semaphore: asyncio.Semaphore, work: Awaitable[T]) -> T:
    """Await `work` once `semaphore` has room: bounds how many copies run at once."""
    async with semaphore:
        return await work


# --- manifests -----------------------------------------------------------------------------------


# Manifest PUTs in flight, per event loop (locks belong to one): see `put_manifests`.
_MANIFEST_PUTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, ...], _SharedLock]] = (
    weakref.WeakKeyDictionary()
)


@dataclass
class _SharedLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


@contextlib.asynccontextmanager
async def _one_at_a_time(*key: str) -> AsyncIterator[None]:
    """Hold the lock named `key` while the block runs; it is forgotten once nobody holds or waits for it."""
    locks = _MANIFEST_PUTS.setdefault(asyncio.get_running_loop(), {})
    shared = locks.setdefault(key, _SharedLock())
    shared.users += 1
    try:
        async with shared.lock:
            yield
    finally:
        shared.users -= 1
        if not shared.users:
            del locks[key]


async def put_manifests(secondary: RegistryClient, image: ResolvedImage) -> bool:
    """Children by digest first (an index needs them present), then the top under its tag or digest.

    Registry 2.8 on filesystem storage rewrites link and data files in place, and checks a manifest
    by reading the links of what it references: a manifest PUT that overlaps another PUT into the same
    repository (a second tag of the image, an index's child) or of the same manifest elsewhere can
    read a half-written file and fail with DIGEST_INVALID. So PUTs into one repository take turns, and
    so do PUTs of one digest; blobs still travel all at once.

    Returns whether the secondary's answer to the last PUT named the image's digest: then the
    reference is known to serve it and a verifying HEAD would only ask the same question again."""
    repository = image.reference.repository
    async with _one_at_a_time(secondary.url, repository):
        for child in image.manifests[:-1]:
            async with _one_at_a_time(secondary.url, child.digest):
                await secondary.put_manifest(repository, child.digest, child)
        async with _one_at_a_time(secondary.url, image.digest):
            stored = await secondary.put_manifest(repository, image.reference.reference, image.top)
    return stored == image.digest


async def verify_replica(secondary: RegistryClient, image: ResolvedImage) -> None:
    """Ask the secondary what it now serves under the reference: it must be the primary's digest."""
    served = await secondary.head_manifest(image.reference.repository, image.reference.reference)
    if served is None or served.digest != image.digest:
        raise ReplicationError(
            f"{secondary.name} serves {image.reference} as {served.digest if served else 'nothing'} "
            f"after replication, expected {image.digest}"
        )


# --- deletions -----------------------------------------------------------------------------------


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
