"""Shared storage: when the decision says shared, and that shared replication copies nothing yet never
claims what is not there. Two real registries on one filesystem root do share storage."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from georeg.config import RegistryConfig, ReplicationConfig, parse_config
from georeg.errors import ConfigError, ReplicationError
from georeg.flows.backfill import backfill
from georeg.flows.replicate import replicate_image
from georeg.references import ImageReference
from georeg.registry import RegistryClient
from georeg.registry.auth import PULL_ONLY
from georeg.replication import confirm_shared, resolve_image
from georeg.sharing import ReplicationMode, decide_mode
from georeg.storage_adapters import build_adapter
from tests.conftest import RegistryPair, WriteConfig
from tests.support.images import Pusher, build_image, build_index
from tests.support.proxy import FaultProxy
from tests.support.registry import RegistryProcess


def config_with(tmp_path: Path, primary_storage: Any, secondary_storage: Any, mode: str = "auto"):
    secondary: dict[str, Any] = {"name": "east", "url": "http://127.0.0.1:2", "mode": mode}
    if secondary_storage is not None:
        secondary["storage"] = secondary_storage
    primary: dict[str, Any] = {"url": "http://127.0.0.1:1"}
    if primary_storage is not None:
        primary["storage"] = primary_storage
    return parse_config({"primary": primary, "secondaries": [secondary]}, base_dir=tmp_path)


def filesystem(root: str) -> dict[str, Any]:
    return {"filesystem": {"rootdirectory": root}, "delete": {"enabled": True}}


def test_the_same_location_is_shared_and_any_difference_is_copy(tmp_path):
    same = config_with(tmp_path, filesystem("/srv/registry"), filesystem("/srv/registry/"))
    assert decide_mode(same, same.secondaries[0]).mode is ReplicationMode.SHARED

    other_root = config_with(tmp_path, filesystem("/srv/registry"), filesystem("/srv/other"))
    decision = decide_mode(other_root, other_root.secondaries[0])
    assert decision.mode is ReplicationMode.COPY and "/srv/other" in decision.reason


def test_without_storage_blocks_everything_is_copied(tmp_path):
    config = config_with(tmp_path, filesystem("/srv/registry"), None)
    assert decide_mode(config, config.secondaries[0]).mode is ReplicationMode.COPY


def test_copy_can_be_forced_and_shared_cannot_be_forced_onto_different_storage(tmp_path):
    forced_copy = config_with(tmp_path, filesystem("/srv/a"), filesystem("/srv/a"), mode="copy")
    assert decide_mode(forced_copy, forced_copy.secondaries[0]).mode is ReplicationMode.COPY

    forced_shared = config_with(tmp_path, filesystem("/srv/a"), filesystem("/srv/b"), mode="shared")
    with pytest.raises(ConfigError, match=r"secondaries\[0\]\.mode: shared is refused: the primary stores in"):
        decide_mode(forced_shared, forced_shared.secondaries[0])

    no_storage = config_with(tmp_path, None, None, mode="shared")
    with pytest.raises(ConfigError, match="shared needs a storage: block for both"):
        decide_mode(no_storage, no_storage.secondaries[0])


@pytest.fixture
def shared_pair(tmp_path: Path) -> Iterator[tuple[RegistryPair, dict[str, Any]]]:
    """Two real registries on one storage root with one http.secret, as instances of one registry are."""
    storage = {"filesystem": {"rootdirectory": str(tmp_path / "shared-storage")}}
    with (
        RegistryProcess(tmp_path / "primary", storage=storage, http_secret="one-secret") as primary,
        RegistryProcess(tmp_path / "secondary", storage=storage, http_secret="one-secret") as secondary,
    ):
        yield RegistryPair(primary, secondary, None), storage


@pytest.mark.usefixtures("prefect_api_url")
async def test_shared_storage_replication_copies_no_bytes(shared_pair, write_config: WriteConfig, repo_name):
    pair, storage = shared_pair
    index = build_index(
        [build_image("oci", layer_sizes=[50_000]), build_image("oci", platform=("linux", "arm64"))], kind="oci"
    )
    with Pusher(pair.primary.url) as pusher:
        pusher.push_image(repo_name, index, "v1")
    with FaultProxy(pair.secondary.url) as secondary_proxy:
        _with_storage(write_config, pair, secondary_proxy.url, storage)

        [result] = await replicate_image(repo_name, "v1")

        assert result["mode"] == "shared" and result["bytes_copied"] == 0
        assert result["bytes_skipped"] == sum(blob.size for blob in index.all_blobs())
        assert {r.method for r in secondary_proxy.requests} == {"HEAD"}  # confirmed, never written

        [summary] = await backfill()

        assert summary["mode"] == "shared" and summary["tags_confirmed"] == 1 and summary["bytes_copied"] == 0
        # Confirmed through manifest HEADs only: the secondary's catalog and tag lists are the primary's.
        assert {(r.method, "/manifests/" in r.path) for r in secondary_proxy.requests} == {("HEAD", True)}


@pytest.mark.usefixtures("prefect_api_url")
async def test_a_blob_missing_from_shared_storage_is_an_error_not_synced(shared_pair, write_config, repo_name):
    pair, storage = shared_pair
    image = build_image("oci", layer_sizes=[3000])
    with Pusher(pair.primary.url) as pusher:
        pusher.push_image(repo_name, image, "v1")
    _with_storage(write_config, pair, pair.secondary.url, storage)
    layer = image.blobs[1].digest
    blob_file = Path(storage["filesystem"]["rootdirectory"], "docker/registry/v2/blobs/sha256", layer[7:9], layer[7:])
    (blob_file / "data").unlink()

    with pytest.raises(ReplicationError, match=f"blob {layer} of {repo_name}:v1 is missing from the shared storage"):
        await replicate_image(repo_name, "v1")
    with pytest.raises(ReplicationError, match="1 of 1 repositories failed"):
        await backfill()


async def test_confirming_checks_the_digest_the_secondary_serves_under_the_tag(shared_pair, repo_name):
    pair, storage = shared_pair
    first, second = build_image("oci", layer_sizes=[2000]), build_image("oci", layer_sizes=[3000])
    with Pusher(pair.primary.url) as pusher:
        pusher.push_image(repo_name, first, "v1")
    settings = ReplicationConfig()
    async with (
        RegistryClient("primary", RegistryConfig(url=pair.primary.url), settings, allowed_actions=PULL_ONLY) as primary,
        RegistryClient("east", RegistryConfig(url=pair.secondary.url), settings, allowed_actions=PULL_ONLY) as east,
    ):
        image = await resolve_image(primary, ImageReference(repo_name, "v1"))
        with Pusher(pair.primary.url) as pusher:
            pusher.push_image(repo_name, second, "v1")  # retagged on the primary after it was resolved

        with pytest.raises(ReplicationError, match=f"east serves {repo_name}:v1 as {second.digest}, expected"):
            await confirm_shared(east, build_adapter(storage), image)
        confirmed = await confirm_shared(east, build_adapter(storage), await resolve_image(primary, image.reference))
    assert sorted(copy.digest for copy in confirmed) == sorted(blob.digest for blob in second.blobs)


def _with_storage(write_config: WriteConfig, pair: RegistryPair, secondary_url: str, storage: dict) -> None:
    """A georeg.yaml whose primary and secondary both carry the shared storage block."""
    import yaml

    path = write_config(pair.primary.url, secondary_url, replication={"retry_backoff_base_seconds": 0})
    config = yaml.safe_load(path.read_text())
    config["primary"]["storage"] = storage
    config["secondaries"][0]["storage"] = storage
    path.write_text(yaml.safe_dump(config))


def cloud_storage(request: pytest.FixtureRequest, backend: str, place: str) -> dict[str, Any]:
    """A registry storage block on the session's moto server (root `place`) or Swift node (container `place`)."""
    if backend == "s3":
        return request.getfixturevalue("moto_server").registry_storage(f"/{place}")
    return request.getfixturevalue("swift_node").registry_storage(place)


@pytest.mark.usefixtures("prefect_api_url")
@pytest.mark.parametrize("backend", ["s3", "swift"])
@pytest.mark.parametrize("shared", [True, False], ids=["same-place", "different-places"])
async def test_real_registries_on_cloud_storage(request, tmp_path, write_config, repo_name, backend, shared):
    run = uuid.uuid4().hex[:8]
    primary_storage = cloud_storage(request, backend, f"primary-{run}")
    secondary_storage = primary_storage if shared else cloud_storage(request, backend, f"secondary-{run}")
    index = build_index(
        [build_image("oci", layer_sizes=[40_000]), build_image("oci", platform=("linux", "arm64"))], kind="oci"
    )
    with (
        RegistryProcess(tmp_path / "primary", storage=primary_storage, http_secret=run) as primary,
        RegistryProcess(tmp_path / "secondary", storage=secondary_storage, http_secret=run) as secondary,
        FaultProxy(secondary.url) as secondary_proxy,
    ):
        with Pusher(primary.url) as pusher:
            pusher.push_image(repo_name, index, "v1")
        path = write_config(primary.url, secondary_proxy.url)
        document = yaml.safe_load(path.read_text())
        document["primary"]["storage"] = primary_storage
        document["secondaries"][0]["storage"] = secondary_storage
        path.write_text(yaml.safe_dump(document))

        [result] = await replicate_image(repo_name, "v1")

        blob_bytes = sum(blob.size for blob in index.all_blobs())
        uploaded = sum(r.request_bytes for r in secondary_proxy.requests if "/blobs/uploads/" in r.path)
        if shared:
            assert (result["mode"], result["bytes_copied"], uploaded) == ("shared", 0, 0)
            assert result["bytes_skipped"] == blob_bytes
            # A backfill confirms from one listing of the storage (s3), or blob by blob where the listing
            # shows no sizes (swift's segmented objects): the same answer either way.
            [summary] = await backfill()
            assert (summary["mode"], summary["tags_confirmed"], summary["bytes_copied"]) == ("shared", 1, 0)
            assert summary["bytes_skipped"] == blob_bytes
        else:
            assert result["mode"] == "copy" and result["bytes_copied"] == blob_bytes == uploaded
        with Pusher(secondary.url) as check:  # the secondary itself, not through georeg
            assert check.head_manifest(repo_name, "v1") == index.digest
            assert all(check.blob_exists(repo_name, blob.digest) for blob in index.all_blobs())
