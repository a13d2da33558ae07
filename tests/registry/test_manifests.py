"""Manifest parsing: exact bytes, digests, references, and media types georeg refuses."""

from __future__ import annotations

import json

import pytest

from georeg.errors import IntegrityError, ReplicationError
from georeg.registry.manifests import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MANIFEST_ACCEPT,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Manifest,
    sha256_digest,
)
from tests.support.images import build_image, build_index, build_signature

SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"


@pytest.mark.parametrize("kind", ["docker", "oci"])
def test_image_manifest_blobs(kind: str) -> None:
    image = build_image(kind, layer_sizes=[10, 20, 30])
    manifest = Manifest(image.manifest, image.media_type)
    assert manifest.content is image.manifest
    assert manifest.digest == image.digest == sha256_digest(image.manifest)
    assert not manifest.is_index and manifest.children() == []
    assert manifest.blobs() == [Descriptor(b.digest, b.size, b.media_type) for b in image.blobs]
    assert manifest.blobs()[0].media_type.endswith(("config.v1+json", "image.v1+json"))  # the config comes first


@pytest.mark.parametrize(("kind", "media_type"), [("docker", DOCKER_MANIFEST_LIST), ("oci", OCI_INDEX)])
def test_index_children(kind: str, media_type: str) -> None:
    children = [build_image(kind), build_image(kind, platform=("linux", "arm64"))]
    index = build_index(children, kind)
    manifest = Manifest(index.manifest, media_type, index.digest)
    assert manifest.is_index and manifest.blobs() == []
    assert manifest.children() == [Descriptor(c.digest, len(c.manifest), c.media_type) for c in children]


def test_signature_manifest_blobs() -> None:
    _, signature = build_signature(build_image("docker"))
    manifest = Manifest(signature.manifest, OCI_MANIFEST)
    assert [blob.digest for blob in manifest.blobs()] == [blob.digest for blob in signature.blobs]


def test_bytes_are_never_reserialised() -> None:
    content = (
        b'{"schemaVersion": 2,\n   "mediaType": "%s", "config": {"mediaType": "a", "size": 3, "digest": "sha256:%s"},'
    )
    content = content % (OCI_MANIFEST.encode(), b"1" * 64) + b' "layers": []}\n\n'
    manifest = Manifest(content, OCI_MANIFEST)
    assert manifest.digest == sha256_digest(content)
    assert manifest.digest != sha256_digest(json.dumps(json.loads(content)).encode())
    assert manifest.blobs() == [Descriptor("sha256:" + "1" * 64, 3, "a")]


def test_image_without_config_or_layers() -> None:
    assert Manifest(b'{"schemaVersion": 2}', DOCKER_MANIFEST).blobs() == []
    assert Manifest(b'{"schemaVersion": 2}', OCI_INDEX).children() == []


def test_digest_mismatch_is_an_integrity_error() -> None:
    image = build_image("docker")
    other = "sha256:" + "0" * 64
    with pytest.raises(IntegrityError) as caught:
        Manifest(image.manifest, image.media_type, other)
    assert other in str(caught.value) and image.digest in str(caught.value)
    assert Manifest(image.manifest, image.media_type, image.digest).digest == image.digest


@pytest.mark.parametrize(
    "media_type", [SCHEMA1_SIGNED, "application/vnd.docker.distribution.manifest.v1+json", "application/json", ""]
)
def test_unsupported_media_type(media_type: str) -> None:
    content = json.dumps({"schemaVersion": 1, "name": "app", "tag": "v1", "fsLayers": []}).encode()
    with pytest.raises(ReplicationError) as caught:
        Manifest(content, media_type)
    message = str(caught.value)
    assert repr(media_type) in message and sha256_digest(content) in message
    assert "schema1" in message and "schema2" in message
    assert not isinstance(caught.value, IntegrityError)


@pytest.mark.parametrize(("content", "problem"), [(b"{not json", "not valid JSON"), (b"[1, 2]", "not a JSON object")])
def test_unparseable_manifest(content: bytes, problem: str) -> None:
    manifest = Manifest(content, OCI_MANIFEST)  # the bytes are kept; parsing happens on use
    with pytest.raises(ReplicationError, match=problem):
        manifest.blobs()
    with pytest.raises(ReplicationError, match=problem):
        Manifest(content, OCI_INDEX).children()


def test_descriptor_from_json() -> None:
    entry = {"mediaType": OCI_MANIFEST, "size": "42", "digest": "sha256:" + "2" * 64, "platform": {"os": "linux"}}
    assert Descriptor.from_json(entry) == Descriptor("sha256:" + "2" * 64, 42, OCI_MANIFEST)
    assert Descriptor.from_json({"size": 1, "digest": "sha256:" + "0" * 64}).media_type == ""


@pytest.mark.parametrize(
    "entry",
    [
        {"size": 1},
        {"digest": "sha256:" + "0" * 64},
        {"size": 1, "digest": "sha256:00"},
        {"size": "x", "digest": 1},
        "no",
    ],
)
def test_a_malformed_descriptor_is_a_replication_error(entry) -> None:
    with pytest.raises(ReplicationError, match="malformed descriptor"):
        Descriptor.from_json(entry)


def test_accept_header_names_all_four_types() -> None:
    accepted = [part.strip() for part in MANIFEST_ACCEPT.split(",")]
    assert sorted(accepted) == sorted([DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX])
