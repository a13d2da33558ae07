"""A no-op backfill costs what changed: georeg's record of what it wrote stands in for the secondary's
HEADs, the primary's storage for its HEADs, against fresh real registries per test."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from georeg.config import load_config
from georeg.flows.backfill import backfill
from georeg.flows.delete import delete_image
from georeg.flows.replicate import replicate_image
from georeg.state import StateStore
from tests.conftest import RegistryPair
from tests.flows.test_backfill import assert_equal_sides, fresh_pair, populate
from tests.support.images import Pusher, build_image
from tests.support.proxy import FaultProxy
from tests.support.registry import RegistryProcess

pytestmark = pytest.mark.usefixtures("prefect_api_url")
__all__ = ["fresh_pair"]  # the fixture, shared with the backfill tests
MANIFEST_HEAD = ("HEAD", "/manifests/")


async def set_checked_at(config: Path, repository: str, checked_at: float) -> None:
    store = StateStore(load_config(config).state.url)
    try:
        await store.sync.set_repository_state("secondary", repository, checked_at=checked_at)
    finally:
        await store.close()


async def test_a_noop_backfill_trusts_the_record_and_heads_no_secondary_manifest(fresh_pair, write_config):
    pair = fresh_pair
    names = sorted(populate(pair, count=6))
    with FaultProxy(pair.secondary.url) as secondary_proxy:
        write_config(pair.primary.url, secondary_proxy.url)
        await backfill()
        secondary_proxy.clear()

        [summary] = await backfill()

        assert summary["failed"] == 0 and summary["tags_replicated"] == 0 and summary["tags_unchanged"] > 0
        assert secondary_proxy.count(*MANIFEST_HEAD) == 0
        assert secondary_proxy.count("GET", "/tags/list") == len(names)  # the check that the record still holds
    assert_equal_sides(pair, names)


async def test_a_tag_moved_behind_georegs_back_is_found_by_the_recheck(fresh_pair, write_config):
    pair = fresh_pair
    names = sorted(populate(pair, count=3))
    config = write_config(pair.primary.url, pair.secondary.url)
    await backfill()
    victim = names[0]
    with Pusher(pair.secondary.url) as pusher:  # same tags, another digest: the tag list cannot tell
        pusher.push_image(victim, build_image("oci"), "v1")

    [trusting] = await backfill()  # the record is trusted until the repository's re-check is due
    assert trusting["tags_replicated"] == 0
    await set_checked_at(config, victim, time.time() - 8 * 86400)  # more than backfill.recheck_days ago

    [rechecking] = await backfill()

    assert rechecking["tags_replicated"] == 1 and rechecking["failed"] == 0
    assert_equal_sides(pair, names)


async def test_a_tag_added_or_removed_behind_georegs_back_is_found_by_the_tag_list(fresh_pair, write_config):
    pair = fresh_pair
    repositories = populate(pair, count=2)
    names = sorted(repositories)
    write_config(pair.primary.url, pair.secondary.url)
    await backfill()
    with Pusher(pair.secondary.url) as pusher:
        pusher.push_image(names[0], build_image("docker"), "stray")  # extra on the secondary
        pusher.delete_manifest(names[1], repositories[names[1]]["v1"].digest)  # v1 and latest gone

    [summary] = await backfill()

    assert summary["tags_removed"] == 1 and summary["tags_replicated"] == 2 and summary["failed"] == 0
    assert_equal_sides(pair, names)


async def test_event_flows_keep_the_record_so_the_next_noop_heads_nothing(fresh_pair, write_config):
    pair = fresh_pair
    names = sorted(populate(pair, count=2))
    repository = names[0]
    with FaultProxy(pair.secondary.url) as secondary_proxy:
        write_config(pair.primary.url, secondary_proxy.url)
        await backfill()
        solo, moved = build_image("oci"), build_image("docker")
        with Pusher(pair.primary.url) as pusher:
            pusher.push_image(repository, solo, "solo")
            pusher.push_image(repository, moved, "latest")  # a retag
        await replicate_image(repository, "solo")
        await replicate_image(repository, "latest")
        with Pusher(pair.primary.url) as pusher:
            pusher.delete_manifest(repository, solo.digest)
        await delete_image(repository, solo.digest)
        secondary_proxy.clear()

        [summary] = await backfill()

        assert summary["tags_replicated"] == 0 and summary["tags_removed"] == 0
        assert secondary_proxy.count(*MANIFEST_HEAD) == 0
    assert_equal_sides(pair, names)


@pytest.fixture(params=["filesystem", "s3", "swift"])
def storage_pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RegistryPair]:
    """A primary on each storage driver Debian's registry has, beside a secondary on a file system."""
    storage: dict[str, Any] | None = None
    if request.param == "s3":
        storage = request.getfixturevalue("moto_server").registry_storage(f"/primary-{uuid.uuid4().hex[:8]}")
    elif request.param == "swift":
        storage = request.getfixturevalue("swift_node").registry_storage(f"primary-{uuid.uuid4().hex[:8]}")
    with (
        RegistryProcess(tmp_path / "primary", storage=storage) as primary,
        RegistryProcess(tmp_path / "secondary") as secondary,
    ):
        yield RegistryPair(primary, secondary, None)


async def test_with_the_primarys_storage_a_noop_asks_the_primary_only_its_catalog(storage_pair, write_config):
    pair = storage_pair
    repositories = populate(pair, count=4)
    names = sorted(repositories)
    with FaultProxy(pair.primary.url) as primary_proxy:
        primary = {"url": primary_proxy.url, "auth": {"type": "none"}, "storage": pair.primary.config["storage"]}
        write_config(primary_proxy.url, pair.secondary.url, primary=primary)
        [first] = await backfill()
        assert first["failed"] == 0 and first["tags_replicated"] == sum(len(tags) for tags in repositories.values())
        primary_proxy.clear()

        [noop] = await backfill()

        assert noop["tags_replicated"] == 0 and noop["failed"] == 0
        assert {(r.method, r.path.split("?")[0]) for r in primary_proxy.requests} == {("GET", "/v2/_catalog")}

        # The primary moves on: a retag, a new tag, a deleted tag. Only the storage tells georeg so.
        with Pusher(pair.primary.url) as pusher:
            pusher.push_image(names[0], build_image("oci"), "latest")
            pusher.push_image(names[1], build_image("docker"), "new")
            pusher.delete_manifest(names[2], repositories[names[2]]["v1"].digest)

        [changes] = await backfill()

    assert changes["tags_replicated"] == 2 and changes["tags_removed"] == 2 and changes["failed"] == 0
    assert_equal_sides(pair, names)


async def test_an_unreadable_primary_storage_falls_back_to_heads_with_one_warning(
    fresh_pair, write_config, tmp_path, caplog
):
    pair = fresh_pair
    names = sorted(populate(pair, count=4))
    empty = tmp_path / "not-the-primarys-storage"
    empty.mkdir()
    primary = {
        "url": pair.primary.url,
        "auth": {"type": "none"},
        "storage": {"filesystem": {"rootdirectory": str(empty)}},
    }
    write_config(pair.primary.url, pair.secondary.url, primary=primary)

    with caplog.at_level(logging.WARNING, logger="georeg.storage"):
        [summary] = await backfill()

    assert summary["failed"] == 0 and summary["repositories"] == 4
    warnings = [r for r in caplog.records if r.name == "georeg.storage" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "HEAD requests" in warnings[0].getMessage()
    assert_equal_sides(pair, names)
