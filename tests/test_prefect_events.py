"""georeg's events in Prefect's feed, read back from a real Prefect server: registry events the receiver
accepted, and the outcomes of the replication and backfill flows."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from georeg.errors import GeoregError
from georeg.events import DELETE, REPLICATE, AcceptedEvent
from georeg.flows.backfill import backfill
from georeg.flows.replicate import replicate_image
from georeg.prefect_events import RegistryEventFeed, prefect_event_id
from georeg.registry.manifests import OCI_MANIFEST
from tests.support.images import Pusher, build_image
from tests.support.services import prefect_events, wait_until

DIGEST = "sha256:" + "e" * 64


def events_named(api_url: str, resource_id: str, *names: str) -> Callable[[], list[dict]]:
    return lambda: prefect_events(api_url, resource_id, list(names))


def related_roles(event: dict) -> dict[str, str]:
    return {item["prefect.resource.role"]: item["prefect.resource.id"] for item in event["related"]}


async def wait_for_events(read: Callable[[], list[dict]], count: int, what: str) -> list[dict]:
    await asyncio.to_thread(wait_until, lambda: len(read()) >= count, deadline=30, what=what, interval=0.25)
    return read()


async def test_the_feed_emits_each_accepted_registry_event_with_its_tag_digest_and_media_type(
    prefect_api_url, repo_name
):
    feed = RegistryEventFeed()
    feed.start()
    pushed = AcceptedEvent(
        f"{repo_name}-push", REPLICATE, repo_name, "1.0", tag="1.0", digest=DIGEST, media_type=OCI_MANIFEST
    )
    deleted = AcceptedEvent(f"{repo_name}-delete", DELETE, repo_name, DIGEST, digest=DIGEST)
    feed.submit([pushed, deleted])  # only queued: the receiver's answer never waits for Prefect
    await feed.stop()
    assert feed.emitted == 2

    resource = f"georeg.repository.{repo_name}"
    events = await wait_for_events(events_named(prefect_api_url, resource), 2, "the registry events in the feed")
    by_name = {event["event"]: event for event in events}
    push = by_name["georeg.registry.manifest.pushed"]
    assert push["payload"] == {
        "repository": repo_name,
        "reference": "1.0",
        "tag": "1.0",
        "digest": DIGEST,
        "media_type": OCI_MANIFEST,
        "registry_event_id": pushed.event_id,
    }
    assert push["resource"]["georeg.reference.kind"] == "tag"
    assert push["id"] == str(prefect_event_id(pushed.event_id))  # a redelivery is the same Prefect event
    # The primary is named; Prefect may add a flow run of the sending process's context besides, which
    # in the full suite it has been seen to do, and which says nothing about georeg's event.
    assert related_roles(push)["primary"] == "georeg.registry.primary"
    delete = by_name["georeg.registry.manifest.deleted"]
    assert delete["payload"]["digest"] == DIGEST and delete["payload"]["tag"] is None
    assert delete["resource"]["georeg.reference.kind"] == "digest"


async def test_a_feed_not_started_drops_nothing_into_prefect(prefect_api_url, repo_name):
    feed = RegistryEventFeed()
    feed.submit([AcceptedEvent(f"{repo_name}-x", REPLICATE, repo_name, "1.0")])
    await feed.stop()
    assert feed.emitted == 0 and feed.dropped == 0


async def test_replication_outcomes_name_the_secondary_the_bytes_and_the_reason(
    prefect_api_url, registry_pair, write_config, repo_name
):
    image = build_image("oci", layer_sizes=[5_000])
    with Pusher(registry_pair.primary.url) as pusher:
        pusher.push_image(repo_name, image, "v1")
    write_config(registry_pair.primary.url, registry_pair.secondary.url, replication={"task_retries": 0})

    [result] = await replicate_image(repo_name, "v1")
    with pytest.raises(GeoregError):
        await replicate_image(repo_name, "missing")

    resource = f"georeg.repository.{repo_name}"
    completed = await wait_for_events(
        events_named(prefect_api_url, resource, "georeg.replication.completed"), 1, "replication.completed"
    )
    failed = await wait_for_events(
        events_named(prefect_api_url, resource, "georeg.replication.failed"), 1, "replication.failed"
    )
    [done], [broken] = completed, failed
    assert done["payload"]["bytes_copied"] == result["bytes_copied"] > 0
    assert done["payload"]["digest"] == image.digest
    assert done["payload"]["secondary"] == "secondary" and done["payload"]["action"] == REPLICATE
    assert related_roles(done)["secondary"] == "georeg.secondary.secondary"
    assert related_roles(done)["flow-run"].startswith("prefect.flow-run.")  # Prefect adds the run it came from
    assert broken["payload"]["reference"] == "missing" and "missing" in broken["payload"]["reason"]


async def test_a_backfill_reports_its_counts_per_secondary(prefect_api_url, registry_pair, write_config, repo_name):
    with Pusher(registry_pair.primary.url) as pusher:
        pusher.push_image(repo_name, build_image("oci"), "v1")
    write_config(
        registry_pair.primary.url,
        registry_pair.secondary.url,
        replication={"repositories": {"include": [repo_name]}},
        backfill={"fan_out": False},
    )
    await backfill()

    events = await wait_for_events(
        events_named(prefect_api_url, "georeg.secondary.secondary", "georeg.backfill.completed"),
        1,
        "backfill.completed",
    )
    payloads = [event["payload"] for event in events]
    assert any(p["tags_replicated"] == 1 and p["synced"] == 1 and p["failed"] == 0 for p in payloads), payloads
