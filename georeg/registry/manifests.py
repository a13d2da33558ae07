"""Manifests as the registry serves them: the exact bytes, their media type, and what they reference.

The bytes are never re-serialised: a manifest's digest is the sha256 of the exact bytes, so a copy
that re-encodes JSON would change the image's identity on the secondary.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from georeg.errors import IntegrityError, InvalidReference, ReplicationError
from georeg.references import validate_digest

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"

IMAGE_MEDIA_TYPES = frozenset({DOCKER_MANIFEST, OCI_MANIFEST})
INDEX_MEDIA_TYPES = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})
MANIFEST_MEDIA_TYPES = IMAGE_MEDIA_TYPES | INDEX_MEDIA_TYPES

# Without all four the registry answers 404 for OCI content and may down-convert docker schema2.
MANIFEST_ACCEPT = ", ".join([DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX])
MAX_MANIFEST_BYTES = 4 * 1024 * 1024


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Descriptor:
    """A content-addressed reference to a blob or manifest, as it appears inside a manifest."""

    digest: str
    size: int
    media_type: str = ""

    @classmethod
    def from_json(cls, entry: Any) -> Descriptor:
        try:
            return cls(
                digest=validate_digest(entry["digest"]), size=int(entry["size"]), media_type=entry.get("mediaType", "")
            )
        except (KeyError, TypeError, ValueError, InvalidReference) as error:
            raise ReplicationError(f"malformed descriptor {entry!r:.200}: {error}") from None


@dataclass(frozen=True)
class Manifest:
    """A manifest's exact bytes plus the media type it was served with."""

    content: bytes
    media_type: str
    digest: str = field(default="")

    def __post_init__(self) -> None:
        actual = sha256_digest(self.content)
        if self.digest and self.digest != actual:
            raise IntegrityError(f"manifest bytes hash to {actual}, not {self.digest}: the source served corrupt data")
        object.__setattr__(self, "digest", actual)
        if self.media_type not in MANIFEST_MEDIA_TYPES:
            raise ReplicationError(
                f"manifest {actual} has media type {self.media_type!r}; georeg replicates docker schema2 and OCI "
                "manifests and indexes (convert schema1 images on the primary first)"
            )

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_MEDIA_TYPES

    def _json(self) -> dict[str, Any]:
        try:
            document = json.loads(self.content)
        except ValueError as error:
            raise ReplicationError(f"manifest {self.digest} is not valid JSON: {error}") from None
        if not isinstance(document, dict):
            raise ReplicationError(f"manifest {self.digest} is not a JSON object")
        return document

    def children(self) -> list[Descriptor]:
        """The manifests an index points at (empty for an image manifest)."""
        if not self.is_index:
            return []
        return [Descriptor.from_json(entry) for entry in self._json().get("manifests", [])]

    def blobs(self) -> list[Descriptor]:
        """The config and layer blobs an image manifest references (empty for an index)."""
        if self.is_index:
            return []
        document = self._json()
        entries = [document["config"]] if "config" in document else []
        entries += document.get("layers", [])
        return [Descriptor.from_json(entry) for entry in entries]
