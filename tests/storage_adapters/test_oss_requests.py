"""What the oss adapter sends, as the stand-in recorded it (the stand-in checks no signature)."""

from __future__ import annotations

from georeg.storage_adapters import blob_size, build_adapter, tag_digest
from tests.storage_adapters.backends import blob_path, sha256, tag_link_path, write_image
from tests.storage_adapters.conftest import oss_backend
from tests.support.emulators import BUCKET
from tests.support.oss_standin import OssStandIn


def test_reads_are_signed_path_style_requests_for_the_registry_keys(oss_standin: OssStandIn, root: str) -> None:
    backend = oss_backend(oss_standin)
    image = write_image(backend, root, "group/app", "v1")
    adapter = build_adapter({"oss": backend.params(f"/{root}/")})
    before = len(oss_standin.requests)

    assert blob_size(adapter, image.layer_digest) == len(image.layer)
    assert tag_digest(adapter, "group/app", "v1") == image.manifest_digest
    assert blob_size(adapter, sha256(b"absent")) is None

    sent = [(r.method, r.bucket, r.key) for r in oss_standin.requests[before:]]
    assert sent == [
        ("HEAD", BUCKET, f"{root}/{blob_path(image.layer_digest)}"),
        ("GET", BUCKET, f"{root}/{tag_link_path('group/app', 'v1')}"),
        ("HEAD", BUCKET, f"{root}/{blob_path(sha256(b'absent'))}"),
    ]
    assert all(r.authorization.startswith("OSS oss-access-key-id:") for r in oss_standin.requests[before:])
