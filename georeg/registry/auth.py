"""How georeg authenticates to a registry, as httpx auth flows.

Token auth is per scope: each request needs `repository:<name>:<actions>` (or `registry:catalog:*`),
derived here from the request itself. Tokens are cached per scope and reused until shortly before
they expire; a 401 drops the cached token and the request is retried once with a fresh one, so a
long copy outlives any single token. A role's `allowed_actions` caps what a token may carry: the
primary's tokens are pull-only, whatever the request asks for.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass

import httpx

from georeg.config import AuthConfig, BasicAuth, JwtAuth, NoAuth, TokenAuth
from georeg.errors import TransientRegistryError, Unauthorized
from georeg.registry.tokens import TokenMinter

PULL_ONLY = frozenset({"pull"})
PULL_PUSH_DELETE = frozenset({"pull", "push", "delete"})

_SCOPED_PATH = re.compile(r"/v2/(?P<name>.+)/(?:manifests|blobs|tags|referrers)/.*")
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
# Registries default to 60 s when a token response carries no expires_in (distribution's token spec).
_DEFAULT_TOKEN_LIFETIME = 60.0


@dataclass(frozen=True)
class Scope:
    type: str
    name: str
    actions: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"

    def claim(self) -> dict[str, object]:
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}


def request_scopes(request: httpx.Request, allowed_actions: frozenset[str]) -> tuple[Scope, ...]:
    """The least scopes `request` needs, capped at `allowed_actions`; () for the `/v2/` ping."""
    path = request.url.path
    if path == "/v2/_catalog":
        return (Scope("registry", "catalog", ("*",)),)
    match = _SCOPED_PATH.fullmatch(path)
    if match is None:
        return ()
    if request.method in ("GET", "HEAD"):
        wanted: tuple[str, ...] = ("pull",)
    elif request.method == "DELETE":
        wanted = ("delete",)
    else:
        wanted = ("pull", "push")
    scopes = [Scope("repository", match["name"], tuple(a for a in wanted if a in allowed_actions))]
    mount_source = request.url.params.get("from")
    if request.method == "POST" and mount_source and "pull" in allowed_actions:
        scopes.append(Scope("repository", mount_source, ("pull",)))
    return tuple(scopes)


def parse_challenge(header: str) -> dict[str, str]:
    """`Bearer realm="...",service="...",scope="..."` -> {"realm": ..., "service": ..., "scope": ...}."""
    if not header.lower().startswith("bearer "):
        return {}
    return dict(_CHALLENGE_PARAM.findall(header))


def _replayable(request: httpx.Request) -> bool:
    """A streamed body cannot be sent twice; the caller resumes such uploads itself."""
    return isinstance(request.stream, httpx.ByteStream)


@dataclass(frozen=True)
class _CachedToken:
    token: str
    expires_at: float


class _ScopedBearerAuth(httpx.Auth):
    """Bearer tokens cached per scope; subclasses say how a token is obtained."""

    def __init__(self, allowed_actions: frozenset[str]) -> None:
        self.allowed_actions = allowed_actions
        self._cache: dict[str, _CachedToken] = {}
        # The realm and service of the last Bearer challenge: with them a token is fetched before a
        # request is sent, which a streamed body (not replayable after a 401) depends on.
        self._challenge: dict[str, str] = {}

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        scopes = request_scopes(request, self.allowed_actions)
        key = " ".join(map(str, scopes))
        cached = self._fresh(key) or self._preemptive_token(scopes)
        if cached is None and self._challenge:
            cached = yield from self._challenge_token(scopes, self._challenge)
        if cached is not None:
            self._cache[key] = cached
            request.headers["Authorization"] = f"Bearer {cached.token}"
        response = yield request
        if response.status_code != 401:
            return
        self._cache.pop(key, None)
        challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if challenge.get("realm"):
            self._challenge = {name: challenge[name] for name in ("realm", "service") if name in challenge}
        if not _replayable(request):
            return  # the caller's next attempt fetches a token up front from the challenge remembered here
        fresh = yield from self._challenge_token(scopes, challenge)
        if fresh is None:
            return
        self._cache[key] = fresh
        request.headers["Authorization"] = f"Bearer {fresh.token}"
        yield request

    # httpx reads no response body inside an auth flow unless told to for every response, which would
    # pull whole blobs into memory; these two read only the bodies of the token requests we make.
    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        flow = self.auth_flow(request)
        outgoing = next(flow)
        while True:
            response = yield outgoing
            if outgoing is not request:
                response.read()
            try:
                outgoing = flow.send(response)
            except StopIteration:
                return

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        flow = self.auth_flow(request)
        outgoing = next(flow)
        while True:
            response = yield outgoing
            if outgoing is not request:
                await response.aread()
            try:
                outgoing = flow.send(response)
            except StopIteration:
                return

    def _fresh(self, key: str) -> _CachedToken | None:
        cached = self._cache.get(key)
        if cached is None or cached.expires_at - self._refresh_margin(cached) <= time.time():
            return None
        return cached

    @staticmethod
    def _refresh_margin(cached: _CachedToken) -> float:
        # Renew with a fifth of the lifetime left (at most 30 s): a request never starts on a dying token.
        return min(30.0, max(1.0, (cached.expires_at - time.time()) * 0.2))

    def _preemptive_token(self, scopes: tuple[Scope, ...]) -> _CachedToken | None:
        return None

    def _challenge_token(
        self, scopes: tuple[Scope, ...], challenge: dict[str, str]
    ) -> Generator[httpx.Request, httpx.Response, _CachedToken | None]:
        raise NotImplementedError


class MintedJwtAuth(_ScopedBearerAuth):
    """GitLab Geo's way: mint our own short-lived token for exactly the scope a request needs."""

    def __init__(self, minter: TokenMinter, allowed_actions: frozenset[str]) -> None:
        super().__init__(allowed_actions)
        self.minter = minter

    def _preemptive_token(self, scopes: tuple[Scope, ...]) -> _CachedToken | None:
        minted = self.minter.mint([scope.claim() for scope in scopes])
        return _CachedToken(minted.token, minted.expires_at)

    def _challenge_token(
        self, scopes: tuple[Scope, ...], challenge: dict[str, str]
    ) -> Generator[httpx.Request, httpx.Response, _CachedToken | None]:
        yield from ()  # minting needs no round trip
        return self._preemptive_token(scopes)


class ChallengeTokenAuth(_ScopedBearerAuth):
    """The standard registry token flow: a 401 names a realm, the realm hands out a token.

    Once a realm is known, tokens for new scopes are fetched before the request is sent."""

    def __init__(self, username: str | None, password: str | None, allowed_actions: frozenset[str]) -> None:
        super().__init__(allowed_actions)
        self._credentials = httpx.BasicAuth(username, password or "") if username else None

    def _challenge_token(
        self, scopes: tuple[Scope, ...], challenge: dict[str, str]
    ) -> Generator[httpx.Request, httpx.Response, _CachedToken | None]:
        realm = challenge.get("realm")
        if not realm:
            return None
        params: list[tuple[str, str]] = []
        if "service" in challenge:
            params.append(("service", challenge["service"]))
        params += [("scope", str(scope)) for scope in scopes]
        token_request = httpx.Request("GET", realm, params=params)
        if self._credentials is not None:
            token_request = next(self._credentials.auth_flow(token_request))
        response = yield token_request
        # Raise rather than return None: httpx would hand the realm's answer to the caller as if the
        # registry had given it (a realm 404 would read as "manifest unknown").
        realm_url = str(token_request.url.copy_with(query=None))
        where = f"token realm {realm_url}"
        status = response.status_code
        if status in (408, 429) or status >= 500:
            raise TransientRegistryError(f"{where} answered {status}", status=status, method="GET", url=realm_url)
        if status != 200:
            raise Unauthorized(
                f"{where} answered {status} for {' '.join(map(str, scopes)) or 'the registry'}"
                " (check this registry's token auth username and password)",
                status=status,
                method="GET",
                url=realm_url,
            )
        try:
            body = response.json()
            token = body.get("token") or body.get("access_token")
            lifetime = float(body.get("expires_in") or _DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError):
            token = None
        if not token or not isinstance(token, str):
            raise Unauthorized(f"{where} answered 200 without a token", status=status, method="GET", url=realm_url)
        return _CachedToken(token, time.time() + lifetime)


def build_auth(config: AuthConfig, allowed_actions: frozenset[str]) -> httpx.Auth | None:
    """The httpx auth for a registry's `auth:` block, its tokens capped at `allowed_actions`."""
    if isinstance(config, NoAuth):
        return None
    if isinstance(config, BasicAuth):
        return httpx.BasicAuth(config.username, config.password.get_secret_value())
    if isinstance(config, TokenAuth):
        password = config.password.get_secret_value() if config.password else None
        return ChallengeTokenAuth(config.username, password, allowed_actions)
    if isinstance(config, JwtAuth):
        minter = TokenMinter(
            config.key_file,
            issuer=config.issuer,
            service=config.service,
            subject=config.subject,
            ttl_seconds=config.ttl_seconds,
        )
        return MintedJwtAuth(minter, allowed_actions)
    raise TypeError(f"unknown auth config {type(config).__name__}")
