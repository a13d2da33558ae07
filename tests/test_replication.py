"""The replication procedure without Prefect, against real registries, counted at a recording proxy."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import pytest

from georeg.blob_copy import BlobLocations, BlobOutcome, copy_blob
from georeg.config import ConcurrencyConfig, RegistryConfig, ReplicationConfig
from georeg.deletion import DeletionOutcome, converge_deletion
from georeg.errors import IntegrityError, NotFound
from georeg.references import ImageReference
from georeg.registry import Descriptor, RegistryClient
from georeg.registry.auth import PULL_ONLY, PULL_PUSH_DELETE
from georeg.replication import put_manifests, resolve_image, verify_replica
from tests.conftest import RegistryPair
from tests.support.images import Image, Pusher, build_image, build_index, random_blob
from tests.support.proxy import FaultProxy

MIB = 1024 * 1024
SETTINGS = ReplicationConfig(chunk_size=256 * 1024, monolithic_max=64 * 1024, request_attempts=3)


@pytest.fixture
def secondary_proxy(registry_pair: RegistryPair) -> Iterator[FaultProxy]:
    with FaultProxy(registry_pair.secondary.url) as proxy:
        yield proxy


@pytest.fixture
def primary_proxy(registry_pair: RegistryPair) -> Iterator[FaultProxy]:
    with FaultProxy(registry_pair.primary.url) as proxy:
        yield proxy


@pytest.fixture
async def clients(
    primary_proxy: FaultProxy, secondary_proxy: FaultProxy
) -> AsyncIterator[tuple[RegistryClient, RegistryClient]]:
    """A primary and a secondary client, each through its own recording proxy."""
    async with (
        RegistryClient("primary", RegistryConfig(url=primary_proxy.url), SETTINGS, allowed_actions=PULL_ONLY) as src,
        RegistryClient(
            "secondary", RegistryConfig(url=secondary_proxy.url), SETTINGS, allowed_actions=PULL_PUSH_DELETE
        ) as dst,
    ):
        yield src, dst


async def replicate(
    primary: RegistryClient, secondary: RegistryClient, repository: str, tag: str, locations: BlobLocations
) -> list[BlobOutcome]:
    image = await resolve_image(primary, ImageReference(repository, tag))
    outcomes = [(await copy_blob(primary, secondary, repository, blob, locations)).outcome for blob in image.blobs()]
    await put_manifests(secondary, image)
    await verify_replica(secondary, image)
    return outcomes


def push(pair: RegistryPair, repository: str, image: Image, tag: str) -> None:
    with Pusher(pair.primary.url) as pusher:
        pusher.push_image(repository, image, tag)


def upload_bytes(proxy: FaultProxy) -> int:
    return sum(r.request_bytes for r in proxy.requests if r.method in ("PATCH", "PUT") and "/blobs/" in r.path)


@pytest.mark.parametrize("kind", ["docker", "oci"])
async def test_image_arrives_digest_equal(registry_pair, clients, repo_name, kind):
    image = build_image(kind, layer_sizes=[1000, 300_000])  # one monolithic, one chunked layer
    push(registry_pair, repo_name, image, "v1")

    await replicate(*clients, repo_name, "v1", BlobLocations())

    with Pusher(registry_pair.secondary.url) as secondary:
        content, media_type = secondary.get_manifest(repo_name, "v1")
        assert (content, media_type) == (image.manifest, image.media_type)
        assert all(secondary.blob_exists(repo_name, blob.digest) for blob in image.blobs)


async def test_index_children_arrive_before_the_index(registry_pair, clients, secondary_proxy, repo_name):
    arm = build_image("oci", platform=("linux", "arm64"))
    amd = build_image("oci", platform=("linux", "amd64"))
    index = build_index([arm, amd], kind="oci")
    push(registry_pair, repo_name, index, "multi")

    await replicate(*clients, repo_name, "multi", BlobLocations())

    manifest_puts = [
        r.path.rsplit("/", 1)[1] for r in secondary_proxy.requests if r.method == "PUT" and "/manifests/" in r.path
    ]
    assert manifest_puts[-1] == "multi"
    assert set(manifest_puts[:-1]) == {arm.digest, amd.digest}
    with Pusher(registry_pair.secondary.url) as secondary:
        assert secondary.head_manifest(repo_name, "multi") == index.digest
        for child in (arm, amd):
            assert secondary.head_manifest(repo_name, child.digest) == child.digest


async def test_a_manifest_put_answered_digest_invalid_is_retried_and_logged(
    registry_pair, clients, secondary_proxy, repo_name, caplog
):
    """What registry 2.8 answers when a manifest PUT reads a link file another request is rewriting."""
    image = build_image("oci")
    push(registry_pair, repo_name, image, "v1")
    torn = b'{"errors":[{"code":"DIGEST_INVALID","message":"provided digest did not match uploaded content"}]}'
    secondary_proxy.add_fault("PUT", "/manifests/v1$", status=400, body=torn)

    await replicate(*clients, repo_name, "v1", BlobLocations())

    assert secondary_proxy.count("PUT", "/manifests/v1") == 2
    assert "rewrote it; retried" in caplog.text
    with Pusher(registry_pair.secondary.url) as secondary:
        assert secondary.head_manifest(repo_name, "v1") == image.digest


async def test_a_blob_is_never_linked_twice_into_a_new_repository(registry_pair, clients, secondary_proxy, repo_name):
    """Copying a shared blob into another repository in between must not make this process link it
    again into a repository it already put it in (each link rewrites the registry's link file), nor
    ask a repository that had no tag whether the blob this process linked there is there."""
    base = random_blob(2048)
    first, second = build_image("oci", layers=[base]), build_image("oci", layers=[base])
    push(registry_pair, f"{repo_name}-a", first, "v1")
    push(registry_pair, f"{repo_name}-b", first, "v1")
    push(registry_pair, f"{repo_name}-a", second, "v2")
    primary, secondary = clients
    locations = BlobLocations()
    layer = Descriptor(digest=base.digest, size=base.size, media_type=base.media_type)
    listed_empty_at = time.monotonic()

    outcomes = [
        (await copy_blob(primary, secondary, repository, layer, locations, listed_empty_at=listed_empty_at)).outcome
        for repository in (f"{repo_name}-a", f"{repo_name}-b", f"{repo_name}-a")
    ]

    assert outcomes == [BlobOutcome.COPIED, BlobOutcome.MOUNTED, BlobOutcome.PRESENT]
    assert secondary_proxy.count("POST", "/blobs/uploads/") == 2
    assert secondary_proxy.count("HEAD", "/blobs/") == 0


async def test_a_link_seen_before_the_repository_was_listed_empty_is_asked_again(
    registry_pair, clients, secondary_proxy, repo_name
):
    """A repository that lists no tag may have lost its links since this process saw them (the
    registry's garbage collection): what was linked before the listing is asked for, not assumed."""
    blob = random_blob(2048)
    push(registry_pair, repo_name, build_image("oci", layers=[blob]), "v1")
    primary, secondary = clients
    locations = BlobLocations()
    layer = Descriptor(digest=blob.digest, size=blob.size, media_type=blob.media_type)
    locations.remember(secondary.url, blob.digest, repo_name)  # as if linked by an earlier pass

    copied = await copy_blob(primary, secondary, repo_name, layer, locations, listed_empty_at=time.monotonic())

    assert copied.outcome == BlobOutcome.COPIED
    assert await secondary.blob_size(repo_name, blob.digest) == blob.size


async def test_present_blobs_are_skipped_and_known_ones_mounted(registry_pair, clients, secondary_proxy, repo_name):
    shared_layer = random_blob(200_000)
    second_repo = f"{repo_name}-other"
    a = build_image("oci", layers=[shared_layer])
    b = build_image("oci", layers=[shared_layer])
    push(registry_pair, repo_name, a, "a")
    push(registry_pair, second_repo, b, "b")
    locations = BlobLocations()

    assert await replicate(*clients, repo_name, "a", locations) == [BlobOutcome.COPIED] * 2
    sent_for_a = upload_bytes(secondary_proxy)
    secondary_proxy.clear()

    outcomes = await replicate(*clients, second_repo, "b", locations)

    assert sorted(outcomes) == sorted([BlobOutcome.COPIED, BlobOutcome.MOUNTED])
    mounts = [r for r in secondary_proxy.requests if r.method == "POST" and "mount=" in r.query]
    assert len(mounts) == 1 and mounts[0].status == 201
    assert upload_bytes(secondary_proxy) < sent_for_a - shared_layer.size + 10_000  # the big layer was not sent
    secondary_proxy.clear()

    assert await replicate(*clients, repo_name, "a", locations) == [BlobOutcome.PRESENT] * 2
    assert secondary_proxy.count("POST") == 0 and upload_bytes(secondary_proxy) == 0


async def test_chunked_copy_survives_a_reset_mid_blob_without_restarting(
    registry_pair, clients, secondary_proxy, repo_name
):
    layer = random_blob(MIB + 123)  # five chunks of 256 KiB
    image = build_image("oci", layers=[layer])
    push(registry_pair, repo_name, image, "big")
    secondary_proxy.add_fault("PATCH", r"/blobs/uploads/", reset=True, times=1)

    await replicate(*clients, repo_name, "big", BlobLocations())

    patches = [r for r in secondary_proxy.requests if r.method == "PATCH"]
    assert [r.status for r in patches].count(0) == 1  # the reset
    # Resumed at the failed chunk: one chunk is sent twice, not the whole blob.
    assert sum(r.request_bytes for r in patches if r.status == 202) == layer.size
    with Pusher(registry_pair.secondary.url) as secondary:
        assert secondary.head_manifest(repo_name, "big") == image.digest


async def test_corrupt_source_is_never_committed(registry_pair, clients, repo_name):
    image = build_image("oci", layer_sizes=[5000])
    push(registry_pair, repo_name, image, "v1")
    primary, secondary = clients
    real = image.blobs[1]
    lying = Descriptor(digest=real.digest, size=real.size + 1)  # a manifest that lies about the size

    with pytest.raises(IntegrityError, match="nothing was committed"):
        await copy_blob(primary, secondary, repo_name, lying, BlobLocations())
    assert await secondary.blob_size(repo_name, real.digest) is None


async def test_missing_tag_fails_with_a_clear_permanent_error(clients, repo_name):
    primary, _ = clients
    with pytest.raises(NotFound, match=r"primary: GET /v2/.*/manifests/nope -> 404 MANIFEST_UNKNOWN"):
        await resolve_image(primary, ImageReference(repo_name, "nope"))


async def test_deleting_one_tag_keeps_the_other_tags_of_its_digest(registry_pair, clients, repo_name):
    image = build_image("docker")
    with Pusher(registry_pair.primary.url) as pusher:
        for tag in ("keep", "drop"):
            pusher.push_image(repo_name, image, tag)
    primary, secondary = clients
    for tag in ("keep", "drop"):
        await replicate(primary, secondary, repo_name, tag, BlobLocations())
    # The registry deletes by digest only: drop both tags on the primary, then put "keep" back.
    with Pusher(registry_pair.primary.url) as pusher:
        pusher.delete_manifest(repo_name, image.digest)
        pusher.push_image(repo_name, image, "keep")

    deletion = await converge_deletion(primary, secondary, ImageReference(repo_name, "drop"))

    assert deletion.outcome is DeletionOutcome.REMOVED and deletion.restored_tags == ("keep",)
    with Pusher(registry_pair.secondary.url) as check:
        assert sorted(check.tags(repo_name)) == ["keep"]
        assert check.head_manifest(repo_name, "keep") == image.digest


async def test_deleting_a_tag_of_a_wide_repository_asks_only_the_tags_that_may_share_its_digest(
    registry_pair, clients, secondary_proxy, repo_name
):
    shared, others = build_image("docker"), [build_image("oci", layer_sizes=[64]) for _ in range(30)]
    with Pusher(registry_pair.secondary.url) as pusher:  # the secondary as a backfill left it
        for tag in ("keep", "drop"):
            pusher.push_image(repo_name, shared, tag)
        for number, image in enumerate(others):
            pusher.push_image(repo_name, image, f"other-{number}")
    with Pusher(registry_pair.primary.url) as pusher:  # the primary has "keep" and not "drop"
        pusher.push_image(repo_name, shared, "keep")
    known = {"keep": shared.digest, "drop": shared.digest} | {
        f"other-{number}": image.digest for number, image in enumerate(others)
    }
    primary, secondary = clients
    secondary_proxy.clear()

    deletion = await converge_deletion(primary, secondary, ImageReference(repo_name, "drop"), known=known)

    assert deletion.outcome is DeletionOutcome.REMOVED and deletion.restored_tags == ("keep",)
    # The tag itself, then "keep", the one other tag at its digest: none of the 30 others.
    assert secondary_proxy.count("HEAD", "/manifests/") == 2
    with Pusher(registry_pair.secondary.url) as check:
        assert sorted(check.tags(repo_name)) == sorted(set(known) - {"drop"})
        assert check.head_manifest(repo_name, "keep") == shared.digest


async def test_deletion_leaves_what_the_primary_still_has(registry_pair, clients, repo_name):
    image = build_image("oci")
    push(registry_pair, repo_name, image, "v1")
    primary, secondary = clients
    await replicate(primary, secondary, repo_name, "v1", BlobLocations())

    kept = await converge_deletion(primary, secondary, ImageReference(repo_name, "v1"))
    assert kept.outcome is DeletionOutcome.KEPT

    with Pusher(registry_pair.primary.url) as pusher:
        pusher.delete_manifest(repo_name, image.digest)
    removed = await converge_deletion(primary, secondary, ImageReference(repo_name, image.digest))
    again = await converge_deletion(primary, secondary, ImageReference(repo_name, image.digest))

    assert (removed.outcome, again.outcome) == (DeletionOutcome.REMOVED, DeletionOutcome.ABSENT)
    with Pusher(registry_pair.secondary.url) as check:
        assert check.head_manifest(repo_name, "v1") is None


async def test_concurrent_tags_of_a_new_repository_send_a_shared_blob_once(
    registry_pair, clients, secondary_proxy, repo_name
):
    """A backfill copies a repository's tags at once, without HEADs first: the layers every tag shares
    (and an image tagged twice) must still travel once, and every tag must arrive whole."""
    from georeg.repository_sync import sync_repository

    base = random_blob(2048)
    images = {f"v{number}": build_image("oci", layers=[base, random_blob(1024)]) for number in range(6)}
    images["latest"] = images["v5"]  # one image under two tags: every blob of it shared
    for tag, image in images.items():
        push(registry_pair, repo_name, image, tag)
    primary, secondary = clients

    result = await sync_repository(
        primary,
        secondary,
        repo_name,
        SETTINGS.model_copy(update={"concurrency": ConcurrencyConfig(blobs_per_image=8, tags_per_repository=8)}),
    )

    assert result.ok and sorted(result.copied) == sorted(images)
    committed = [
        r for r in secondary_proxy.requests if r.method == "PUT" and "/blobs/uploads/" in r.path and r.status == 201
    ]
    distinct = {blob.digest for image in images.values() for blob in image.blobs}
    assert len(committed) == len(distinct)  # the base once, each config and own layer once
    # The manifest PUT's answer named the digest: no verifying HEAD, and no HEAD for a new repository's tags.
    assert not [r for r in secondary_proxy.requests if r.method == "HEAD" and "/manifests/" in r.path]
    with Pusher(registry_pair.secondary.url) as check:
        assert {tag: check.head_manifest(repo_name, tag) for tag in images} == {
            tag: image.digest for tag, image in images.items()
        }


async def test_one_blob_copied_into_many_repositories_at_once_travels_once(
    registry_pair, clients, secondary_proxy, repo_name
):
    """The others wait for the one copy, then mount it, one at a time: never two uploads at once."""
    import asyncio

    image = build_image("oci", layer_sizes=[4096])
    repositories = [f"{repo_name}-{number}" for number in range(5)]
    for repository in repositories:
        push(registry_pair, repository, image, "v1")
    primary, secondary = clients
    locations = BlobLocations()
    layer = Descriptor(digest=image.blobs[1].digest, size=image.blobs[1].size, media_type=image.blobs[1].media_type)

    copies = await asyncio.gather(
        *(copy_blob(primary, secondary, repository, layer, locations) for repository in repositories)
    )

    assert sorted(copy.outcome.value for copy in copies) == ["copied"] + ["mounted"] * 4
    assert len([r for r in secondary_proxy.requests if r.method == "PUT" and "/blobs/uploads/" in r.path]) == 1
