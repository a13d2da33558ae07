"""Whole repositories brought level, against real registries: the first pass of a backfill at a size
where repositories share a base layer and tags share layers within a repository."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs

import pytest

from georeg.config import RegistryConfig, ReplicationConfig
from georeg.registry import RegistryClient
from georeg.registry.auth import PULL_ONLY, PULL_PUSH_DELETE
from georeg.repository_sync import RepositorySync, RepositorySyncFailed, sync_repository
from tests.conftest import RegistryPair
from tests.support.images import Pusher, build_image, build_index, random_blob
from tests.support.proxy import FaultProxy, RecordedRequest

SETTINGS = ReplicationConfig(monolithic_max=64 * 1024, request_attempts=3)


def push_shared_layer_repositories(url: str, prefix: str, repositories: int, tags: int) -> dict[str, dict[str, str]]:
    """Repositories that all start from one base layer; within each, every tag shares a layer with the
    others and adds its own; one tag of each is a two-platform index. Returns repository -> tag -> digest."""
    base = random_blob(1500)

    def push_repository(number: int) -> tuple[str, dict[str, str]]:
        rng = random.Random(f"{prefix}-{number}")
        repository = f"{prefix}/app-{number}"
        shared = random_blob(800 + rng.randrange(200))
        digests: dict[str, str] = {}
        with Pusher(url) as pusher:
            for tag_number in range(tags):
                image = build_image("docker", layers=[base, shared, random_blob(300 + rng.randrange(100))])
                if tag_number == 0:
                    image = build_index([image, build_image("docker", layers=[base, shared, random_blob(200)])])
                pusher.push_image(repository, image, f"v{tag_number}")
                digests[f"v{tag_number}"] = image.digest
        return repository, digests

    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(push_repository, range(repositories)))


def blob_linked(request: RecordedRequest) -> tuple[str, str] | None:
    """(repository path, digest) when the request linked a blob into a repository: an upload committed
    (PUT ...?digest=) or a mount (POST ...?mount=) that the registry answered 201."""
    if request.status != 201 or "/blobs/uploads/" not in request.path:
        return None
    query = parse_qs(request.query)
    digest = query.get("digest") or query.get("mount")
    return (request.path.split("/blobs/uploads/")[0], digest[0]) if digest else None


@pytest.fixture
def secondary_proxy(registry_pair: RegistryPair) -> Iterator[FaultProxy]:
    with FaultProxy(registry_pair.secondary.url) as proxy:
        yield proxy


async def test_a_first_pass_over_repositories_sharing_layers_fails_no_repository(
    registry_pair, secondary_proxy, repo_name
):
    """Registry 2.8 on filesystem storage rewrites a repository's blob link file in place (truncate, then
    write) whenever a blob is uploaded or mounted into it again, and a manifest PUT or blob HEAD that
    reads the link meanwhile fails (400 DIGEST_INVALID, 500). So a backfill must not link a blob into a
    repository twice, however the repositories that share it interleave."""
    # More tags than a repository copies at once, as in most registries: its later tags start after
    # other repositories have linked the shared base too.
    pushed = push_shared_layer_repositories(registry_pair.primary.url, repo_name, repositories=16, tags=10)
    settings = SETTINGS
    async with (
        RegistryClient(
            "primary", RegistryConfig(url=registry_pair.primary.url), settings, allowed_actions=PULL_ONLY
        ) as primary,
        RegistryClient(
            "secondary", RegistryConfig(url=secondary_proxy.url), settings, allowed_actions=PULL_PUSH_DELETE
        ) as secondary,
    ):
        room = asyncio.Semaphore(settings.concurrency.repositories)

        async def sync(repository: str) -> RepositorySync:
            async with room:
                try:
                    return await sync_repository(primary, secondary, repository, settings)
                except RepositorySyncFailed as failure:
                    return failure.result

        results = await asyncio.gather(*(sync(repository) for repository in pushed))

    assert {result.repository: result.failed for result in results if not result.ok} == {}
    # Whether a read is torn depends on timing; linking twice, which gives it the chance, does not.
    links = Counter(link for request in secondary_proxy.requests if (link := blob_linked(request)) is not None)
    assert [link for link, times in links.items() if times > 1] == []
    assert primary.stats.retries == 0 and secondary.stats.retries == 0
    with Pusher(registry_pair.secondary.url) as check:
        assert {
            repository: {tag: check.head_manifest(repository, tag) for tag in tags}
            for repository, tags in pushed.items()
        } == pushed
