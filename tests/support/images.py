"""Build random images in memory and push them with plain httpx, independent of georeg's client."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx

from .registry import TokenAuthSetup
from .tokens import mint_token, repository_access

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST_ACCEPT = ", ".join([DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX])

DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
COSIGN_LAYER = "application/vnd.dev.cosign.simplesigning.v1+json"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Blob:
    """A config or layer blob with the media type its manifest descriptor uses."""

    digest: str
    data: bytes
    media_type: str

    @property
    def size(self) -> int:
        return len(self.data)

    @classmethod
    def of(cls, data: bytes, media_type: str) -> Blob:
        return cls(digest=sha256_digest(data), data=data, media_type=media_type)

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "size": self.size, "digest": self.digest}


@dataclass
class Image:
    """A manifest (exact bytes, as the digest depends on them) plus what it references."""

    manifest: bytes
    media_type: str
    blobs: list[Blob] = field(default_factory=list)
    children: list[Image] = field(default_factory=list)

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)

    def all_blobs(self) -> list[Blob]:
        """Own and children's blobs, each digest once."""
        unique: dict[str, Blob] = {}
        for blob in self.blobs:
            unique.setdefault(blob.digest, blob)
        for child in self.children:
            for blob in child.all_blobs():
                unique.setdefault(blob.digest, blob)
        return list(unique.values())


def random_blob(size: int, media_type: str = OCI_LAYER) -> Blob:
    """Random bytes so that no two tests share a blob by accident."""
    return Blob.of(os.urandom(size), media_type)


def _manifest_bytes(media_type: str, config: Blob, layers: list[Blob], annotations: dict[str, str] | None) -> bytes:
    body: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in layers],
    }
    if annotations:
        body["annotations"] = annotations
    return json.dumps(body, indent=2).encode()


def build_image(
    kind: str = "docker",
    layer_sizes: list[int] | None = None,
    platform: tuple[str, str] = ("linux", "amd64"),
    annotations: dict[str, str] | None = None,
    layers: list[Blob] | None = None,
) -> Image:
    """A single-platform image; the config carries a random field so every image digest is unique.

    `layers` reuses given blobs (to share a layer between images) instead of making random ones.
    """
    if kind not in ("docker", "oci"):
        raise ValueError(f"kind must be 'docker' or 'oci', not {kind!r}")
    sizes = [1024, 2048] if layer_sizes is None else layer_sizes
    docker = kind == "docker"
    os_name, architecture = platform
    if layers is None:
        layers = [random_blob(size, DOCKER_LAYER if docker else OCI_LAYER) for size in sizes]
    config_body = {
        "architecture": architecture,
        "os": os_name,
        "config": {"Labels": {"georeg.test.nonce": os.urandom(8).hex()}},
        "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
    }
    config = Blob.of(json.dumps(config_body).encode(), DOCKER_CONFIG if docker else OCI_CONFIG)
    media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    return Image(_manifest_bytes(media_type, config, layers, annotations), media_type, [config, *layers])


def build_index(children: list[Image], kind: str = "docker") -> Image:
    """A manifest list / OCI index over children; platforms are read back from each child's config."""
    if kind not in ("docker", "oci"):
        raise ValueError(f"kind must be 'docker' or 'oci', not {kind!r}")
    media_type = DOCKER_LIST if kind == "docker" else OCI_INDEX
    entries = []
    for child in children:
        config = json.loads(child.blobs[0].data) if child.blobs else {}
        entries.append(
            {
                "mediaType": child.media_type,
                "size": len(child.manifest),
                "digest": child.digest,
                "platform": {
                    "os": config.get("os", "linux"),
                    "architecture": config.get("architecture", "amd64"),
                },
            }
        )
    body = {"schemaVersion": 2, "mediaType": media_type, "manifests": entries}
    return Image(json.dumps(body, indent=2).encode(), media_type, [], list(children))


def build_signature(target: Image) -> tuple[str, Image]:
    """A cosign-style signature: tag `sha256-<hex>.sig`, an OCI manifest with a simplesigning layer."""
    algorithm, hex_digest = target.digest.split(":", 1)
    payload = {
        "critical": {
            "identity": {"docker-reference": "georeg.test/signed"},
            "image": {"docker-manifest-digest": target.digest},
            "type": "cosign container image signature",
        },
        "optional": {"nonce": os.urandom(8).hex()},
    }
    layer = Blob.of(json.dumps(payload).encode(), COSIGN_LAYER)
    config = Blob.of(json.dumps({"architecture": "", "os": "", "rootfs": {"type": "layers"}}).encode(), OCI_CONFIG)
    layer_descriptor = {
        **layer.descriptor(),
        "annotations": {"dev.cosignproject.cosign/signature": "MEUC-test"},
    }
    body = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer_descriptor],
    }
    image = Image(json.dumps(body, indent=2).encode(), OCI_MANIFEST, [config, layer])
    return f"{algorithm}-{hex_digest}.sig", image


class Pusher:
    """Pushes fixtures into a registry over the plain HTTP API (with self-minted tokens if needed)."""

    def __init__(self, base_url: str, token_setup: TokenAuthSetup | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token_setup = token_setup
        self.client = httpx.Client(base_url=self.base_url, timeout=30.0)

    def _headers(self, repo: str, method: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        if self.token_setup is not None:
            actions = ["pull", "push", "delete"] if method == "DELETE" else ["pull", "push"]
            token = mint_token(self.token_setup, [repository_access(repo, actions)])
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _request(
        self,
        method: str,
        repo: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        return self.client.request(method, url, headers=self._headers(repo, method, headers), content=content)

    def blob_exists(self, repo: str, digest: str) -> bool:
        response = self._request("HEAD", repo, f"/v2/{repo}/blobs/{digest}")
        if response.status_code == 404:
            return False
        response.raise_for_status()
        return True

    def push_blob(self, repo: str, blob: Blob) -> None:
        """Monolithic upload: POST to open a session, then PUT <Location>&digest= with the whole body."""
        if self.blob_exists(repo, blob.digest):
            return
        opened = self._request("POST", repo, f"/v2/{repo}/blobs/uploads/")
        assert opened.status_code == 202, f"upload POST: {opened.status_code} {opened.text}"
        location = httpx.URL(self.base_url + "/").join(opened.headers["Location"])
        location = location.copy_merge_params({"digest": blob.digest})
        done = self._request(
            "PUT",
            repo,
            str(location),
            headers={"Content-Type": "application/octet-stream"},
            content=blob.data,
        )
        assert done.status_code == 201, f"upload PUT: {done.status_code} {done.text}"

    def push_image(self, repo: str, image: Image, tag: str | None = None) -> None:
        """Blobs, then children by digest, then the manifest itself, as the registry requires."""
        for blob in image.blobs:
            self.push_blob(repo, blob)
        for child in image.children:
            self.push_image(repo, child)
        reference = tag or image.digest
        response = self._request(
            "PUT",
            repo,
            f"/v2/{repo}/manifests/{reference}",
            headers={"Content-Type": image.media_type},
            content=image.manifest,
        )
        assert response.status_code == 201, f"manifest PUT: {response.status_code} {response.text}"
        assert response.headers.get("Docker-Content-Digest") == image.digest

    def delete_manifest(self, repo: str, digest: str) -> None:
        response = self._request("DELETE", repo, f"/v2/{repo}/manifests/{digest}")
        assert response.status_code == 202, f"manifest DELETE: {response.status_code} {response.text}"

    def head_manifest(self, repo: str, reference: str) -> str | None:
        """The digest a reference resolves to, or None if it does not exist."""
        response = self._request("HEAD", repo, f"/v2/{repo}/manifests/{reference}", headers={"Accept": MANIFEST_ACCEPT})
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.headers["Docker-Content-Digest"]

    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str]:
        """Exact manifest bytes and their media type."""
        response = self._request("GET", repo, f"/v2/{repo}/manifests/{reference}", headers={"Accept": MANIFEST_ACCEPT})
        response.raise_for_status()
        return response.content, response.headers["Content-Type"]

    def tags(self, repo: str) -> list[str]:
        response = self._request("GET", repo, f"/v2/{repo}/tags/list")
        if response.status_code == 404:
            return []
        response.raise_for_status()
        return list(response.json().get("tags") or [])

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Pusher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
