"""The backfill and verify flows and the sync status, against fresh real registries per test."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from georeg.config import load_config
from georeg.errors import ReplicationError
from georeg.flows.backfill import backfill
from georeg.flows.verify import verify
from georeg.state import StateStore
from tests.conftest import RegistryPair
from tests.support.images import Image, Pusher, build_image, build_index, build_signature
from tests.support.proxy import FaultProxy
from tests.support.registry import RegistryProcess

pytestmark = pytest.mark.usefixtures("prefect_api_url")


@pytest.fixture
def fresh_pair(tmp_path: Path) -> Iterator[RegistryPair]:
    """An empty primary and secondary of this test's own: backfill sees every repository there is."""
    with RegistryProcess(tmp_path / "primary") as primary, RegistryProcess(tmp_path / "secondary") as secondary:
        yield RegistryPair(primary, secondary, None)


def populate(pair: RegistryPair, count: int = 22) -> dict[str, dict[str, Image]]:
    """`count` repositories: docker and OCI images, docker and OCI multi-arch indexes, signature tags."""
    repositories: dict[str, dict[str, Image]] = {}
    with Pusher(pair.primary.url) as pusher:
        for number in range(count):
            kind = ("docker", "oci")[number % 2]
            if number % 4 < 2:
                image = build_image(kind, layer_sizes=[512, 1024])
            else:
                children = [
                    build_image(kind, platform=("linux", arch), layer_sizes=[256]) for arch in ("amd64", "arm64")
                ]
                image = build_index(children, kind=kind)
            tags = {"v1": image, "latest": image}
            if number % 5 == 0:
                signature_tag, signature = build_signature(image)
                tags[signature_tag] = signature
            repository = f"team{number % 3}/app{number}"
            for tag, tagged in tags.items():
                pusher.push_image(repository, tagged, tag)
            repositories[repository] = tags
    return repositories


def listing(url: str, repositories: list[str]) -> dict[str, dict[str, str | None]]:
    """repository -> tag -> digest, as a registry serves them."""
    with Pusher(url) as client:
        return {
            repo: {tag: client.head_manifest(repo, tag) for tag in sorted(client.tags(repo))} for repo in repositories
        }


def assert_equal_sides(pair: RegistryPair, repositories: list[str]) -> None:
    primary, secondary = listing(pair.primary.url, repositories), listing(pair.secondary.url, repositories)
    assert secondary == primary


def status_json(config: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "georeg.cli", "--config", str(config), "status", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def repository_states(config_path: Path) -> dict:
    store = StateStore(load_config(config_path).state.url)
    try:
        return await store.sync.repository_states("secondary")
    finally:
        await store.close()


async def test_backfill_converges_an_empty_secondary_then_follows_changes(fresh_pair, write_config):
    pair = fresh_pair
    repositories = populate(pair)
    names = sorted(repositories)
    config = write_config(pair.primary.url, pair.secondary.url)
    before = status_json(config)["secondaries"][0]
    assert before["repositories"]["total"] == 0 and before["last_backfill"] is None

    [summary] = await backfill()

    assert summary["repositories"] == 22 and summary["failed"] == 0
    assert summary["tags_replicated"] == sum(len(tags) for tags in repositories.values())
    assert_equal_sides(pair, names)
    status = status_json(config)["secondaries"][0]
    assert status["repositories"] == {"total": 22, "synced": 22, "failed": 0, "pending": 0}
    assert status["synced_percent"] == 100.0 and status["last_backfill"]["outcome"] == "completed"

    # The primary moves on: a tag deleted, a tag moved to another image, new tags, a new repository.
    with Pusher(pair.primary.url) as pusher:
        first, second = names[0], names[1]
        doomed = repositories[first]["v1"]
        pusher.delete_manifest(first, doomed.digest)  # drops v1 and latest (and nothing else)
        pusher.push_image(first, build_image("oci"), "v2")
        pusher.push_image(second, build_image("docker"), "latest")  # retag: latest now differs from v1
        pusher.push_image("brand/new", build_image("oci"), "1.0")

    [again] = await backfill()

    assert again["failed"] == 0 and again["tags_removed"] >= 2 and again["tags_replicated"] == 3
    assert_equal_sides(pair, [*names, "brand/new"])
    assert status_json(config)["secondaries"][0]["repositories"]["synced"] == 23


async def test_a_noop_resync_sends_nothing_but_listing_and_heads(fresh_pair, write_config):
    pair = fresh_pair
    populate(pair, count=6)
    with FaultProxy(pair.secondary.url) as secondary_proxy:
        write_config(pair.primary.url, secondary_proxy.url)
        await backfill()
        secondary_proxy.clear()

        [summary] = await backfill()

        assert summary["tags_replicated"] == 0 and summary["bytes_copied"] == 0
        assert {r.method for r in secondary_proxy.requests} <= {"GET", "HEAD"}
        assert not any("/blobs/" in r.path for r in secondary_proxy.requests)


async def test_one_uncopyable_tag_fails_its_repository_by_name_and_is_retried(fresh_pair, write_config):
    pair = fresh_pair
    repositories = populate(pair, count=4)
    victim = sorted(repositories)[0]
    with FaultProxy(pair.secondary.url) as secondary_proxy:
        secondary_proxy.refuse_manifest(victim, "v1")
        config = write_config(
            pair.primary.url, secondary_proxy.url, replication={"retry_backoff_base_seconds": 0, "task_retries": 0}
        )

        with pytest.raises(
            ReplicationError, match=rf"1 of 4 repositories failed: {victim} \(tag v1: .*MANIFEST_INVALID"
        ):
            await backfill()

        state = (await repository_states(config))[victim]
        assert (state.state, state.retry_count) == ("failed", 1)
        assert "tag v1" in state.last_failure and "MANIFEST_INVALID" in state.last_failure
        status = status_json(config)["secondaries"][0]
        assert status["repositories"] == {"total": 4, "synced": 3, "failed": 1, "pending": 0}
        assert status["failures"][0]["repository"] == victim

        with pytest.raises(ReplicationError):
            await backfill()  # retry_at has passed (base 0): tried again, failed again

        assert (await repository_states(config))[victim].retry_count == 2


async def test_verify_detects_a_tag_changed_behind_georegs_back(fresh_pair, write_config):
    pair = fresh_pair
    repositories = populate(pair, count=4)
    tampered = sorted(repositories)[2]
    config = write_config(pair.primary.url, pair.secondary.url)
    await backfill()
    [clean] = await verify(deep=True)
    assert clean["mismatched"] == 0 and clean["blobs_checked"] > 0

    with Pusher(pair.secondary.url) as secondary:
        secondary.push_image(tampered, build_image("docker"), "v1")

    with pytest.raises(ReplicationError, match=rf"1 of 4 repositories differ: {tampered}: tag v1 is sha256:"):
        await verify()

    state = (await repository_states(config))[tampered]
    assert (state.verification, state.state) == ("mismatch", "pending")  # marked for resync
    assert status_json(config)["secondaries"][0]["verification"] == {"verified": 3, "failed": 1, "unverified": 0}
    await backfill()
    [repaired] = await verify()
    assert repaired["mismatched"] == 0


async def test_verify_of_named_repositories_checks_only_those(fresh_pair, write_config):
    pair = fresh_pair
    repositories = sorted(populate(pair, count=3))
    write_config(pair.primary.url, pair.secondary.url)
    await backfill()
    with Pusher(pair.secondary.url) as secondary:  # a difference outside the repository asked for
        secondary.push_image(repositories[1], build_image("docker"), "v1")

    [checked] = await verify(repositories=[repositories[0]])
    assert (checked["repositories"], checked["mismatched"]) == (1, 0)
    with pytest.raises(ReplicationError, match=rf"1 of 1 repositories differ: {repositories[1]}"):
        await verify(repositories=[repositories[1]])


async def test_deep_verify_finds_a_missing_blob(fresh_pair, write_config):
    pair = fresh_pair
    image = build_image("oci", layer_sizes=[2048])
    with Pusher(pair.primary.url) as pusher:
        pusher.push_image("deep/app", image, "v1")
    write_config(pair.primary.url, pair.secondary.url)
    await backfill()
    layer = image.blobs[1]
    data = Path(
        pair.secondary.workdir
        / "storage/docker/registry/v2/blobs/sha256"
        / layer.digest[7:9]
        / layer.digest[7:]
        / "data"
    )
    data.unlink()  # lost on the secondary's disk

    await verify()  # the tags still match
    with pytest.raises(ReplicationError, match=f"blob {layer.digest} missing on the secondary"):
        await verify(deep=True)


async def test_filters_limit_what_a_backfill_touches(fresh_pair, write_config):
    pair = fresh_pair
    repositories = populate(pair, count=6)
    write_config(
        pair.primary.url,
        pair.secondary.url,
        replication={"repositories": {"include": ["team1/*"]}, "tags": {"exclude": "latest|sha256-.*"}},
    )

    [summary] = await backfill()

    wanted = sorted(name for name in repositories if name.startswith("team1/"))
    assert summary["repositories"] == len(wanted)
    with Pusher(pair.secondary.url) as secondary:
        for name in repositories:
            assert secondary.tags(name) == (["v1"] if name in wanted else [])


async def test_dry_run_reports_and_changes_nothing(fresh_pair, write_config):
    pair = fresh_pair
    repositories = populate(pair, count=3)
    config = write_config(pair.primary.url, pair.secondary.url)

    [summary] = await backfill(dry_run=True)

    assert summary["tags_replicated"] == sum(len(tags) for tags in repositories.values())
    with Pusher(pair.secondary.url) as secondary:
        assert all(secondary.tags(name) == [] for name in repositories)
    assert status_json(config)["secondaries"][0]["repositories"]["total"] == 0


async def test_backfill_and_verify_runs_are_named_for_what_they_do(fresh_pair, write_config):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    pair = fresh_pair
    populate(pair, count=1)
    write_config(pair.primary.url, pair.secondary.url)

    await backfill(dry_run=True)
    await backfill(secondary="secondary")
    await verify(secondary="secondary", deep=True)

    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["backfill", "verify"])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=3,
        )
    assert [run.name for run in reversed(runs)] == [
        "backfill of every secondary (dry run)",
        "backfill of secondary",
        "verify of secondary (deep)",
    ]


async def test_a_second_backfill_does_not_overlap_a_running_one(fresh_pair, write_config):
    pair = fresh_pair
    populate(pair, count=2)
    config = write_config(pair.primary.url, pair.secondary.url)
    store = StateStore(load_config(config).state.url)
    await store.ensure_schema()
    assert await store.leases.acquire("backfill:secondary", "another-run", 60) == "another-run"
    try:
        [result] = await backfill()
    finally:
        await store.close()

    assert result["skipped"] == "a backfill of secondary is already running (another-run)"
    with Pusher(pair.secondary.url) as secondary:
        assert secondary.tags("team0/app0") == []


async def test_a_backfill_ends_by_forgetting_old_events_and_runs(fresh_pair, write_config, tmp_path):
    """Retention runs at the end of a backfill (not of a dry run, which changes nothing)."""
    from sqlalchemy import select, update

    from georeg.events import REPLICATE, AcceptedEvent
    from georeg.state.journal import JournalEvent
    from georeg.state.runs import RunRecord

    pair = fresh_pair
    populate(pair, count=1)
    state = {"url": f"sqlite:///{tmp_path / 'retention.db'}", "retention_days": 7}
    config = write_config(pair.primary.url, pair.secondary.url, state=state)
    store = StateStore(load_config(config).state.url)
    await store.ensure_schema()
    try:
        await store.journal.record_events([AcceptedEvent("old", REPLICATE, "team0/app0", "v1")], [])  # owes nothing
        old_run = await store.runs.started("backfill", "secondary")
        await store.runs.finished(old_run, "completed", {})
        month_ago = time.time() - 30 * 86_400
        async with store.database.transaction() as session:
            await session.execute(update(JournalEvent).values(received_at=month_ago))
            await session.execute(update(RunRecord).values(started_at=month_ago, finished_at=month_ago))

        async def kept() -> tuple[list[str], list[int]]:
            async with store.database.transaction() as session:
                events = list(await session.scalars(select(JournalEvent.event_id)))
                runs = list(await session.scalars(select(RunRecord.id).order_by(RunRecord.id)))
                return events, runs

        await backfill(dry_run=True)
        assert await kept() == (["old"], [old_run])
        await backfill()
        events, runs = await kept()
    finally:
        await store.close()

    assert events == []
    assert len(runs) == 1 and runs[0] != old_run  # the backfill just finished is the latest: kept


async def test_the_backfill_groups_repositories_per_task_and_reports_a_summary(fresh_pair, write_config):
    """A task run per group of repositories, not per repository; the report counts everything and
    lists failures and the slowest, not a row per repository."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterName,
    )
    from prefect.client.schemas.sorting import ArtifactSort

    pair = fresh_pair
    repositories = populate(pair, count=5)
    write_config(pair.primary.url, pair.secondary.url, backfill={"repositories_per_task": 2})
    await backfill()

    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["backfill-secondary-report"])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
        progress = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["backfill-secondary"])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
        group_runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[artifacts[0].flow_run_id])),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="sync ")),
        )
    rows = json.loads(artifacts[0].data) if isinstance(artifacts[0].data, str) else artifacts[0].data
    assert sorted(row["repository"] for row in rows) == sorted(repositories)  # the slowest: all five here
    assert "5 repositories synced, 0 failed" in artifacts[0].description
    assert progress and float(progress[0].data) == 100.0
    assert sorted(run.name for run in group_runs) == sorted(
        ["sync team0/app0 and 1 more", "sync team1/app1 and 1 more", "sync team2/app2"]
    )


async def test_a_copy_limit_holds_however_much_concurrency_is_configured(fresh_pair, write_config, prefect_api_url):
    pair = fresh_pair
    with Pusher(pair.primary.url) as pusher:
        for number in range(6):
            pusher.push_image(f"limited/app{number}", build_image("oci", layer_sizes=[150_000, 150_000, 150_000]), "v1")
    with FaultProxy(pair.secondary.url) as secondary_proxy:
        config = write_config(
            pair.primary.url,
            secondary_proxy.url,
            replication={"concurrency": 8, "chunk_size": 65_536, "monolithic_max": 0},
        )
        document = yaml.safe_load(config.read_text())
        document["secondaries"][0]["max_concurrent_copies"] = 2
        config.write_text(yaml.safe_dump(document))

        [summary] = await backfill()

        assert summary["tags_replicated"] == 6 and summary["failed"] == 0
        assert secondary_proxy.count("PATCH") >= 6 * 3 * 3 + 6  # 3 chunks per layer, 1 per config (+ resumes)
        assert 1 <= secondary_proxy.max_concurrent_transfers <= 2
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        limit = await client.read_global_concurrency_limit_by_name(f"georeg-copies-127.0.0.1-{secondary_proxy.port}")
    assert limit.limit == 2  # created by georeg from the config
