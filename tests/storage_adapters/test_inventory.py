"""BlobInventory: blob sizes from one listing of a real storage (a directory, as the filesystem driver
lays it out), falling back to the adapter for whatever the listing cannot answer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from georeg.storage_adapters import BlobInventory, StorageError, build_adapter
from georeg.storage_adapters.base import blob_path
from tests.storage_adapters.backends import filesystem_backend, sha256, tag_link_path, write_image


class CountingAdapter:
    """A real filesystem adapter, counting what is asked of it."""

    def __init__(self, root: Path, *, listing_fails: bool = False) -> None:
        self.adapter = build_adapter({"filesystem": {"rootdirectory": str(root)}})
        self.listing_fails = listing_fails
        self.asked: list[str] = []
        self.listed = 0

    def location(self):  # type: ignore[no-untyped-def]
        return self.adapter.location()

    def connect(self) -> None:
        self.adapter.connect()

    def object_size(self, path: str) -> int | None:
        self.asked.append(path)
        return self.adapter.object_size(path)

    def read_small(self, path: str) -> bytes | None:
        self.asked.append(path)
        return self.adapter.read_small(path)

    def list_objects(self, directory: str) -> Iterator[tuple[str, int | None]]:
        self.listed += 1
        if self.listing_fails:
            raise StorageError("filesystem LIST docker/registry/v2/blobs/: denied")
        return self.adapter.list_objects(directory)


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    return tmp_path / "storage"


def test_sizes_come_from_one_listing(storage: Path) -> None:
    backend = filesystem_backend(storage)
    images = [write_image(backend, "", f"app{n}", "v1", layer_size=1000 + n) for n in range(3)]
    counting = CountingAdapter(storage)
    inventory = BlobInventory(counting)

    for n, image in enumerate(images):
        assert inventory.object_size(blob_path(image.layer_digest)) == 1000 + n
        assert inventory.object_size(blob_path(image.manifest_digest)) == len(image.manifest)

    assert (counting.listed, counting.asked, inventory.listings) == (1, [], 1)


def test_what_the_listing_lacks_is_asked_about_on_its_own(storage: Path) -> None:
    backend = filesystem_backend(storage)
    write_image(backend, "", "app", "v1")
    counting = CountingAdapter(storage)
    inventory = BlobInventory(counting)
    inventory.connect()  # the listing is taken now
    later = write_image(backend, "", "app", "v2", layer_size=4321)  # pushed after the listing
    absent = blob_path(sha256(b"never written"))

    assert inventory.object_size(blob_path(later.layer_digest)) == 4321
    assert inventory.object_size(absent) is None
    assert inventory.read_small(tag_link_path("app", "v2")) == later.manifest_digest.encode()  # not a blob
    assert counting.asked == [blob_path(later.layer_digest), absent, tag_link_path("app", "v2")]
    assert counting.listed == 1


def test_a_listing_is_taken_again_once_it_is_old(storage: Path) -> None:
    backend = filesystem_backend(storage)
    first = write_image(backend, "", "app", "v1")
    inventory = BlobInventory(CountingAdapter(storage))
    inventory.MAX_AGE_S = 0.0

    assert inventory.object_size(blob_path(first.layer_digest)) == len(first.layer)
    assert inventory.object_size(blob_path(first.manifest_digest)) == len(first.manifest)
    assert inventory.listings == 2


def test_beyond_the_cap_blobs_are_asked_about_on_their_own(storage: Path) -> None:
    backend = filesystem_backend(storage)
    images = [write_image(backend, "", f"app{n}", "v1", layer_size=500 + n) for n in range(3)]
    counting = CountingAdapter(storage)
    inventory = BlobInventory(counting)
    inventory.MAX_LISTED = 2  # of six blobs

    sizes = [inventory.object_size(blob_path(image.layer_digest)) for image in images]

    assert sizes == [500, 501, 502]
    assert counting.listed == 1 and 1 <= len(counting.asked) <= 3


def test_a_failed_listing_is_warned_about_once_and_every_blob_is_asked_about(
    storage: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image = write_image(filesystem_backend(storage), "", "app", "v1", layer_size=777)
    counting = CountingAdapter(storage, listing_fails=True)
    inventory = BlobInventory(counting)

    with caplog.at_level("WARNING", logger="georeg.storage"):
        inventory.connect()
        assert inventory.object_size(blob_path(image.layer_digest)) == 777
        assert inventory.object_size(blob_path(image.manifest_digest)) == len(image.manifest)

    assert counting.listed == 1 and len(counting.asked) == 2
    assert caplog.text.count("listing the blobs failed") == 1 and "denied" in caplog.text
