"""An async client for the registry HTTP API (distribution v2 / OCI), one connection pool per registry.

Transient failures of a single request (connection errors, 5xx, 408, 429 with its Retry-After) are
retried here and nowhere else, for requests whose body can be sent again, within the request's own
attempts and the retry budget of the operation it belongs to (`georeg.retries`). Streamed uploads cannot,
so their failures surface as transient errors for the caller to resume. Every other answer becomes
one of the typed errors in `georeg.errors`, carrying a message that says what to do.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType

import httpx

from georeg.concurrency import shared_semaphore
from georeg.config import RegistryConfig, ReplicationConfig
from georeg.errors import (
    IntegrityError,
    InvalidRequest,
    NotFound,
    PermanentRegistryError,
    RateLimited,
    RegistryError,
    TransientRegistryError,
)
from georeg.limits import RegistryLimits
from georeg.registry.answers import error_from_response
from georeg.registry.auth import build_auth
from georeg.registry.manifests import MANIFEST_ACCEPT, MAX_MANIFEST_BYTES, Descriptor, Manifest
from georeg.registry.tls import is_certificate_error, tls_verification
from georeg.registry.transport import ConnectionPerSlot
from georeg.retries import backoff_delay, take_retry

logger = logging.getLogger("georeg.registry")

_NEXT_LINK = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')
_MAX_RETRY_AFTER = 120.0
_CATALOG_PAGE = 1000  # the registry refuses n > 1000
_HEADS_IN_FLIGHT = 16  # a repository's tags HEADed at once (requests_per_registry caps them all)


@dataclass
class ClientStats:
    """What a client did, for artifacts, status and tests."""

    requests: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    bytes_uploaded: int = 0


class RegistryClient:
    """The registry API, as async methods; see the module docstring for how failures are handled."""

    def __init__(
        self,
        name: str,
        config: RegistryConfig,
        settings: ReplicationConfig,
        *,
        allowed_actions: frozenset[str],
        transport: httpx.AsyncBaseTransport | None = None,
        limits: RegistryLimits | None = None,
    ) -> None:
        self.name = name
        self.limits = limits or RegistryLimits()
        self.url = config.url
        self.settings = settings
        self.stats = ClientStats()
        connections = settings.concurrency.requests_per_registry
        self._slots_key = ("registry requests", name, self.url, connections)
        verify = tls_verification(config)
        if transport is None and verify is not False:
            verify = httpx.create_ssl_context(verify=verify)  # loaded once, shared by every connection
        self._http = httpx.AsyncClient(
            base_url=config.url,
            auth=build_auth(config.auth, allowed_actions),
            timeout=httpx.Timeout(settings.request_timeout, connect=10.0),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            follow_redirects=True,  # blob GETs may redirect to object storage; httpx drops Authorization there
            verify=verify,
            headers={"User-Agent": "georeg"},
            transport=transport or ConnectionPerSlot(verify),
        )

    async def __aenter__(self) -> RegistryClient:
        return self

    def _slots(self) -> asyncio.Semaphore:
        """Requests in flight to this registry from this process, across flow runs and clients, at most
        `requests_per_registry`, each on a connection of its own: waiting here costs nothing, while a
        request queued in httpcore's pool is compared with every connection each time any request
        starts or ends, and with dozens of blob copies waiting that cost more CPU than the requests.
        Keyed by the client's name too: a copy holds a slot of the primary while it waits for the
        secondary's, so the two must never share one bound even when they are one registry."""
        return shared_semaphore(self._slots_key, self._slots_key[-1])

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- base -----------------------------------------------------------------------------------

    async def ping(self) -> None:
        """Check that the registry speaks the v2 API and accepts our credentials."""
        await self._request("GET", "/v2/", expected={200})

    # --- manifests ------------------------------------------------------------------------------

    async def head_manifest(self, repository: str, reference: str) -> Descriptor | None:
        """The manifest's digest, size and media type, or None if the registry does not have it."""
        try:
            response = await self._request(
                "HEAD", f"/v2/{repository}/manifests/{reference}", expected={200}, headers=_ACCEPT
            )
        except NotFound:
            return None
        digest = response.headers.get("Docker-Content-Digest")
        if not digest:  # not required by the spec: fall back to hashing the bytes
            digest = (await self.get_manifest(repository, reference)).digest
        return Descriptor(
            digest=digest,
            size=int(response.headers.get("Content-Length", 0)),
            media_type=_media_type(response),
        )

    async def get_manifest(self, repository: str, reference: str) -> Manifest:
        response = await self._request(
            "GET", f"/v2/{repository}/manifests/{reference}", expected={200}, headers=_ACCEPT
        )
        if len(response.content) > MAX_MANIFEST_BYTES:
            raise InvalidRequest(f"{self.name}: manifest {repository}:{reference} is larger than 4 MiB")
        expected_digest = reference if reference.startswith("sha256:") else ""
        return Manifest(response.content, _media_type(response), expected_digest)

    async def put_manifest(self, repository: str, reference: str, manifest: Manifest) -> str | None:
        """PUT the exact bytes under a tag or digest; return the digest the registry says it stored
        (always the manifest's: any other is an IntegrityError), or None if it did not say."""
        response = await self._request(
            "PUT",
            f"/v2/{repository}/manifests/{reference}",
            expected={201},
            content=manifest.content,
            headers={"Content-Type": manifest.media_type},
        )
        stored = response.headers.get("Docker-Content-Digest")
        if stored is not None and stored != manifest.digest:
            raise IntegrityError(f"{self.name} stored {repository}:{reference} as {stored}, not {manifest.digest}")
        return stored

    async def delete_manifest(self, repository: str, digest: str) -> None:
        await self._request("DELETE", f"/v2/{repository}/manifests/{digest}", expected={202})

    async def manifest_digests(self, repository: str, references: list[str]) -> dict[str, str]:
        """reference -> digest for these tags (or digests) of `repository`, a HEAD each, a few at once;
        those the registry does not have are left out."""
        room = asyncio.Semaphore(_HEADS_IN_FLIGHT)

        async def head(reference: str) -> Descriptor | None:
            async with room:
                return await self.head_manifest(repository, reference)

        heads = await asyncio.gather(*(head(reference) for reference in references))
        return {reference: found.digest for reference, found in zip(references, heads, strict=True) if found}

    async def tags(self, repository: str) -> list[str]:
        """Every tag of a repository ([] if it does not exist), following Link pagination."""
        found: list[str] = []
        try:
            async for page in self._pages(f"/v2/{repository}/tags/list"):
                found += page.get("tags") or []
        except NotFound:
            return []
        return found

    async def catalog(self) -> AsyncIterator[str]:
        """Every repository name, page by page."""
        async for page in self._pages(f"/v2/_catalog?n={_CATALOG_PAGE}"):
            for name in page.get("repositories") or []:
                yield name

    # --- blobs ----------------------------------------------------------------------------------

    async def blob_size(self, repository: str, digest: str) -> int | None:
        """The blob's size if it is linked in `repository`, else None."""
        try:
            response = await self._request("HEAD", f"/v2/{repository}/blobs/{digest}", expected={200})
        except NotFound:
            return None
        return int(response.headers.get("Content-Length", -1))

    @asynccontextmanager
    async def open_blob(self, repository: str, digest: str, *, offset: int = 0) -> AsyncIterator[httpx.Response]:
        """Stream a blob from `offset` on; the response's body is not read until iterated."""
        headers = {"Range": f"bytes={offset}-"} if offset else None
        async with self._slots():  # the connection stays taken until the stream is closed
            response = await self._request(
                "GET",
                f"/v2/{repository}/blobs/{digest}",
                expected={206} if offset else {200},
                headers=headers,
                stream=True,
            )
            try:
                yield response
            finally:
                await response.aclose()

    async def start_upload(self, repository: str, *, mount_from: str | None = None, digest: str = "") -> str | None:
        """Open an upload session and return its location; with `mount_from`, try a cross-repository
        mount first and return None when the registry mounted the blob (201). A registry that cannot
        mount (202) opens a normal upload instead, which is returned for use."""
        params = {"mount": digest, "from": mount_from} if mount_from else None
        response = await self._request("POST", f"/v2/{repository}/blobs/uploads/", expected={201, 202}, params=params)
        if response.status_code == 201 and mount_from:
            return None
        return self._location(response)

    async def upload_chunk(self, location: str, content: bytes | AsyncIterable[bytes], length: int) -> str:
        """PATCH one chunk to the latest location; return the next location (it carries the offset)."""
        response = await self._request(
            "PATCH",
            location,
            expected={202},
            content=content,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(length)},
        )
        self.stats.bytes_uploaded += length
        return self._location(response)

    async def complete_upload(self, location: str, digest: str, content: bytes = b"") -> None:
        """Commit the upload under `digest` (the registry re-checks it), optionally with the last bytes."""
        url = httpx.URL(location).copy_merge_params({"digest": digest})
        response = await self._request(
            "PUT",
            str(url),
            expected={201},
            content=content,
            headers={"Content-Type": "application/octet-stream"},
        )
        self.stats.bytes_uploaded += len(content)
        stored = response.headers.get("Docker-Content-Digest", digest)
        if stored != digest:
            raise IntegrityError(f"{self.name} committed the upload as {stored}, not {digest}")

    async def upload_offset(self, location: str) -> tuple[int, str]:
        """How many bytes the registry holds for an upload, and its current location."""
        response = await self._request("GET", location, expected={204})
        _, _, end = response.headers.get("Range", "0-0").partition("-")
        received = int(end) + 1 if end and int(end) > 0 else 0
        return received, self._location(response)

    async def cancel_upload(self, location: str) -> None:
        """Abandon an upload so the registry does not keep its partial data."""
        try:
            await self._request("DELETE", location, expected={204})
        except (NotFound, PermanentRegistryError, TransientRegistryError) as error:
            logger.debug("%s: cancelling upload failed: %s", self.name, error)

    # --- the request loop -----------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        url: str,
        *,
        expected: set[int],
        content: bytes | AsyncIterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """Send one request, retrying transient failures when the body can be sent again."""
        replayable = content is None or isinstance(content, bytes)
        attempts = self.settings.request_attempts if replayable else 1
        for attempt in range(1, attempts + 1):
            request = self._http.build_request(method, url, content=content, headers=headers, params=params)
            self.stats.requests[method] += 1
            try:
                if stream:  # the caller holds a slot for as long as the stream is open
                    await self.limits.before_request()
                    response = await self._http.send(request, stream=True)
                else:
                    async with self._slots():
                        # Pauses and rate limits are checked once a connection is ours: the wait for one
                        # may outlast the start of a pause that another worker was told about.
                        await self.limits.before_request()
                        response = await self._http.send(request)
            except httpx.TransportError as error:
                if is_certificate_error(error):
                    raise PermanentRegistryError(
                        f"{self.name}: TLS verification of {request.url.host} failed ({error}): set ca_file to the "
                        "CA that signed its certificate (insecure: true turns verification off, for testing only)",
                        method=method,
                        url=request.url.path,
                    ) from None
                failure: RegistryError = TransientRegistryError(
                    f"{self.name}: {method} {request.url.path} failed: {type(error).__name__}: {error}",
                    method=method,
                    url=request.url.path,
                )
            except RegistryError as error:  # the auth flow could not get a token; say which request needed it
                failure = type(error)(
                    f"{self.name}: {method} {request.url.path}: {error}",
                    status=error.status,
                    code=error.code,
                    method=method,
                    url=request.url.path,
                )
            else:
                if response.status_code in expected:
                    return response
                failure = await error_from_response(self.name, response, replayable=replayable)
            delay = _retry_delay(failure, attempt)
            if isinstance(failure, RateLimited):
                # Told to slow down: every request to this registry waits, from every worker, not only this one.
                await self.limits.pause.extend(delay)
            if not failure.transient:
                raise failure
            if attempt == attempts or not take_retry():
                # This loop is the layer that retries a replayable request: nothing above retries it again.
                # A streamed body is resumed by its caller instead (see `georeg.retries`).
                failure.exhausted = replayable
                raise failure
            self.stats.retries += 1
            logger.warning("%s (attempt %d of %d, next in %.1fs)", failure, attempt, attempts, delay)
            if not isinstance(failure, RateLimited):  # a pause is waited out in before_request
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _pages(self, url: str) -> AsyncIterator[dict]:
        next_url: str | None = url
        while next_url:
            response = await self._request("GET", next_url, expected={200})
            yield response.json()
            link = _NEXT_LINK.search(response.headers.get("Link", ""))
            next_url = str(response.url.join(link.group(1))) if link else None

    def _location(self, response: httpx.Response) -> str:
        location = response.headers.get("Location")
        if not location:
            raise InvalidRequest(f"{self.name}: {response.request.method} answered without a Location header")
        return str(response.url.join(location))


_ACCEPT = {"Accept": MANIFEST_ACCEPT}


def _media_type(response: httpx.Response) -> str:
    return response.headers.get("Content-Type", "").split(";")[0].strip()


def _retry_delay(failure: RegistryError, attempt: int) -> float:
    if isinstance(failure, RateLimited) and failure.retry_after is not None:
        return min(failure.retry_after, _MAX_RETRY_AFTER)
    return backoff_delay(attempt, base=0.25, cap=8.0)
