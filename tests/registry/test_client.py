"""RegistryClient against real `docker-registry` processes, with a fault-injecting proxy where failures are needed."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from georeg.config import RegistryConfig, ReplicationConfig
from georeg.errors import (
    Denied,
    InvalidRequest,
    NotFound,
    PermanentRegistryError,
    TransientRegistryError,
    Unauthorized,
    Unsupported,
)
from georeg.limits import RegistryLimits
from georeg.registry import client as client_module
from georeg.registry.auth import PULL_PUSH_DELETE
from georeg.registry.client import RegistryClient
from georeg.registry.manifests import Descriptor, Manifest
from georeg.state import StateStore
from tests.conftest import RegistryPair
from tests.support.images import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    Pusher,
    build_image,
    build_index,
    random_blob,
    sha256_digest,
)
from tests.support.proxy import FaultProxy
from tests.support.registry import RegistryProcess, free_port
from tests.support.services import wait_until


def make_client(url: str, *, name: str = "primary", **settings: object) -> RegistryClient:
    return RegistryClient(
        name, RegistryConfig(url=url), ReplicationConfig(**settings), allowed_actions=PULL_PUSH_DELETE
    )


@pytest.fixture
def registry_url(registry_pair: RegistryPair) -> str:
    return registry_pair.primary.url


@pytest.fixture
def proxy(registry_pair: RegistryPair) -> Iterator[FaultProxy]:
    with FaultProxy(registry_pair.primary.url) as running:
        yield running


def build(kind: str) -> Image:
    if kind == "docker-list":
        return build_index([build_image("docker"), build_image("docker", platform=("linux", "arm64"))], "docker")
    if kind == "oci-index":
        return build_index([build_image("oci"), build_image("oci", platform=("linux", "arm64"))], "oci")
    return build_image(kind)


def push_blobs(url: str, repo: str, image: Image) -> None:
    """Blobs go in with the independent pusher, so only the manifest calls exercise georeg."""
    with Pusher(url) as pusher:
        for blob in image.all_blobs():
            pusher.push_blob(repo, blob)


async def chunks_of(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


# --- base and manifests ---------------------------------------------------------------------------


async def test_ping_counts_one_get(registry_url: str) -> None:
    async with make_client(registry_url) as client:
        await client.ping()
        assert client.stats.requests["GET"] == 1
        assert client.stats.retries == 0


async def test_ping_unreachable_registry_is_transient() -> None:
    async with make_client(f"http://127.0.0.1:{free_port()}", name="nowhere", request_attempts=1) as client:
        with pytest.raises(TransientRegistryError, match=r"^nowhere: GET /v2/ failed: ConnectError"):
            await client.ping()


@pytest.mark.parametrize(
    ("kind", "media_type"),
    [("docker", DOCKER_MANIFEST), ("oci", OCI_MANIFEST), ("docker-list", DOCKER_LIST), ("oci-index", OCI_INDEX)],
)
async def test_manifest_round_trip(registry_url: str, repo_name: str, kind: str, media_type: str) -> None:
    image = build(kind)
    push_blobs(registry_url, repo_name, image)
    async with make_client(registry_url) as client:
        for child in image.children:  # an index needs its children in the same repository, by digest
            assert await client.put_manifest(repo_name, child.digest, Manifest(child.manifest, child.media_type)) == (
                child.digest
            )
        manifest = Manifest(image.manifest, image.media_type)
        assert manifest.media_type == media_type
        assert await client.put_manifest(repo_name, "v1", manifest) == image.digest

        for reference in ("v1", image.digest):
            fetched = await client.get_manifest(repo_name, reference)
            assert fetched.content == image.manifest  # byte for byte, never re-serialised
            assert (fetched.digest, fetched.media_type) == (image.digest, media_type)
            assert await client.head_manifest(repo_name, reference) == Descriptor(
                image.digest, len(image.manifest), media_type
            )
        assert [child.digest for child in fetched.children()] == [child.digest for child in image.children]
    with Pusher(registry_url) as pusher:  # what the registry stores, seen by an independent reader
        assert pusher.get_manifest(repo_name, "v1") == (image.manifest, media_type)


async def test_missing_manifest(registry_url: str, repo_name: str) -> None:
    with Pusher(registry_url) as pusher:
        pusher.push_image(repo_name, build_image("oci"), "present")
    async with make_client(registry_url, name="eu-west") as client:
        assert await client.head_manifest(repo_name, "absent") is None
        assert await client.head_manifest("test/never-pushed-anywhere", "latest") is None
        with pytest.raises(NotFound) as caught:
            await client.get_manifest(repo_name, "absent")
    message = str(caught.value)
    assert message.startswith(f"eu-west: GET /v2/{repo_name}/manifests/absent -> 404 MANIFEST_UNKNOWN")
    assert (caught.value.status, caught.value.code, caught.value.method) == (404, "MANIFEST_UNKNOWN", "GET")
    assert not caught.value.transient


async def test_delete_manifest(registry_url: str, repo_name: str) -> None:
    image, keeper = build_image("docker"), build_image("docker")
    with Pusher(registry_url) as pusher:
        pusher.push_image(repo_name, image, "doomed")
        pusher.push_image(repo_name, image, "doomed-too")
        pusher.push_image(repo_name, keeper, "keeper")
    async with make_client(registry_url) as client:
        await client.delete_manifest(repo_name, image.digest)
        assert await client.head_manifest(repo_name, "doomed") is None
        assert await client.head_manifest(repo_name, image.digest) is None
        assert await client.tags(repo_name) == ["keeper"]  # the delete took every tag of the digest
        assert (await client.head_manifest(repo_name, "keeper")) is not None
        with pytest.raises(NotFound):
            await client.delete_manifest(repo_name, image.digest)


async def test_tags(registry_url: str, repo_name: str) -> None:
    tags = ["v1", "v2", "latest", "sha256-" + "a" * 64 + ".sig"]
    with Pusher(registry_url) as pusher:
        for tag in tags:
            pusher.push_image(repo_name, build_image("oci", layer_sizes=[64]), tag)
    async with make_client(registry_url) as client:
        assert sorted(await client.tags(repo_name)) == sorted(tags)
        assert await client.tags(repo_name + "-unknown") == []


@pytest.fixture(scope="module")
def catalog_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RegistryProcess, list[str]]]:
    """A registry of its own, so the catalog holds exactly the repositories pushed here."""
    repos = ["cat/alpha", "cat/beta", "cat/nested/gamma", "cat/delta", "zeta"]
    with RegistryProcess(tmp_path_factory.mktemp("catalog")) as registry, Pusher(registry.url) as pusher:
        for repo in repos:
            pusher.push_image(repo, build_image("oci", layer_sizes=[32]), "v1")
        yield registry, sorted(repos)


async def test_catalog_returns_every_repository(catalog_registry: tuple[RegistryProcess, list[str]]) -> None:
    registry, repos = catalog_registry
    async with make_client(registry.url) as client:
        assert [name async for name in client.catalog()] == repos
        assert client.stats.requests["GET"] == 1  # all fit on one page of 1000


async def test_catalog_follows_link_pages(
    catalog_registry: tuple[RegistryProcess, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, repos = catalog_registry
    monkeypatch.setattr(client_module, "_CATALOG_PAGE", 2)
    with FaultProxy(registry.url) as proxy:
        async with make_client(proxy.url) as client:
            assert [name async for name in client.catalog()] == repos
        pages = [r for r in proxy.requests if r.path == "/v2/_catalog"]
    assert len(pages) >= 3  # five repositories, two per page
    assert all(r.status == 200 and "n=2" in r.query for r in pages)
    assert "last=" not in pages[0].query and all("last=" in r.query for r in pages[1:])


# --- blobs ------------------------------------------------------------------------------------------


async def test_blob_size_and_reads(registry_url: str, repo_name: str) -> None:
    blob = random_blob(100_000)
    with Pusher(registry_url) as pusher:
        pusher.push_blob(repo_name, blob)
    async with make_client(registry_url) as client:
        assert await client.blob_size(repo_name, blob.digest) == blob.size
        assert await client.blob_size(repo_name, sha256_digest(b"not there")) is None
        assert await client.blob_size(repo_name + "-other", blob.digest) is None  # linked per repository

        async with client.open_blob(repo_name, blob.digest) as response:
            assert response.status_code == 200
            assert await response.aread() == blob.data
        async with client.open_blob(repo_name, blob.digest, offset=65_537) as response:
            assert response.status_code == 206
            assert response.headers["Content-Range"] == f"bytes 65537-{blob.size - 1}/{blob.size}"
            assert await response.aread() == blob.data[65_537:]
        with pytest.raises(NotFound, match="BLOB_UNKNOWN"):
            async with client.open_blob(repo_name, sha256_digest(b"not there")):
                pass


async def test_monolithic_upload(registry_url: str, repo_name: str) -> None:
    blob = random_blob(70_000)
    async with make_client(registry_url) as client:
        location = await client.start_upload(repo_name)
        assert location is not None and location.startswith(registry_url)
        await client.complete_upload(location, blob.digest, blob.data)
        assert await client.blob_size(repo_name, blob.digest) == blob.size
        assert client.stats.bytes_uploaded == blob.size
    with Pusher(registry_url) as pusher:
        assert pusher.client.get(f"/v2/{repo_name}/blobs/{blob.digest}").content == blob.data


async def test_chunked_upload_follows_latest_location(registry_url: str, repo_name: str) -> None:
    blob = random_blob(300_000)
    pieces = [blob.data[:100_000], blob.data[100_000:250_000], blob.data[250_000:]]
    async with make_client(registry_url) as client:
        location = await client.start_upload(repo_name)
        assert location is not None
        seen = [location]
        for piece in pieces:
            location = await client.upload_chunk(location, piece, len(piece))
            seen.append(location)
        assert len(set(seen)) == len(seen)  # every answer moves the upload state on
        await client.complete_upload(location, blob.digest)
        assert await client.blob_size(repo_name, blob.digest) == blob.size
        async with client.open_blob(repo_name, blob.digest) as response:
            assert await response.aread() == blob.data
        assert client.stats.bytes_uploaded == blob.size


async def test_streamed_chunks_and_upload_offset(registry_url: str, repo_name: str) -> None:
    blob = random_blob(200_000)
    first, rest = blob.data[:120_000], blob.data[120_000:]
    async with make_client(registry_url) as client:
        location = await client.start_upload(repo_name)
        assert location is not None
        assert (await client.upload_offset(location))[0] == 0
        location = await client.upload_chunk(location, chunks_of(first, 16_384), len(first))
        received, location = await client.upload_offset(location)
        assert received == len(first)
        location = await client.upload_chunk(location, chunks_of(rest, 10_000), len(rest))
        assert (await client.upload_offset(location))[0] == blob.size
        await client.complete_upload(location, blob.digest)
        assert await client.blob_size(repo_name, blob.digest) == blob.size


async def test_upload_with_wrong_digest_is_refused(registry_url: str, repo_name: str) -> None:
    blob = random_blob(1000)
    async with make_client(registry_url) as client:
        location = await client.start_upload(repo_name)
        assert location is not None
        with pytest.raises(InvalidRequest, match="DIGEST_INVALID"):
            await client.complete_upload(location, sha256_digest(b"something else"), blob.data)
        assert await client.blob_size(repo_name, blob.digest) is None


async def test_cancel_upload_makes_location_unusable(registry_url: str, repo_name: str) -> None:
    blob = random_blob(5000)
    async with make_client(registry_url) as client:
        location = await client.start_upload(repo_name)
        assert location is not None
        location = await client.upload_chunk(location, blob.data, blob.size)
        await client.cancel_upload(location)
        with pytest.raises(NotFound, match="BLOB_UPLOAD_UNKNOWN"):
            await client.upload_offset(location)
        with pytest.raises(NotFound, match="BLOB_UPLOAD_UNKNOWN"):
            await client.complete_upload(location, blob.digest)
        await client.cancel_upload(location)  # cancelling twice is harmless
        assert await client.blob_size(repo_name, blob.digest) is None


async def test_cross_repository_mount(registry_url: str, repo_name: str) -> None:
    source, target = repo_name + "-a", repo_name + "-b"
    blob = random_blob(4000)
    with Pusher(registry_url) as pusher:
        pusher.push_blob(source, blob)
    async with make_client(registry_url) as client:
        assert await client.start_upload(target, mount_from=source, digest=blob.digest) is None  # 201: mounted
        assert await client.blob_size(target, blob.digest) == blob.size


async def test_mount_of_unknown_blob_falls_back_to_upload(registry_url: str, repo_name: str) -> None:
    source, target = repo_name + "-a", repo_name + "-b"
    blob = random_blob(4000)
    with Pusher(registry_url) as pusher:
        pusher.push_blob(source, random_blob(10))  # the source exists, just without this blob
    async with make_client(registry_url) as client:
        location = await client.start_upload(target, mount_from=source, digest=blob.digest)
        assert location is not None  # 202: the registry opened a normal upload instead
        assert await client.blob_size(target, blob.digest) is None
        await client.complete_upload(location, blob.digest, blob.data)
        assert await client.blob_size(target, blob.digest) == blob.size
        assert await client.blob_size(source, blob.digest) is None


# --- errors and retries through the fault proxy -------------------------------------------------


async def test_500_is_retried_transparently(proxy: FaultProxy, registry_url: str, repo_name: str) -> None:
    image = build_image("docker")
    with Pusher(registry_url) as pusher:
        pusher.push_image(repo_name, image, "v1")
    proxy.add_fault("GET", r"/manifests/v1$", status=500, times=1)
    async with make_client(proxy.url) as client:
        assert (await client.get_manifest(repo_name, "v1")).digest == image.digest
        assert client.stats.retries == 1
    assert [r.status for r in proxy.requests if "/manifests/" in r.path] == [500, 200]


async def test_429_waits_for_retry_after(proxy: FaultProxy, repo_name: str) -> None:
    proxy.add_fault("GET", r"/tags/list$", status=429, times=1, headers={"Retry-After": "1"})
    async with make_client(proxy.url) as client:
        started = time.monotonic()
        assert await client.tags(repo_name) == []
        elapsed = time.monotonic() - started
        assert client.stats.retries == 1
    assert elapsed >= 0.95
    assert [r.status for r in proxy.requests] == [429, 404]


async def test_a_429_pauses_every_client_that_shares_the_state(
    proxy: FaultProxy, repo_name: str, tmp_path: Path
) -> None:
    """Two workers' clients of one registry: the one told to retry after 2 s pauses the other too."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    stores = [StateStore(url), StateStore(url)]  # one engine each, as two worker processes have
    await stores[0].ensure_schema()
    clients = [
        RegistryClient(
            name,
            RegistryConfig(url=proxy.url),
            ReplicationConfig(),
            allowed_actions=PULL_PUSH_DELETE,
            limits=RegistryLimits.of(RegistryConfig(url=proxy.url), store),
        )
        for name, store in zip(("worker-1", "worker-2"), stores, strict=True)
    ]
    proxy.add_fault("GET", r"/tags/list$", status=429, times=1, headers={"Retry-After": "2"})
    try:
        assert await clients[0].tags(repo_name) == []  # told to wait, waits, then gets its answer
        assert await clients[1].tags(repo_name) == []  # never told anything, waits all the same
    finally:
        for client in clients:
            await client.aclose()
        for store in stores:
            await store.close()
    told, *after = proxy.requests
    assert told.status == 429 and [r.status for r in after] == [404, 404]
    assert all(r.arrived_at >= told.arrived_at + 1.95 for r in after), [r.arrived_at - told.arrived_at for r in after]


async def test_persistent_503_gives_up_after_request_attempts(proxy: FaultProxy, repo_name: str) -> None:
    proxy.add_fault("HEAD", r"/blobs/", status=503, times=100)
    async with make_client(proxy.url, request_attempts=3) as client:
        with pytest.raises(TransientRegistryError) as caught:
            await client.blob_size(repo_name, sha256_digest(b"x"))
        assert client.stats.retries == 2
    assert caught.value.status == 503 and caught.value.transient
    assert proxy.count("HEAD", "/blobs/") == 3


async def test_connection_reset_is_retried(proxy: FaultProxy, registry_url: str, repo_name: str) -> None:
    blob = random_blob(2000)
    with Pusher(registry_url) as pusher:
        pusher.push_blob(repo_name, blob)
    proxy.add_fault("HEAD", r"/blobs/", reset=True, times=1)
    async with make_client(proxy.url) as client:
        assert await client.blob_size(repo_name, blob.digest) == blob.size
        assert client.stats.retries == 1
    assert [r.status for r in proxy.requests] == [0, 200]


async def test_403_is_denied_and_not_retried(proxy: FaultProxy, repo_name: str) -> None:
    proxy.add_fault("GET", r"/manifests/", status=403, times=5)
    async with make_client(proxy.url) as client:
        with pytest.raises(Denied, match="lack permission") as caught:
            await client.get_manifest(repo_name, "v1")
        assert client.stats.retries == 0
    assert caught.value.status == 403 and not caught.value.transient
    assert proxy.count("GET", "/manifests/") == 1


async def test_401_on_open_registry_is_unauthorized(proxy: FaultProxy, repo_name: str) -> None:
    proxy.add_fault(None, r"^/v2/$", status=401, times=5)
    async with make_client(proxy.url) as client:
        with pytest.raises(Unauthorized, match="auth settings"):
            await client.ping()
    assert proxy.count("GET", "/v2/") == 1


async def test_manifest_with_missing_blobs_is_invalid(proxy: FaultProxy, repo_name: str) -> None:
    image = build_image("docker")
    async with make_client(proxy.url) as client:
        with pytest.raises(InvalidRequest) as caught:
            await client.put_manifest(repo_name, "v1", Manifest(image.manifest, image.media_type))
    assert "MANIFEST_BLOB_UNKNOWN" in str(caught.value)
    assert (caught.value.status, caught.value.code) == (400, "MANIFEST_BLOB_UNKNOWN")
    assert proxy.count("PUT") == 1


async def test_delete_disabled_is_unsupported(tmp_path: Path, repo_name: str) -> None:
    image = build_image("oci")
    with RegistryProcess(tmp_path, extra_config={"storage": {"delete": {"enabled": False}}}) as registry:
        with Pusher(registry.url) as pusher:
            pusher.push_image(repo_name, image, "v1")
        async with make_client(registry.url, name="readonly-dr") as client:
            with pytest.raises(Unsupported) as caught:
                await client.delete_manifest(repo_name, image.digest)
            assert (await client.head_manifest(repo_name, "v1")) is not None
    assert caught.value.status == 405
    assert "storage.delete.enabled" in str(caught.value)
    assert str(caught.value).startswith(f"readonly-dr: DELETE /v2/{repo_name}/manifests/{image.digest} -> 405")


async def test_streamed_chunk_is_not_replayed(proxy: FaultProxy, repo_name: str) -> None:
    data = random_blob(50_000).data
    proxy.add_fault("PATCH", r"/blobs/uploads/", status=500, times=1)
    async with make_client(proxy.url) as client:
        location = await client.start_upload(repo_name)
        assert location is not None
        with pytest.raises(TransientRegistryError):
            await client.upload_chunk(location, chunks_of(data, 8192), len(data))
        assert client.stats.retries == 0  # a generator body cannot be sent twice: the caller resumes
        assert (await client.upload_offset(location))[0] == 0
    assert proxy.count("PATCH") == 1


async def test_error_messages_never_carry_upload_state(
    proxy: FaultProxy, repo_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    blob = random_blob(3000)
    caplog.set_level(logging.DEBUG, logger="georeg")
    async with make_client(proxy.url, request_attempts=2) as client:
        location = await client.start_upload(repo_name)
        assert location is not None and "_state=" in location

        proxy.add_fault("PATCH", r"/blobs/uploads/", status=500, times=2)
        with pytest.raises(TransientRegistryError) as server_error:
            await client.upload_chunk(location, blob.data, blob.size)
        proxy.add_fault("PUT", r"/blobs/uploads/", reset=True, times=2)
        with pytest.raises(TransientRegistryError) as reset_error:
            await client.complete_upload(location, blob.digest, blob.data)
        await client.cancel_upload(location)
        with pytest.raises(PermanentRegistryError) as gone_error:
            await client.upload_offset(location)

    errors = [server_error.value, reset_error.value, gone_error.value]
    assert [e.status for e in errors] == [500, None, 404]
    for error in errors:
        assert "_state" not in str(error) and "?" not in (error.url or "")
        assert error.url is not None and error.url.startswith(f"/v2/{repo_name}/blobs/uploads/")
    # Each transient failure was retried once and logged once, as a warning; the permanent 404 was not retried.
    logged = [(r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith("georeg")]
    assert [level for level, _ in logged] == [logging.WARNING] * 2, logged

    def first_attempt_failed(method: str, failure: str) -> str:
        path = rf"/v2/{re.escape(repo_name)}/blobs/uploads/[^?\s]+"  # no query string: it holds the upload state
        return rf"primary: {method} {path} {failure} \(attempt 1 of 2, next in \d+\.\ds\)"

    assert re.fullmatch(first_attempt_failed("PATCH", r"-> 500\b.*"), logged[0][1]), logged
    # A reset connection: which transport error httpx reports for it depends on timing.
    assert re.fullmatch(first_attempt_failed("PUT", r"failed: \w+: .*"), logged[1][1]), logged
    assert not [r for r in caplog.records if "_state" in r.getMessage()]


async def test_requests_in_flight_to_a_registry_are_capped_across_clients_of_one_process(proxy, repo_name):
    """Flow runs in one process each open their own clients: the cap holds for all of them together."""
    import asyncio

    missing = [sha256_digest(str(number).encode()) for number in range(40)]
    clients = [make_client(proxy.url, name="secondary", concurrency={"requests_per_registry": 3}) for _ in range(4)]
    held = proxy.hold("/blobs/")  # every HEAD waits at the proxy: those that reach it are those in flight
    try:
        asking = asyncio.gather(
            *(clients[number % 4].blob_size(repo_name, digest) for number, digest in enumerate(missing))
        )
        await asyncio.to_thread(wait_until, lambda: held.waiting >= 3, deadline=10, what="three HEADs at the proxy")
        await asyncio.sleep(0.5)  # room for any more to arrive, which four clients of their own would send (12)
        in_flight = held.waiting
        held.release()
        answers = await asking
    finally:
        held.release()
        await asyncio.gather(*(client.aclose() for client in clients))

    assert in_flight == 3
    assert answers == [None] * 40 and proxy.count("HEAD") == 40
