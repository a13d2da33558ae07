"""Auth: scopes and challenges as pure functions, then jwt and token auth against real token-auth registries."""

from __future__ import annotations

import base64
import dataclasses
import re
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import jwt
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from georeg.config import JwtAuth, RegistryConfig, ReplicationConfig, TokenAuth
from georeg.errors import TransientRegistryError, Unauthorized
from georeg.registry.auth import PULL_ONLY, PULL_PUSH_DELETE, Scope, parse_challenge, request_scopes
from georeg.registry.client import RegistryClient
from georeg.registry.manifests import Manifest
from tests.conftest import RegistryPair
from tests.support.images import Image, Pusher, build_image, build_index, random_blob
from tests.support.proxy import FaultProxy, RecordedRequest
from tests.support.registry import RegistryProcess, TokenAuthSetup, make_token_auth_setup
from tests.support.tokens import mint_token

# --- request_scopes and parse_challenge (pure) --------------------------------------------------------


def scopes_of(method: str, path: str, allowed: frozenset[str] = PULL_PUSH_DELETE) -> list[str]:
    return [str(scope) for scope in request_scopes(httpx.Request(method, f"http://registry.test{path}"), allowed)]


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/v2/", []),
        ("GET", "/v2/_catalog", ["registry:catalog:*"]),
        ("GET", "/v2/_catalog?n=1000&last=a/b", ["registry:catalog:*"]),
        ("GET", "/v2/app/manifests/latest", ["repository:app:pull"]),
        ("HEAD", "/v2/group/sub/app/manifests/sha256:" + "a" * 64, ["repository:group/sub/app:pull"]),
        ("GET", "/v2/group/app/tags/list", ["repository:group/app:pull"]),
        ("HEAD", "/v2/group/app/blobs/sha256:" + "b" * 64, ["repository:group/app:pull"]),
        ("GET", "/v2/group/app/referrers/sha256:" + "c" * 64, ["repository:group/app:pull"]),
        ("PUT", "/v2/group/app/manifests/v1", ["repository:group/app:pull,push"]),
        ("POST", "/v2/group/app/blobs/uploads/", ["repository:group/app:pull,push"]),
        ("PATCH", "/v2/group/app/blobs/uploads/0a1b?_state=xyz", ["repository:group/app:pull,push"]),
        ("PUT", "/v2/group/app/blobs/uploads/0a1b?_state=xyz&digest=sha256:00", ["repository:group/app:pull,push"]),
        ("GET", "/v2/group/app/blobs/uploads/0a1b?_state=xyz", ["repository:group/app:pull"]),
        ("DELETE", "/v2/group/app/manifests/sha256:" + "d" * 64, ["repository:group/app:delete"]),
        ("DELETE", "/v2/group/app/blobs/uploads/0a1b?_state=xyz", ["repository:group/app:delete"]),
        (
            "POST",
            "/v2/group/app/blobs/uploads/?mount=sha256:" + "e" * 64 + "&from=other/base",
            ["repository:group/app:pull,push", "repository:other/base:pull"],
        ),
        # a path component literally named like an API keyword belongs to the repository name
        ("GET", "/v2/team/blobs/manifests/v1", ["repository:team/blobs:pull"]),
        ("HEAD", "/v2/team/blobs/blobs/sha256:" + "f" * 64, ["repository:team/blobs:pull"]),
        ("POST", "/v2/blobs/blobs/uploads/", ["repository:blobs:pull,push"]),
        ("PATCH", "/v2/a/blobs/b/blobs/uploads/0a1b?_state=xyz", ["repository:a/blobs/b:pull,push"]),
        ("GET", "/v2/x/tags/tags/list", ["repository:x/tags:pull"]),
        ("GET", "/v2/a/manifests/b/manifests/latest", ["repository:a/manifests/b:pull"]),
    ],
)
def test_request_scopes(method: str, path: str, expected: list[str]) -> None:
    assert scopes_of(method, path) == expected


def test_request_scopes_capped_by_allowed_actions() -> None:
    mount = "/v2/app/blobs/uploads/?mount=sha256:00&from=base"
    assert scopes_of("GET", "/v2/app/manifests/v1", PULL_ONLY) == ["repository:app:pull"]
    assert scopes_of("PUT", "/v2/app/manifests/v1", PULL_ONLY) == ["repository:app:pull"]
    assert scopes_of("DELETE", "/v2/app/manifests/sha256:00", PULL_ONLY) == ["repository:app:"]
    assert scopes_of("POST", mount, PULL_ONLY) == ["repository:app:pull", "repository:base:pull"]
    assert scopes_of("POST", mount, frozenset({"push"})) == ["repository:app:push"]
    assert scopes_of("GET", "/v2/_catalog", PULL_ONLY) == ["registry:catalog:*"]


def test_scope_claim() -> None:
    scope = Scope("repository", "group/app", ("pull", "push"))
    assert scope.claim() == {"type": "repository", "name": "group/app", "actions": ["pull", "push"]}
    assert str(scope) == "repository:group/app:pull,push"


def test_parse_challenge() -> None:
    header = (
        'Bearer realm="https://gitlab.test/jwt/auth",service="container_registry",'
        'scope="repository:group/app:pull,push",error="insufficient_scope"'
    )
    assert parse_challenge(header) == {
        "realm": "https://gitlab.test/jwt/auth",
        "service": "container_registry",
        "scope": "repository:group/app:pull,push",
        "error": "insufficient_scope",
    }
    assert parse_challenge('bearer realm="http://t/token"') == {"realm": "http://t/token"}
    assert parse_challenge('Basic realm="Registry Realm"') == {}
    assert parse_challenge("") == {}


# --- helpers for the real registries ------------------------------------------------------------------


def jwt_auth(setup: TokenAuthSetup, **overrides: object) -> JwtAuth:
    fields = {"type": "jwt", "key_file": setup.key_path, "issuer": setup.issuer, "service": setup.service}
    return JwtAuth.model_validate({**fields, **overrides})


def make_client(
    url: str, auth: object, allowed: frozenset[str] = PULL_PUSH_DELETE, **settings: object
) -> RegistryClient:
    config = RegistryConfig.model_validate({"url": url, "auth": auth})
    return RegistryClient("secondary", config, ReplicationConfig(**settings), allowed_actions=allowed)


def token_claims(record: RecordedRequest) -> dict[str, object]:
    assert record.authorization is not None and record.authorization.startswith("Bearer ")
    return jwt.decode(record.authorization.removeprefix("Bearer "), options={"verify_signature": False})


async def push_with_client(client: RegistryClient, repo: str, image: Image, tag: str) -> None:
    """Blobs (monolithic), children by digest, then the tagged manifest, all through georeg."""
    for blob in image.all_blobs():
        if await client.blob_size(repo, blob.digest) is None:
            location = await client.start_upload(repo)
            assert location is not None
            await client.complete_upload(location, blob.digest, blob.data)
    for child in image.children:
        await client.put_manifest(repo, child.digest, Manifest(child.manifest, child.media_type))
    assert await client.put_manifest(repo, tag, Manifest(image.manifest, image.media_type)) == image.digest


@pytest.fixture
def token_proxy(token_registry_pair: RegistryPair) -> Iterator[FaultProxy]:
    with FaultProxy(token_registry_pair.secondary.url) as running:
        yield running


@pytest.fixture
def setup(token_registry_pair: RegistryPair) -> TokenAuthSetup:
    assert token_registry_pair.token_setup is not None
    return token_registry_pair.token_setup


# --- jwt: georeg mints its own tokens -------------------------------------------------------------------


async def test_jwt_client_reads_and_writes(token_proxy: FaultProxy, setup: TokenAuthSetup, repo_name: str) -> None:
    image = build_index([build_image("oci"), build_image("oci", platform=("linux", "arm64"))], "oci")
    base = repo_name + "-base"
    async with make_client(token_proxy.url, jwt_auth(setup)) as client:
        await client.ping()
        await push_with_client(client, repo_name, image, "v1")
        fetched = await client.get_manifest(repo_name, "v1")
        assert fetched.content == image.manifest
        assert (await client.head_manifest(repo_name, image.digest)) is not None
        assert await client.tags(repo_name) == ["v1"]
        blob = image.children[0].blobs[1]
        async with client.open_blob(repo_name, blob.digest, offset=10) as response:
            assert await response.aread() == blob.data[10:]
        # a cross-repository mount needs pull on the source as well
        assert await client.start_upload(base, mount_from=repo_name, digest=blob.digest) is None
        assert await client.blob_size(base, blob.digest) == blob.size
        assert repo_name in [name async for name in client.catalog()]
        await client.delete_manifest(repo_name, image.digest)
        assert await client.head_manifest(repo_name, "v1") is None
    # every request carried a token; none was refused
    assert token_proxy.requests and all(r.status in (200, 201, 202, 206, 404) for r in token_proxy.requests)
    catalog = [r for r in token_proxy.requests if r.path == "/v2/_catalog"]
    assert token_claims(catalog[0])["access"] == [{"type": "registry", "name": "catalog", "actions": ["*"]}]
    mount = next(r for r in token_proxy.requests if "mount=" in r.query)
    assert token_claims(mount)["access"] == [
        {"type": "repository", "name": base, "actions": ["pull", "push"]},
        {"type": "repository", "name": repo_name, "actions": ["pull"]},
    ]


async def test_jwt_tokens_are_cached_per_scope(
    token_proxy: FaultProxy, setup: TokenAuthSetup, token_registry_pair: RegistryPair, repo_name: str
) -> None:
    image = build_image("docker")
    with Pusher(token_registry_pair.secondary.url, setup) as pusher:
        pusher.push_image(repo_name, image, "v1")
    other = build_image("docker", layer_sizes=[100])
    async with make_client(token_proxy.url, jwt_auth(setup)) as client:
        for _ in range(3):
            assert (await client.head_manifest(repo_name, "v1")) is not None
            assert (await client.get_manifest(repo_name, image.digest)).digest == image.digest
            assert await client.blob_size(repo_name, image.blobs[0].digest) == image.blobs[0].size
            assert await client.tags(repo_name) == ["v1"]
        await push_with_client(client, repo_name, other, "v2")
        await client.delete_manifest(repo_name, other.digest)
    reads = {r.authorization for r in token_proxy.requests if r.method in ("GET", "HEAD")}
    writes = {r.authorization for r in token_proxy.requests if r.method in ("POST", "PUT")}
    deletes = {r.authorization for r in token_proxy.requests if r.method == "DELETE"}
    assert (len(reads), len(writes), len(deletes)) == (1, 1, 1)
    assert len(reads | writes | deletes) == 3
    assert len(token_proxy.requests) >= 16 and all(r.status < 400 or r.status == 404 for r in token_proxy.requests)


async def test_jwt_injected_401_mints_a_new_token(
    token_proxy: FaultProxy, setup: TokenAuthSetup, token_registry_pair: RegistryPair, repo_name: str
) -> None:
    image = build_image("oci")
    with Pusher(token_registry_pair.secondary.url, setup) as pusher:
        pusher.push_image(repo_name, image, "v1")
    async with make_client(token_proxy.url, jwt_auth(setup)) as client:
        assert (await client.head_manifest(repo_name, "v1")) is not None
        token_proxy.add_fault("GET", r"/manifests/v1$", status=401, times=1)
        assert (await client.get_manifest(repo_name, "v1")).digest == image.digest
        assert (await client.head_manifest(repo_name, "v1")) is not None
        assert client.stats.retries == 0  # the auth flow retried, not the transient-error loop
    gets = [r for r in token_proxy.requests if r.method == "GET"]
    heads = [r for r in token_proxy.requests if r.method == "HEAD"]
    assert [r.status for r in gets] == [401, 200]
    assert gets[0].authorization == heads[0].authorization  # cached until the 401
    assert gets[1].authorization != gets[0].authorization  # then minted anew ...
    assert heads[1].authorization == gets[1].authorization  # ... and the new one cached


async def test_pull_only_client_cannot_push(
    token_proxy: FaultProxy, setup: TokenAuthSetup, token_registry_pair: RegistryPair, repo_name: str
) -> None:
    image = build_image("docker")
    with Pusher(token_registry_pair.secondary.url, setup) as pusher:
        for blob in image.blobs:
            pusher.push_blob(repo_name, blob)
    async with make_client(token_proxy.url, jwt_auth(setup), allowed=PULL_ONLY) as client:
        assert await client.blob_size(repo_name, image.blobs[0].digest) == image.blobs[0].size  # pull works
        with pytest.raises(Unauthorized) as caught:
            await client.put_manifest(repo_name, "v1", Manifest(image.manifest, image.media_type))
    assert caught.value.status == 401 and not caught.value.transient
    puts = [r for r in token_proxy.requests if r.method == "PUT"]
    assert [r.status for r in puts] == [401, 401]  # refused by the registry itself, once more with a fresh token
    assert all(
        token_claims(r)["access"] == [{"type": "repository", "name": repo_name, "actions": ["pull"]}] for r in puts
    )
    with Pusher(token_registry_pair.secondary.url, setup) as pusher:
        assert pusher.head_manifest(repo_name, "v1") is None


async def test_jwt_with_wrong_issuer_is_unauthorized(token_proxy: FaultProxy, setup: TokenAuthSetup) -> None:
    async with make_client(token_proxy.url, jwt_auth(setup, issuer="someone-else")) as client:
        with pytest.raises(Unauthorized, match=r"GET /v2/ -> 401 UNAUTHORIZED.*issuer"):
            await client.ping()


# --- token: the Bearer challenge flow against a real token server -----------------------------------


@dataclass
class TokenHit:
    scopes: tuple[str, ...]
    service: str | None
    authorized: bool


class _Server(uvicorn.Server):
    """uvicorn that signals an Event once it accepts connections."""

    def __init__(self, config: uvicorn.Config, ready: threading.Event) -> None:
        super().__init__(config)
        self.ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()


class TokenServer:
    """A minimal token service: GET /token with HTTP basic credentials returns a token for the asked scopes."""

    def __init__(self, setup: TokenAuthSetup, username: str, password: str) -> None:
        self.setup = setup
        self.expected = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
        self.hits: list[TokenHit] = []
        self.expires_in = 300
        self.override: tuple[int, bytes] | None = None  # answer this (status, body) instead of a token
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        app = Starlette(routes=[Route("/token", self._token, methods=["GET"])])
        ready = threading.Event()
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        self._server = _Server(config, ready)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)
        self._thread.start()
        if not ready.wait(timeout=10):
            self.stop()
            raise RuntimeError("token server did not start")

    async def _token(self, request: Request) -> Response:
        scopes = tuple(request.query_params.getlist("scope"))
        authorized = request.headers.get("authorization") == self.expected
        self.hits.append(TokenHit(scopes, request.query_params.get("service"), authorized))
        if self.override is not None:
            return Response(self.override[1], status_code=self.override[0])
        if not authorized:
            return JSONResponse({"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}, 401)
        access = []
        for scope in scopes:
            kind, rest = scope.split(":", 1)
            name, actions = rest.rsplit(":", 1)
            access.append({"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]})
        return JSONResponse({"token": mint_token(self.setup, access), "expires_in": self.expires_in})

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._socket.close()


@dataclass
class TokenRealm:
    server: TokenServer
    registry: RegistryProcess
    setup: TokenAuthSetup


@pytest.fixture(scope="module")
def token_realm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenRealm]:
    keys = make_token_auth_setup(tmp_path_factory.mktemp("realm-keys"))
    server = TokenServer(keys, "geo", "s3cret")
    setup = dataclasses.replace(keys, realm=f"{server.url}/token")
    try:
        with RegistryProcess(tmp_path_factory.mktemp("realm-registry"), token_auth=setup) as registry:
            yield TokenRealm(server, registry, setup)
    finally:
        server.stop()


@pytest.fixture
def realm(token_realm: TokenRealm) -> Iterator[TokenRealm]:
    token_realm.server.hits.clear()
    token_realm.server.expires_in = 300
    token_realm.server.override = None
    yield token_realm


GOOD = {"type": "token", "username": "geo", "password": "s3cret"}


async def test_token_auth_pushes_and_pulls(realm: TokenRealm, repo_name: str) -> None:
    image = build_image("docker")
    async with make_client(realm.registry.url, TokenAuth.model_validate(GOOD)) as client:
        await client.ping()
        await push_with_client(client, repo_name, image, "v1")
        assert (await client.get_manifest(repo_name, "v1")).content == image.manifest
        assert await client.tags(repo_name) == ["v1"]
        await client.delete_manifest(repo_name, image.digest)
        assert await client.head_manifest(repo_name, "v1") is None
    with Pusher(realm.registry.url, realm.setup) as pusher:  # the registry stored what we sent
        assert pusher.tags(repo_name) == []
    assert all(hit.authorized and hit.service == realm.setup.service for hit in realm.server.hits)


async def test_token_auth_fetches_once_per_scope(realm: TokenRealm, repo_name: str) -> None:
    image = build_image("oci")
    async with make_client(realm.registry.url, TokenAuth.model_validate(GOOD)) as client:
        await push_with_client(client, repo_name, image, "v1")
        for _ in range(3):
            assert (await client.head_manifest(repo_name, "v1")) is not None
            assert (await client.get_manifest(repo_name, "v1")).digest == image.digest
        await push_with_client(client, repo_name, image, "v2")
    scopes = [hit.scopes for hit in realm.server.hits]
    assert sorted(scopes) == sorted([(f"repository:{repo_name}:pull",), (f"repository:{repo_name}:pull,push",)]), (
        "one token per scope, reused afterwards"
    )


async def test_token_auth_wrong_password_is_unauthorized(realm: TokenRealm, repo_name: str) -> None:
    auth = TokenAuth.model_validate({**GOOD, "password": "wrong"})
    async with make_client(realm.registry.url, auth) as client:
        with pytest.raises(Unauthorized) as caught:
            await client.tags(repo_name)
    assert caught.value.status == 401 and not caught.value.transient
    assert [(hit.scopes, hit.authorized) for hit in realm.server.hits] == [((f"repository:{repo_name}:pull",), False)]


async def test_token_auth_wrong_password_message(realm: TokenRealm, repo_name: str) -> None:
    image = build_image("oci")
    auth = TokenAuth.model_validate({**GOOD, "password": "wrong"})
    async with make_client(realm.registry.url, auth) as client:
        with pytest.raises(Unauthorized) as caught:
            await client.put_manifest(repo_name, "v1", Manifest(image.manifest, image.media_type))
    message = str(caught.value)
    assert message.startswith(f"secondary: PUT /v2/{repo_name}/manifests/v1")  # the request it was for
    assert realm.setup.realm in message and "401" in message  # and who refused the token
    assert (caught.value.method, caught.value.url) == ("PUT", f"/v2/{repo_name}/manifests/v1")


@pytest.mark.parametrize(
    ("status", "body"),
    [(404, b"no such page"), (403, b"forbidden"), (200, b'{"detail": "no token here"}'), (200, b"<html>login</html>")],
)
async def test_token_realm_failure_is_never_the_registry_answer(
    realm: TokenRealm, repo_name: str, status: int, body: bytes
) -> None:
    """What the token realm answers must not pass for the registry's answer: a realm 404 read as
    "manifest not found" would make a deletion sync remove images from a secondary."""
    image = build_image("oci")
    with Pusher(realm.registry.url, realm.setup) as pusher:
        pusher.push_image(repo_name, image, "v1")
    realm.server.override = (status, body)
    async with make_client(realm.registry.url, TokenAuth.model_validate(GOOD)) as client:
        with pytest.raises(Unauthorized, match=re.escape(realm.setup.realm)):
            await client.head_manifest(repo_name, "v1")
        with pytest.raises(Unauthorized):
            await client.tags(repo_name)
        with pytest.raises(Unauthorized):
            await client.get_manifest(repo_name, "v1")
        with pytest.raises(Unauthorized):
            await client.blob_size(repo_name, image.blobs[0].digest)
    # Each of the four calls asked the realm for its token (the first after the registry's challenge, the
    # others up front), with good credentials, and none of the realm's answers was taken for a token.
    pull = TokenHit((f"repository:{repo_name}:pull",), realm.setup.service, authorized=True)
    assert realm.server.hits == [pull] * 4


async def test_token_realm_outage_is_transient(realm: TokenRealm, repo_name: str) -> None:
    realm.server.override = (503, b"maintenance")
    async with make_client(realm.registry.url, TokenAuth.model_validate(GOOD), request_attempts=2) as client:
        with pytest.raises(TransientRegistryError, match="503"):
            await client.tags(repo_name)
        assert client.stats.retries == 1
        realm.server.override = None
        assert await client.tags(repo_name) == []  # the realm is back: the same client recovers
    assert [hit.authorized for hit in realm.server.hits] == [True, True, True]


async def stream(data: bytes, size: int = 16_384) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def test_token_auth_streamed_chunk_fetches_its_token_first(realm: TokenRealm, repo_name: str) -> None:
    """A streamed PATCH cannot be replayed after a 401, so its token must be in hand before it is sent,
    also when the cached one is about to expire (here every token is: the server grants 1 s)."""
    realm.server.expires_in = 1
    blob = random_blob(40_000)
    async with make_client(realm.registry.url, TokenAuth.model_validate(GOOD), request_attempts=1) as client:
        location = await client.start_upload(repo_name)
        assert location is not None
        location = await client.upload_chunk(location, stream(blob.data), blob.size)
        await client.complete_upload(location, blob.digest)
        assert await client.blob_size(repo_name, blob.digest) == blob.size
    assert all(hit.authorized for hit in realm.server.hits)


async def test_token_auth_streamed_chunk_resumes_after_401(realm: TokenRealm, repo_name: str) -> None:
    """A token that dies under a streamed chunk fails that chunk (transient); the resume must then succeed."""
    blob = random_blob(60_000)
    first, rest = blob.data[:30_000], blob.data[30_000:]
    challenge = f'Bearer realm="{realm.setup.realm}",service="{realm.setup.service}",error="invalid_token"'
    with FaultProxy(realm.registry.url) as proxy:
        async with make_client(proxy.url, TokenAuth.model_validate(GOOD)) as client:
            location = await client.start_upload(repo_name)
            assert location is not None
            location = await client.upload_chunk(location, stream(first), len(first))
            proxy.add_fault("PATCH", r"/blobs/uploads/", status=401, headers={"WWW-Authenticate": challenge})
            with pytest.raises(TransientRegistryError, match="401"):
                await client.upload_chunk(location, stream(rest), len(rest))
            received, location = await client.upload_offset(location)  # what replication does to resume
            assert received == len(first)
            location = await client.upload_chunk(location, stream(rest), len(rest))
            await client.complete_upload(location, blob.digest)
            assert await client.blob_size(repo_name, blob.digest) == blob.size
    patches = [r for r in proxy.requests if r.method == "PATCH"]
    assert [r.status for r in patches] == [202, 401, 202]
    assert patches[2].authorization is not None and patches[2].authorization != patches[1].authorization
