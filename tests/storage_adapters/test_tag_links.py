"""Reading the primary's tag -> digest from its storage (`TagLinks`), against each backend's emulator or
stand-in: a listing's MD5 spares reading links that still hold the recorded digest, and a storage that
cannot be read is left alone after one warning."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator

import pytest

from georeg.storage_adapters import StorageAdapter, StorageError, TagLinks
from georeg.storage_adapters.base import listed_md5
from tests.storage_adapters.backends import Backend, sha256, tag_link_path, write_image

# The backends whose listing shows each object's MD5 (a file system keeps none).
CHECKSUMMED = {"s3", "gcs", "azure", "swift", "oss"}
FAILED_LISTING = "s3 LIST bucket/docker/registry/v2/repositories/: HTTP 403 AccessDenied"


class CountingReads:
    """An adapter that counts the links read, and can be made to fail."""

    def __init__(self, adapter: StorageAdapter, *, failing: bool = False) -> None:
        self.adapter, self.failing = adapter, failing
        self.read: list[str] = []

    def location(self):  # type: ignore[no-untyped-def]
        return self.adapter.location()

    def connect(self) -> None:
        self.adapter.connect()

    def object_size(self, path: str) -> int | None:
        return self.adapter.object_size(path)

    def read_small(self, path: str) -> bytes | None:
        self.read.append(path)
        return self.adapter.read_small(path)

    def list_objects(self, directory: str) -> Iterator[tuple[str, int | None]]:
        return self.adapter.list_objects(directory)

    def list_checksums(self, directory: str) -> Iterator[tuple[str, str | None]]:
        if self.failing:
            raise StorageError(FAILED_LISTING, transient=False)
        return self.adapter.list_checksums(directory)

    def list_tag_links(self) -> Iterator[tuple[str, str | None]]:
        if self.failing:
            raise StorageError(FAILED_LISTING, transient=False)
        return self.adapter.list_tag_links()


def test_the_listing_shows_each_links_md5_where_the_backend_keeps_one(backend: Backend, root: str) -> None:
    image = write_image(backend, root, "group/app", "v1")
    adapter = backend.build(backend.params(root))

    checksums = dict(adapter.list_checksums("docker/registry/v2/repositories/group/app"))

    link_md5 = checksums[tag_link_path("group/app", "v1")]
    if backend.name in CHECKSUMMED:
        assert link_md5 == hashlib.md5(image.manifest_digest.encode()).hexdigest()
    else:
        assert link_md5 is None


def test_the_tag_links_listing_gives_every_tags_md5_on_every_backend(backend: Backend, root: str) -> None:
    images = {
        (repository, tag): write_image(backend, root, repository, tag)
        for repository in ("group", "group/app", "group/app/deep")  # repositories nested in repositories
        for tag in ("v1", "latest")
    }
    adapter = backend.build(backend.params(root))

    listed = dict(adapter.list_tag_links())

    for (repository, tag), image in images.items():
        assert listed[tag_link_path(repository, tag)] == hashlib.md5(image.manifest_digest.encode()).hexdigest()
    if backend.name == "filesystem":  # the walk skips the blob and revision links beside the tags
        assert sorted(listed) == sorted(tag_link_path(repository, tag) for repository, tag in images)


def test_tags_and_digests_equal_what_was_written_and_unchanged_links_are_not_read(backend: Backend, root: str) -> None:
    images = {tag: write_image(backend, root, "group/app", tag) for tag in ("v1", "v2", "latest")}
    other = write_image(backend, root, "group/app2", "v1")  # a name that starts like group/app's
    adapter = CountingReads(backend.build(backend.params(root)))
    links = TagLinks(adapter)

    first = links.tags("group/app", {})  # nothing recorded: every link is read
    assert first is not None and first.unsure == []
    assert first.digests == {tag: image.manifest_digest for tag, image in images.items()}
    assert first.links_read == 3
    # Recorded as they are, except one that moved since: only that one is read where MD5s are listed.
    recorded = dict(first.digests) | {"v2": sha256(b"an older image")}
    adapter.read.clear()

    again = links.tags("group/app", recorded)

    assert again is not None and again.digests == first.digests
    assert adapter.read == [tag_link_path("group/app", "v2")]  # a file system's walk read the rest
    assert links.tags("group/app2", {}).digests == {"v1": other.manifest_digest}  # type: ignore[union-attr]
    assert links.tags("group/none", {}) is None  # not in the storage: the registry is asked
    assert links.listings == 1  # one listing answered every repository


def test_a_link_being_rewritten_is_left_to_the_registry(backend: Backend, root: str) -> None:
    write_image(backend, root, "group/app", "v1")
    backend.put(root, tag_link_path("group/app", "v1"), b"")  # caught between truncate and write
    links = TagLinks(backend.build(backend.params(root)))

    found = links.tags("group/app", {})

    assert found is not None and found.digests == {} and found.unsure == ["v1"]


def test_a_storage_that_cannot_be_read_warns_once_and_is_not_asked_again(
    backend: Backend, root: str, caplog: pytest.LogCaptureFixture
) -> None:
    write_image(backend, root, "group/app", "v1")
    adapter = CountingReads(backend.build(backend.params(root)), failing=True)
    links = TagLinks(adapter)

    with caplog.at_level(logging.WARNING, logger="georeg.storage"):
        answers = [links.tags("group/app", {}) for _ in range(3)]

    assert answers == [None, None, None] and links.failed
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "HEAD requests" in warnings[0].getMessage()
    assert "403 AccessDenied" in warnings[0].getMessage()


def test_an_empty_storage_counts_as_unreadable(backend: Backend, root: str, caplog) -> None:  # type: ignore[no-untyped-def]
    links = TagLinks(backend.build(backend.params(root)))  # a root nothing was written to: a wrong block

    with caplog.at_level(logging.WARNING, logger="georeg.storage"):
        assert links.tags("group/app", {}) is None

    assert links.failed and "check primary.storage" in caplog.text


@pytest.mark.parametrize(
    ("value", "base64", "expected"),
    [
        ('"9E107D9D372BB6826BD81D3542A419D6"', False, "9e107d9d372bb6826bd81d3542a419d6"),
        ('"9e107d9d372bb6826bd81d3542a419d6-2"', False, None),  # a multipart upload's ETag
        ("nhB9nTcrtoJr2B01QqQZ1g==", True, "9e107d9d372bb6826bd81d3542a419d6"),
        (bytes.fromhex("9e107d9d372bb6826bd81d3542a419d6"), False, "9e107d9d372bb6826bd81d3542a419d6"),
        (None, False, None),
        ("not base64!", True, None),
    ],
)
def test_listed_md5_accepts_only_a_plain_md5(value: str | bytes | None, base64: bool, expected: str | None) -> None:
    assert listed_md5(value, base64=base64) == expected
