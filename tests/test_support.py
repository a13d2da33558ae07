"""Self-tests of the test support code against the real registry binary."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

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
    build_signature,
    random_blob,
)
from tests.support.proxy import FaultProxy
from tests.support.registry import RegistryProcess, make_token_auth_setup
from tests.support.tokens import libtrust_key_id, mint_token, repository_access


def push_and_verify_all(pusher: Pusher, repo: str) -> None:
    """Docker image, OCI image, an index of two children and a signature all read back digest-equal."""
    docker = build_image("docker")
    oci = build_image("oci", layer_sizes=[512])
    index = build_index(
        [build_image("oci", platform=("linux", "amd64")), build_image("oci", platform=("linux", "arm64"))],
        kind="oci",
    )
    signature_tag, signature = build_signature(docker)
    cases: list[tuple[str, Image, str]] = [
        ("docker", docker, DOCKER_MANIFEST),
        ("oci", oci, OCI_MANIFEST),
        ("multi", index, OCI_INDEX),
        (signature_tag, signature, OCI_MANIFEST),
    ]
    for tag, image, media_type in cases:
        pusher.push_image(repo, image, tag)
        assert pusher.head_manifest(repo, tag) == image.digest
        body, content_type = pusher.get_manifest(repo, tag)
        assert (body, content_type) == (image.manifest, media_type)
        assert all(pusher.blob_exists(repo, blob.digest) for blob in image.all_blobs())
    for child in index.children:
        assert pusher.head_manifest(repo, child.digest) == child.digest
    assert sorted(pusher.tags(repo)) == sorted(tag for tag, _, _ in cases)
    assert signature_tag == "sha256-" + docker.digest.removeprefix("sha256:") + ".sig"


def test_push_and_read_back_open_registry(registry_pair: RegistryPair, repo_name: str) -> None:
    with Pusher(registry_pair.primary.url) as pusher:
        push_and_verify_all(pusher, repo_name)
        docker_list = build_index([build_image("docker")], kind="docker")
        pusher.push_image(repo_name, docker_list, "list")
        assert pusher.get_manifest(repo_name, "list") == (docker_list.manifest, DOCKER_LIST)
        pusher.delete_manifest(repo_name, docker_list.digest)
        assert pusher.head_manifest(repo_name, "list") is None
        assert pusher.tags("test/does-not-exist") == []


def test_push_and_read_back_token_registry(token_registry_pair: RegistryPair, repo_name: str) -> None:
    with (
        FaultProxy(token_registry_pair.primary.url) as proxy,
        Pusher(proxy.url, token_registry_pair.token_setup) as pusher,
    ):
        push_and_verify_all(pusher, repo_name)
    assert proxy.requests and all((r.authorization or "").startswith("Bearer ") for r in proxy.requests)
    assert all(r.status in (200, 201, 202, 404) for r in proxy.requests)


def test_token_registry_enforces_scope(token_registry_pair: RegistryPair, repo_name: str) -> None:
    setup = token_registry_pair.token_setup
    assert setup is not None
    url = token_registry_pair.primary.url
    image = build_image("docker")
    pull_only = mint_token(setup, [repository_access(repo_name, ["pull"])])
    with Pusher(url, setup) as pusher, httpx.Client(base_url=url) as client:
        for blob in image.blobs:
            pusher.push_blob(repo_name, blob)
        refused = client.put(
            f"/v2/{repo_name}/manifests/latest",
            content=image.manifest,
            headers={"Content-Type": image.media_type, "Authorization": f"Bearer {pull_only}"},
        )
        assert refused.status_code == 401
        assert "insufficient_scope" in refused.headers.get("WWW-Authenticate", "")
        assert client.get("/v2/").status_code == 401
        assert pusher.head_manifest(repo_name, "latest") is None


def test_libtrust_key_id_format(token_registry_pair: RegistryPair) -> None:
    from cryptography.hazmat.primitives import serialization

    setup = token_registry_pair.token_setup
    assert setup is not None
    key = serialization.load_pem_private_key(setup.key_path.read_bytes(), password=None)
    kid = libtrust_key_id(key.public_key())
    # 12 groups of 4 base32 characters. Not str.isupper(): a group of digits only ("2345") has no upper case.
    assert re.fullmatch(r"[A-Z2-7]{4}(:[A-Z2-7]{4}){11}", kid), kid


@pytest.fixture
def proxy(registry_pair: RegistryPair) -> Iterator[FaultProxy]:
    with FaultProxy(registry_pair.primary.url) as running:
        yield running


def test_proxy_fault_once_then_pass(proxy: FaultProxy) -> None:
    proxy.add_fault("GET", r"^/v2/$", status=500, times=1, headers={"X-Fault": "yes"}, body=b"boom")
    with httpx.Client(base_url=proxy.url) as client:
        first = client.get("/v2/")
        assert (first.status_code, first.headers.get("X-Fault"), first.content) == (500, "yes", b"boom")
        assert client.get("/v2/").status_code == 200
    assert [r.status for r in proxy.requests] == [500, 200]
    assert proxy.count("GET", "/v2/") == 2 and proxy.max_concurrent == 1  # one client, one request at a time


def test_proxy_reset_is_a_transport_error(proxy: FaultProxy) -> None:
    proxy.add_fault(None, r"^/v2/$", reset=True)
    with httpx.Client(base_url=proxy.url) as client:
        with pytest.raises(httpx.TransportError):
            client.get("/v2/")
        assert client.get("/v2/").status_code == 200
    assert [r.status for r in proxy.requests] == [0, 200]


def test_proxy_after_upstream_fault_keeps_side_effect(proxy: FaultProxy, repo_name: str) -> None:
    image = build_image("oci", layer_sizes=[100])
    proxy.add_fault("PUT", r"/manifests/", status=503, after_upstream=True)
    with Pusher(proxy.url) as pusher:
        with pytest.raises(AssertionError, match="503"):
            pusher.push_image(repo_name, image, "latest")
        assert pusher.head_manifest(repo_name, "latest") == image.digest


def test_proxy_streams_large_blob_and_keeps_host(proxy: FaultProxy, repo_name: str) -> None:
    blob = random_blob(3 * 1024 * 1024)
    with httpx.Client(base_url=proxy.url) as client:
        opened = client.post(f"/v2/{repo_name}/blobs/uploads/")
        assert opened.status_code == 202
        location = httpx.URL(proxy.url + "/").join(opened.headers["Location"])
        assert location.port == proxy.port
        client.delete(str(location))
    proxy.add_fault("PUT", r"/blobs/uploads/", status=500)
    with Pusher(proxy.url) as pusher:
        with pytest.raises(AssertionError, match="500"):
            pusher.push_blob(repo_name, blob)  # the fault answers only after draining the 3 MiB body
        assert not pusher.blob_exists(repo_name, blob.digest)
        proxy.clear()
        pusher.push_blob(repo_name, blob)
        assert pusher.blob_exists(repo_name, blob.digest)
        fetched = httpx.get(f"{proxy.url}/v2/{repo_name}/blobs/{blob.digest}")
        assert fetched.status_code == 200 and fetched.content == blob.data
    puts = [r for r in proxy.requests if r.method == "PUT" and "/blobs/uploads/" in r.path]
    assert len(puts) == 1 and puts[0].request_bytes >= 3 * 1024 * 1024 and "digest=" in puts[0].query


def test_ec_token_registry_survives_restart(tmp_path: Path, repo_name: str) -> None:
    setup = make_token_auth_setup(tmp_path / "keys", key_type="ec")
    image = build_image("docker")
    with RegistryProcess(tmp_path / "registry", token_auth=setup) as registry:
        with Pusher(registry.url, setup) as pusher:
            pusher.push_image(repo_name, image, "v1")
        registry.restart()
        with Pusher(registry.url, setup) as pusher:
            assert pusher.head_manifest(repo_name, "v1") == image.digest
        assert "auth" in registry.config and registry.config_path.exists()
