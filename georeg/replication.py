"""Making one image on a secondary equal to the primary's: the procedure, as plain async functions.

`replicate` is the one procedure: the event flow and the backfill both call it (the Prefect task
`copy-image` wraps it), and everything here runs and is tested without Prefect. The order is what
keeps a secondary honest: every blob is in the repository before any manifest that references it,
child manifests before their index, and the tag last, so a failure at any point leaves no manifest on
the secondary that points at something missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from georeg.blob_copy import BlobCopy, BlobOutcome, copy_blob
from georeg.concurrency import all_or_nothing, bounded
from georeg.config import ReplicationConfig
from georeg.errors import ReplicationError
from georeg.references import ImageReference
from georeg.registry import Descriptor, Manifest, RegistryClient
from georeg.retries import retry_budget
from georeg.storage_adapters import StorageAdapter
from georeg.storage_adapters import blob_size as storage_blob_size

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


# --- the whole image ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageReplication:
    reference: ImageReference
    digest: str
    manifests: int
    copies: tuple[BlobCopy, ...]
    children: tuple[str, ...] = ()  # the digests of an index's child manifests, which it put too
    seconds: float = 0.0

    @property
    def bytes_copied(self) -> int:
        return sum(copy.bytes_sent for copy in self.copies)

    @property
    def bytes_skipped(self) -> int:
        return sum(copy.bytes_skipped for copy in self.copies)

    def count(self, outcome: BlobOutcome) -> int:
        return sum(copy.outcome is outcome for copy in self.copies)

    def summary(self) -> dict[str, object]:
        """What a flow run returns and shows for the image."""
        return {
            "image": str(self.reference),
            "digest": self.digest,
            "manifests": self.manifests,
            **{f"blobs_{outcome.value}": self.count(outcome) for outcome in BlobOutcome},
            "bytes_copied": self.bytes_copied,
            "bytes_skipped": self.bytes_skipped,
            "seconds": round(self.seconds, 3),
        }


async def replicate(
    primary: RegistryClient,
    secondary: RegistryClient,
    reference: ImageReference,
    settings: ReplicationConfig,
    *,
    shared_storage: StorageAdapter | None = None,
    listed_empty_at: float | None = None,
) -> ImageReplication:
    """The one procedure that makes an image on a secondary equal to the primary's, for the event flow
    and the backfill alike: resolve it on the primary, make every blob present, put the manifests
    children first and the reference last, and make sure the secondary serves the primary's digest.

    With `shared_storage` (the secondary's storage, which the primary shares), nothing is copied:
    the image is confirmed instead. `listed_empty_at`: the moment the secondary listed no tag of the
    repository, if it did; its small blobs are then sent without asking first (see `copy_blob`).

    Every request of the image draws its retries from one budget, `settings.retries_per_image`, so a
    registry that is down costs a bounded number of requests however many blobs the image has."""
    started = time.monotonic()
    with retry_budget(settings.retries_per_image):
        image = await resolve_image(primary, reference)
        if shared_storage is not None:
            copies = await confirm_shared(secondary, shared_storage, image)  # what verifying would ask, it asks
        else:
            copies = await copy_blobs(
                primary, secondary, image, settings.concurrency.blobs_per_image, listed_empty_at=listed_empty_at
            )
            if not await put_manifests(secondary, image):
                await verify_replica(secondary, image)
    return ImageReplication(
        reference,
        image.digest,
        len(image.manifests),
        tuple(copies),
        children=tuple(manifest.digest for manifest in image.manifests[:-1]),
        seconds=time.monotonic() - started,
    )


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
    listed_empty_at: float | None = None,
) -> list[BlobCopy]:
    room = asyncio.Semaphore(concurrency)
    repository = image.reference.repository
    return await all_or_nothing(
        bounded(room, copy_blob(primary, secondary, repository, blob, listed_empty_at=listed_empty_at))
        for blob in image.blobs()
    )


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
