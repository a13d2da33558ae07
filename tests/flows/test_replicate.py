"""The replicate-image and delete-image flows, run through a real Prefect API against real registries."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from georeg.config import ConcurrencyConfig
from georeg.errors import Denied, NotFound, ReplicationError, TransientRegistryError
from georeg.flows.delete import delete_image
from georeg.flows.replicate import replicate_image
from tests.conftest import RegistryPair
from tests.support.images import Pusher, build_image, build_index, build_signature, random_blob
from tests.support.proxy import FaultProxy

MIB = 1024 * 1024
CHUNKED = {"chunk_size": 256 * 1024, "monolithic_max": 64 * 1024}

pytestmark = pytest.mark.usefixtures("prefect_api_url")


@pytest.fixture
def secondary_proxy(token_registry_pair: RegistryPair) -> Iterator[FaultProxy]:
    with FaultProxy(token_registry_pair.secondary.url) as proxy:
        yield proxy


@pytest.fixture
def primary_proxy(token_registry_pair: RegistryPair) -> Iterator[FaultProxy]:
    with FaultProxy(token_registry_pair.primary.url) as proxy:
        yield proxy


def primary_pusher(pair: RegistryPair) -> Pusher:
    return Pusher(pair.primary.url, pair.token_setup)


def secondary_pusher(pair: RegistryPair) -> Pusher:
    return Pusher(pair.secondary.url, pair.token_setup)


async def test_every_media_type_replicates_digest_equal_with_geo_tokens(token_registry_pair, write_config, repo_name):
    pair = token_registry_pair
    docker = build_image("docker")
    oci = build_image("oci", layer_sizes=[300_000])  # goes through the chunked path
    index = build_index([build_image("docker", platform=("linux", "arm64")), build_image("docker")], kind="docker")
    oci_index = build_index([build_image("oci", platform=("linux", "s390x")), build_image("oci")], kind="oci")
    signature_tag, signature = build_signature(docker)
    images = {"docker": docker, "oci": oci, "list": index, "oci-index": oci_index, signature_tag: signature}
    with primary_pusher(pair) as pusher:
        for tag, image in images.items():
            pusher.push_image(repo_name, image, tag)
    write_config(pair.primary.url, pair.secondary.url, token_setup=pair.token_setup, replication=CHUNKED)

    for tag, image in images.items():
        [result] = await replicate_image(repo_name, tag)
        assert result["digest"] == image.digest

    with secondary_pusher(pair) as secondary:
        for tag, image in images.items():
            assert secondary.get_manifest(repo_name, tag) == (image.manifest, image.media_type)
            for child in image.children:
                assert secondary.head_manifest(repo_name, child.digest) == child.digest
            for blob in image.all_blobs():
                assert secondary.blob_exists(repo_name, blob.digest)


async def test_replicating_by_digest_puts_no_tag(token_registry_pair, write_config, repo_name):
    pair = token_registry_pair
    image = build_image("oci")
    with primary_pusher(pair) as pusher:
        pusher.push_image(repo_name, image, "v1")
    write_config(pair.primary.url, pair.secondary.url, token_setup=pair.token_setup)

    await replicate_image(repo_name, image.digest)

    with secondary_pusher(pair) as secondary:
        assert secondary.head_manifest(repo_name, image.digest) == image.digest
        assert secondary.tags(repo_name) == []


async def test_token_rejected_mid_copy_is_reminted_and_the_copy_finishes(
    token_registry_pair, write_config, secondary_proxy, repo_name
):
    pair = token_registry_pair
    image = build_image("oci", layers=[random_blob(MIB)])
    with primary_pusher(pair) as pusher:
        pusher.push_image(repo_name, image, "big")
    write_config(pair.primary.url, secondary_proxy.url, token_setup=pair.token_setup, replication=CHUNKED)
    # The second chunk is refused as if its token had expired on the way.
    secondary_proxy.add_fault("PATCH", "/blobs/uploads/", status=401, times=1, headers=_expired_challenge())

    [result] = await replicate_image(repo_name, "big")

    patches = [r for r in secondary_proxy.requests if r.method == "PATCH"]
    assert [r.status for r in patches].count(401) == 1
    tokens_used = {r.authorization for r in secondary_proxy.requests if r.authorization}
    assert len(tokens_used) >= 2  # a fresh token was minted after the refusal
    assert result["digest"] == image.digest and result["bytes_copied"] == sum(b.size for b in image.blobs)
    with secondary_pusher(pair) as secondary:
        assert secondary.head_manifest(repo_name, "big") == image.digest


def _expired_challenge() -> dict[str, str]:
    return {"WWW-Authenticate": 'Bearer realm="x",service="container_registry",error="invalid_token"'}


async def test_transient_faults_of_a_request_are_retried_by_the_request_alone(
    token_registry_pair, write_config, primary_proxy, repo_name
):
    pair = token_registry_pair
    image = build_image("docker", layer_sizes=[2000, 3000])
    with primary_pusher(pair) as pusher:
        pusher.push_image(repo_name, image, "v1")
    write_config(primary_proxy.url, pair.secondary.url, token_setup=pair.token_setup)
    primary_proxy.add_fault("GET", "/blobs/sha256:", status=500, times=1)
    primary_proxy.add_fault("GET", "/blobs/sha256:", reset=True, times=1)
    primary_proxy.add_fault("GET", "/blobs/sha256:", status=429, times=1, headers={"Retry-After": "1"})
    primary_proxy.add_fault("GET", "/manifests/v1", status=503, times=2)

    [result] = await replicate_image(repo_name, "v1")

    # The image was resolved once: the request retried, the task did not run again.
    assert [r.status for r in primary_proxy.requests if r.path.endswith("/manifests/v1")] == [503, 503, 200]
    assert {500, 0, 429} <= {r.status for r in primary_proxy.requests}
    assert result["digest"] == image.digest
    with secondary_pusher(pair) as secondary:
        assert secondary.head_manifest(repo_name, "v1") == image.digest


async def test_a_blob_stream_that_breaks_is_retried_by_the_task(
    token_registry_pair, write_config, primary_proxy, repo_name
):
    pair = token_registry_pair
    image = build_image("docker", layer_sizes=[3000])
    layer = image.blobs[1].digest
    with primary_pusher(pair) as pusher:
        pusher.push_image(repo_name, image, "v1")
    write_config(
        primary_proxy.url, pair.secondary.url, token_setup=pair.token_setup, replication={"retry_delay_seconds": 0}
    )
    # The headers promise the whole blob; the body stops after one byte, and the connection closes.
    primary_proxy.add_fault("GET", f"/blobs/{layer}", status=200, body=b"x", headers={"Content-Length": "3000"})

    [result] = await replicate_image(repo_name, "v1")

    assert [r.status for r in primary_proxy.requests if r.path.endswith(f"/blobs/{layer}")] == [200, 200]
    assert primary_proxy.count("GET", "/manifests/v1") == 2  # the whole image again, by the task's retry
    assert result["digest"] == image.digest
    with secondary_pusher(pair) as secondary:
        assert secondary.blob_exists(repo_name, layer)


async def test_a_secondary_down_for_good_costs_a_bounded_number_of_requests(
    token_registry_pair, write_config, primary_proxy, secondary_proxy, repo_name
):
    """Retries do not multiply: each request retries within the image's one budget, and what a request
    has retried is not retried again by the task around it."""
    pair = token_registry_pair
    image = build_image("oci", layer_sizes=[1000] * 6)
    with primary_pusher(pair) as pusher:
        pusher.push_image(repo_name, image, "v1")
    budget = {"retries_per_image": 5, "request_attempts": 4, "task_retries": 3, "retry_delay_seconds": 0}
    write_config(primary_proxy.url, secondary_proxy.url, token_setup=pair.token_setup, replication=budget)
    secondary_proxy.add_fault(None, "/v2/", status=503, times=100_000)

    with pytest.raises(TransientRegistryError, match=r"secondary: HEAD .*/blobs/.* -> 503") as failure:
        await replicate_image(repo_name, "v1")

    assert failure.value.exhausted
    sent = len(secondary_proxy.requests)
    # One first attempt per blob at most (at least the blobs started at once), then the image's 5 retries:
    # not 7 blobs x 4 attempts x 4 task runs.
    at_once = min(len(image.blobs), ConcurrencyConfig().blobs_per_image)
    assert at_once <= sent <= len(image.blobs) + budget["retries_per_image"]
    assert primary_proxy.count("GET", "/manifests/v1") == 1  # the task did not run again


async def test_a_permanent_error_fails_fast_and_claims_nothing(
    token_registry_pair, write_config, secondary_proxy, repo_name
):
    pair = token_registry_pair
    image = build_image("oci")
    with primary_pusher(pair) as pusher:
        pusher.push_image(repo_name, image, "v1")
    write_config(pair.primary.url, secondary_proxy.url, token_setup=pair.token_setup)
    secondary_proxy.add_fault("PUT", "/manifests/v1", status=403, times=10)

    with pytest.raises(Denied, match=r"secondary: PUT /v2/.*/manifests/v1 -> 403"):
        await replicate_image(repo_name, "v1")

    assert secondary_proxy.count("PUT", "/manifests/") == 1  # not retried
    with secondary_pusher(pair) as secondary:
        assert secondary.head_manifest(repo_name, "v1") is None


async def test_a_missing_image_fails_with_what_to_check(token_registry_pair, write_config, repo_name):
    pair = token_registry_pair
    write_config(pair.primary.url, pair.secondary.url, token_setup=pair.token_setup)
    with pytest.raises(NotFound, match=r"primary: GET .*/manifests/ghost -> 404"):
        await replicate_image(repo_name, "ghost")


async def test_one_failing_secondary_fails_the_run_but_not_the_others(
    token_registry_pair, write_config, secondary_proxy, repo_name
):
    pair = token_registry_pair
    image = build_image("oci")
    with primary_pusher(pair) as pusher:
        pusher.push_image(repo_name, image, "v1")
    write_config(pair.primary.url, pair.secondary.url, secondary_proxy.url, token_setup=pair.token_setup)
    secondary_proxy.add_fault(None, "/v2/", status=403, times=1000)

    with pytest.raises(ReplicationError, match=r"secondary1: .*403"):
        await replicate_image(repo_name, "v1")

    with secondary_pusher(pair) as secondary:
        assert secondary.head_manifest(repo_name, "v1") == image.digest


async def test_delete_flow_removes_the_tag_and_keeps_its_siblings(token_registry_pair, write_config, repo_name):
    pair = token_registry_pair
    image = build_image("docker")
    with primary_pusher(pair) as pusher:
        pusher.push_image(repo_name, image, "stay")
        pusher.push_image(repo_name, image, "go")
    write_config(pair.primary.url, pair.secondary.url, token_setup=pair.token_setup)
    for tag in ("stay", "go"):
        await replicate_image(repo_name, tag)
    with primary_pusher(pair) as pusher:
        pusher.delete_manifest(repo_name, image.digest)
        pusher.push_image(repo_name, image, "stay")

    [result] = await delete_image(repo_name, "go")

    assert result["outcome"] == "removed" and result["restored_tags"] == ["stay"]
    with secondary_pusher(pair) as secondary:
        assert secondary.tags(repo_name) == ["stay"]
