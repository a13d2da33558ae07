"""The registry-layout generator against the real registry binary: what it writes, the registry serves."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.images import MANIFEST_ACCEPT, OCI_INDEX, Pusher
from tests.support.registry import RegistryProcess
from tests.support.registry_layout import Layout, Shape, mutate, read_tags, write_primary

SKOPEO = "/usr/bin/skopeo"
SHAPE = Shape(repositories=7, tags=3, wide_repositories=1, wide_tags=12, index_every=4, seed=7)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Layout, RegistryProcess]]:
    """SHAPE written into a root, then a registry started on it."""
    root = tmp_path / "root"
    layout = write_primary(root, SHAPE)
    with RegistryProcess(tmp_path / "registry", storage={"filesystem": {"rootdirectory": str(root)}}) as registry:
        yield layout, registry


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _catalog(client: httpx.Client) -> list[str]:
    response = client.get("/v2/_catalog", params={"n": 1000})
    response.raise_for_status()
    return response.json()["repositories"]


def _check_manifest(client: httpx.Client, repository: str, reference: str, digest: str) -> dict:
    """GET by `reference` serves bytes hashing to `digest`, and so does GET by the digest; every blob it
    names is served with its digest and size. Returns the manifest."""
    headers = {"Accept": MANIFEST_ACCEPT}
    by_reference = client.get(f"/v2/{repository}/manifests/{reference}", headers=headers)
    by_digest = client.get(f"/v2/{repository}/manifests/{digest}", headers=headers)
    assert by_reference.status_code == by_digest.status_code == 200, by_reference.text
    assert _sha256(by_reference.content) == digest == by_reference.headers["Docker-Content-Digest"]
    assert by_digest.content == by_reference.content
    manifest = json.loads(by_reference.content)
    assert by_reference.headers["Content-Type"] == manifest["mediaType"]
    for descriptor in manifest.get("manifests", []):
        _check_manifest(client, repository, descriptor["digest"], descriptor["digest"])
    for descriptor in [manifest["config"], *manifest["layers"]] if "config" in manifest else []:
        blob = client.get(f"/v2/{repository}/blobs/{descriptor['digest']}")
        assert blob.status_code == 200, f"{repository} {descriptor}: {blob.status_code}"
        assert (_sha256(blob.content), len(blob.content)) == (descriptor["digest"], descriptor["size"])
    return manifest


def test_the_registry_serves_every_tag_and_blob_written(served: tuple[Layout, RegistryProcess]) -> None:
    layout, registry = served
    assert layout.tag_count == SHAPE.total_tags == 6 * 3 + 12
    with httpx.Client(base_url=registry.url, timeout=30) as client:
        assert _catalog(client) == sorted(layout.tags)
        media_types = set()
        for repository, tags in layout.tags.items():
            listed = client.get(f"/v2/{repository}/tags/list").json()["tags"]
            assert sorted(listed) == sorted(tags)
            for tag, digest in tags.items():
                media_types.add(_check_manifest(client, repository, tag, digest)["mediaType"])
    assert OCI_INDEX in media_types and len(media_types) == 4  # docker and OCI, images and indexes
    assert any(name.count("/") == 2 for name in layout.tags)  # nested names


def test_layers_are_shared_within_and_across_repositories(tmp_path: Path) -> None:
    layout = write_primary(tmp_path, Shape(repositories=4, tags=6, index_every=0, bases=2, deps_every=3))
    # Per tag: a config, its own layer and a manifest; per run of 3 tags a dependency layer; 2 bases.
    assert layout.blobs == 24 * 3 + 4 * 2 + 2


def test_the_same_seed_writes_the_same_digests(tmp_path: Path) -> None:
    first = write_primary(tmp_path / "a", SHAPE)
    again = write_primary(tmp_path / "b", SHAPE)
    other = write_primary(tmp_path / "c", Shape(**{**SHAPE.__dict__, "seed": 8}))
    assert first.tags == again.tags == read_tags(tmp_path / "a")
    assert set(first.tags) == set(other.tags)
    assert not {digest for tags in first.tags.values() for digest in tags.values()} & {
        digest for tags in other.tags.values() for digest in tags.values()
    }


def test_a_mutation_moves_adds_and_deletes_tags_the_registry_then_serves(
    served: tuple[Layout, RegistryProcess],
) -> None:
    layout, registry = served
    before = {repository: dict(tags) for repository, tags in layout.tags.items()}
    changes = mutate(layout, SHAPE, fraction=0.2)
    assert len(changes.moved) == len(changes.added) == 2 and 1 <= len(changes.deleted) <= 2
    assert read_tags(layout.root) == layout.tags
    with Pusher(registry.url) as client:
        for repository, tag in changes.moved:
            assert before[repository][tag] != layout.tags[repository][tag]
            assert client.head_manifest(repository, tag) == layout.tags[repository][tag]
        for repository, tag in changes.added:
            assert tag not in before[repository]
            assert client.head_manifest(repository, tag) == layout.tags[repository][tag]
        for repository, tag in changes.deleted:
            assert tag not in client.tags(repository) and client.head_manifest(repository, tag) is None


def test_skopeo_inspects_and_copies_a_generated_index(served: tuple[Layout, RegistryProcess], tmp_path: Path) -> None:
    layout, registry = served
    repository, tag, digest = next(
        (repository, tag, digest)
        for repository, tags in layout.tags.items()
        for tag, digest in tags.items()
        if _is_index(registry, repository, digest)
    )
    source = f"docker://127.0.0.1:{registry.port}/{repository}:{tag}"
    inspected = subprocess.run(
        [SKOPEO, "inspect", "--raw", "--tls-verify=false", source], capture_output=True, check=True, timeout=60
    )
    assert _sha256(inspected.stdout) == digest
    with RegistryProcess(tmp_path / "target") as target:
        destination = f"docker://127.0.0.1:{target.port}/{repository}:{tag}"
        copy = [SKOPEO, "copy", "--all", "--preserve-digests", "--src-tls-verify=false", "--dest-tls-verify=false"]
        subprocess.run(
            [*copy, source, destination],
            capture_output=True,
            check=True,
            timeout=120,
        )
        with Pusher(target.url) as copied:
            assert copied.head_manifest(repository, tag) == digest


def _is_index(registry: RegistryProcess, repository: str, digest: str) -> bool:
    with Pusher(registry.url) as client:
        return client.get_manifest(repository, digest)[1] == OCI_INDEX
