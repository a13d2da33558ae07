"""Write a small multi-arch image (an OCI index over linux/amd64 and linux/arm64) as an OCI layout,
for the demo to push to the primary with skopeo.

Usage: python scripts/demo_image.py LAYOUT_DIR TAG
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def main(layout: Path, tag: str) -> None:
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    children = [image_for(layout, architecture) for architecture in ("amd64", "arm64")]
    index = write_blob(
        layout, OCI_INDEX, json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children})
    )
    index["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [index]}))


def image_for(layout: Path, architecture: str) -> dict[str, Any]:
    text = f"hello from georeg, replicated digest for digest ({architecture})\n".encode()
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        entry = tarfile.TarInfo("hello.txt")
        entry.size = len(text)
        tar.addfile(entry, io.BytesIO(text))
    layer = archive.getvalue()
    config = {
        "architecture": architecture,
        "os": "linux",
        "config": {"Cmd": ["cat", "/hello.txt"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": write_blob(layout, "application/vnd.oci.image.config.v1+json", json.dumps(config)),
        "layers": [write_blob(layout, "application/vnd.oci.image.layer.v1.tar+gzip", gzip.compress(layer, mtime=0))],
    }
    descriptor = write_blob(layout, OCI_MANIFEST, json.dumps(manifest))
    descriptor["platform"] = {"os": "linux", "architecture": architecture}
    return descriptor


def write_blob(layout: Path, media_type: str, content: str | bytes) -> dict[str, Any]:
    data = content.encode() if isinstance(content, str) else content
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
