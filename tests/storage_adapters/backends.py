"""One `Backend` per storage driver: how to configure an adapter for it and how to write objects into it
the way a registry lays them out, so one contract suite runs over every adapter."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from georeg.storage_adapters import StorageAdapter, build_adapter

REGISTRY_ROOT = "docker/registry/v2"


@dataclass
class Backend:
    """`params(root)` is a driver block; `put(root, path, data)` writes `path` (relative to the registry
    root, e.g. docker/registry/v2/blobs/...) where that driver keeps it under `root`."""

    name: str
    params: Callable[[str], dict[str, Any]]
    put: Callable[[str, str, bytes], None]
    # Parameter overrides that name different storage, by what they change ("endpoint", "bucket", "root").
    variants: dict[str, dict[str, Any]]
    required: list[str]
    bad_values: dict[str, Any]  # one parameter with a value of the wrong kind
    env_param: str  # a parameter to take from REGISTRY_STORAGE_<DRIVER>_<PARAM> instead (a secret where any)
    secrets: list[str] = field(default_factory=list)  # parameters (keys, ids, passwords) never to be shown
    credential_param: str | None = None  # the secret the test service checks, if it checks one
    # Secret parameters the test service ignores but the adapter still reads (gcs's emulator takes no
    # credentials): given only to the test that looks for secrets in what an adapter shows.
    unchecked_secrets: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # environment the adapter is made in
    root_spellings: Callable[[str], list[str]] = lambda root: [root, f"/{root}", f"{root}/", f"/{root}/"]

    def build(self, params: Mapping[str, Any], env: Mapping[str, str] | None = None) -> StorageAdapter:
        with environment({**self.env, **(env or {})}):
            return build_adapter({self.name: dict(params)})


@contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the block only (adapters read theirs when they are made)."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def cloud_key(root: str, path: str) -> str:
    """Where the s3, gcs, azure and oss drivers put `path`: the root with its slashes trimmed, then the path."""
    root = root.strip("/")
    return f"{root}/{path}" if root else path


def swift_key(prefix: str, path: str) -> str:
    """Where the swift driver puts `path`: `<prefix>/files/<path>`, only the outer slashes trimmed."""
    return f"{prefix}/files/{path}".strip("/")


def service_account_key() -> dict[str, str]:
    """A Google service-account key as its JSON key file holds it, with a new private key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return {
        "type": "service_account",
        "project_id": "georeg-test",
        "private_key_id": os.urandom(20).hex(),
        "private_key": pem,
        "client_email": "georeg@georeg-test.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    }


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_path(digest: str) -> str:
    hex_digest = digest.split(":", 1)[1]
    return f"{REGISTRY_ROOT}/blobs/sha256/{hex_digest[:2]}/{hex_digest}/data"


def revision_link_path(repository: str, digest: str) -> str:
    return f"{REGISTRY_ROOT}/repositories/{repository}/_manifests/revisions/sha256/{digest.split(':', 1)[1]}/link"


def tag_link_path(repository: str, tag: str) -> str:
    return f"{REGISTRY_ROOT}/repositories/{repository}/_manifests/tags/{tag}/current/link"


def tag_index_link_path(repository: str, tag: str, digest: str) -> str:
    return (
        f"{REGISTRY_ROOT}/repositories/{repository}/_manifests/tags/{tag}/index/sha256/{digest.split(':', 1)[1]}/link"
    )


@dataclass
class WrittenImage:
    repository: str
    tag: str
    layer: bytes
    manifest: bytes

    @property
    def layer_digest(self) -> str:
        return sha256(self.layer)

    @property
    def manifest_digest(self) -> str:
        return sha256(self.manifest)


def write_image(backend: Backend, root: str, repository: str, tag: str, layer_size: int = 3000) -> WrittenImage:
    """A layer, a manifest and a tag, written as a registry writes them (manifests are blobs too)."""
    manifest = json.dumps({"schemaVersion": 2, "nonce": os.urandom(8).hex()}).encode()
    image = WrittenImage(repository, tag, os.urandom(layer_size), manifest)
    backend.put(root, blob_path(image.layer_digest), image.layer)
    backend.put(root, blob_path(image.manifest_digest), image.manifest)
    backend.put(root, revision_link_path(repository, image.manifest_digest), image.manifest_digest.encode())
    backend.put(root, tag_link_path(repository, tag), image.manifest_digest.encode())
    backend.put(root, tag_index_link_path(repository, tag, image.manifest_digest), image.manifest_digest.encode())
    return image


def filesystem_backend(directory: Path) -> Backend:
    def put(root: str, path: str, data: bytes) -> None:
        target = directory / root.strip("/") / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    return Backend(
        name="filesystem",
        params=lambda root: {"rootdirectory": str(directory / root.strip("/"))},
        put=put,
        variants={"root": {"rootdirectory": str(directory / "elsewhere")}},
        required=[],
        bad_values={"maxthreads": "many"},
        env_param="rootdirectory",
        root_spellings=lambda root: [root],
    )
