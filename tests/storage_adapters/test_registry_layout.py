"""A real docker-registry writes into each backend the Debian build supports; the adapter, made from
the same storage block (or from the registry's config.yml), must find what the registry wrote."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from georeg.storage_adapters import (
    BlobInventory,
    TagLinks,
    blob_size,
    build_adapter,
    has_manifest_revision,
    tag_digest,
)
from georeg.storage_adapters.base import blob_path
from tests.support.emulators import MotoServer, SwiftNode
from tests.support.images import Pusher, build_image, build_index
from tests.support.registry import RegistryProcess

StorageFactory = Callable[[str], dict[str, Any]]


def s3_storage(server: MotoServer, root: str) -> dict[str, Any]:
    return server.registry_storage(root)


def swift_storage(node: SwiftNode, prefix: str) -> dict[str, Any]:
    # The driver creates the container when it starts; one per registry keeps the runs apart.
    return node.registry_storage(f"registry-{uuid.uuid4().hex[:8]}", prefix)


@pytest.fixture(params=["filesystem", "s3", "s3-no-root", "swift", "swift-no-prefix"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RegistryProcess]:
    # A root with slashes on both ends: the swift driver keeps the inner one ("reg-x//files/...").
    root = "" if request.param.endswith(("no-root", "no-prefix")) else f"/reg-{uuid.uuid4().hex[:8]}/"
    storage: dict[str, Any] | None
    if request.param == "filesystem":
        storage = None  # RegistryProcess's default: a directory under tmp_path
    elif request.param.startswith("s3"):
        storage = s3_storage(request.getfixturevalue("moto_server"), root)
    else:
        storage = swift_storage(request.getfixturevalue("swift_node"), root)
    with RegistryProcess(tmp_path / "registry", storage=storage) as process:
        yield process


def test_the_adapter_finds_what_the_registry_wrote(registry: RegistryProcess) -> None:
    image = build_image(layer_sizes=[1500, 70_000])
    with Pusher(registry.url) as pusher:
        pusher.push_image("group/app", image, tag="v1")
    # The block as the registry has it, with its non-driver keys (delete, maintenance).
    adapter = build_adapter(registry.config["storage"])

    for blob in image.blobs:
        assert blob_size(adapter, blob.digest) == blob.size, blob.media_type
    assert blob_size(adapter, image.digest) == len(image.manifest)  # manifests are blobs too
    assert has_manifest_revision(adapter, "group/app", image.digest)
    assert tag_digest(adapter, "group/app", "v1") == image.digest
    assert tag_digest(adapter, "group/app", "v2") is None
    assert not has_manifest_revision(adapter, "group/other", image.digest)
    # One listing of the blob store finds the same blobs, under the same paths, as a shared backfill reads it.
    inventory = BlobInventory(adapter)
    for blob in image.blobs:
        assert inventory.object_size(blob_path(blob.digest)) == blob.size
    assert inventory.object_size(blob_path(image.digest)) == len(image.manifest)
    assert inventory.listings == 1


def test_tags_moved_and_indexes_are_seen(registry: RegistryProcess) -> None:
    first, second = build_image(layer_sizes=[100]), build_image(layer_sizes=[200])
    index = build_index([first, second], kind="oci")
    with Pusher(registry.url) as pusher:
        pusher.push_image("multi", first, tag="stable")
        pusher.push_image("multi", index, tag="stable")  # the tag moves to the index
    adapter = build_adapter(registry.config["storage"])

    assert tag_digest(adapter, "multi", "stable") == index.digest
    for manifest in (first, second, index):
        assert has_manifest_revision(adapter, "multi", manifest.digest)


def test_the_tag_links_in_the_storage_are_what_the_registry_answers(registry: RegistryProcess) -> None:
    first, second = build_image(layer_sizes=[100]), build_image(layer_sizes=[200])
    with Pusher(registry.url) as pusher:
        for tag in ("v1", "latest", "old"):
            pusher.push_image("group/app", first, tag=tag)
        pusher.push_image("group/app", second, tag="latest")  # moved: the link object is written again
        pusher.push_image("group/app/sub", second, tag="v1")  # a name under another repository's
        pusher.delete_manifest("group/app", first.digest)  # v1 and old go; the registry deletes their links
        pusher.push_image("group/app", first, tag="v1")
        heads = {
            repo: {tag: pusher.head_manifest(repo, tag) for tag in pusher.tags(repo)}
            for repo in ("group/app", "group/app/sub")
        }
    links = TagLinks(build_adapter(registry.config["storage"]))

    read = {repo: links.tags(repo, {}) for repo in heads}
    # Recorded as the registry answers: a listing with MD5s answers without reading a link.
    again = {repo: links.tags(repo, digests) for repo, digests in heads.items()}

    assert {repo: found.digests for repo, found in read.items() if found} == heads
    assert {repo: found.digests for repo, found in again.items() if found} == heads
    if registry.config["storage"].get("filesystem") is None:
        assert all(found is not None and found.links_read == 0 for found in again.values())


def test_the_registry_config_file_gives_the_same_adapter(registry: RegistryProcess) -> None:
    image = build_image(layer_sizes=[10])
    with Pusher(registry.url) as pusher:
        pusher.push_image("from-file", image, tag="v1")
    direct = build_adapter(registry.config["storage"])
    from_file = build_adapter({"registry_config": str(registry.config_path)})
    relative = build_adapter({"registry_config": registry.config_path.name}, base_dir=registry.config_path.parent)

    assert from_file.location() == direct.location() == relative.location()
    assert tag_digest(from_file, "from-file", "v1") == image.digest
