"""A recording reverse proxy that injects faults (5xx, 429, 401, connection resets) in front of a registry."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
START_DEADLINE_S = 10.0


@dataclass
class RecordedRequest:
    """What the proxy saw: enough to assert on retries, auth headers and bytes sent."""

    method: str
    path: str
    query: str
    status: int
    request_bytes: int
    authorization: str | None
    arrived_at: float  # time.time() when the request reached the proxy


@dataclass
class Fault:
    """A programmed failure; `times` counts down as matching requests consume it."""

    method: str | None
    path_regex: re.Pattern[str]
    status: int
    times: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    reset: bool = False
    after_upstream: bool = False

    def matches(self, method: str, path: str) -> bool:
        return self.times > 0 and (self.method is None or self.method == method) and bool(self.path_regex.search(path))


@dataclass
class Hold:
    """Requests matching `path_regex` wait until `release()`; `waiting` counts those that arrived."""

    path_regex: re.Pattern[str]
    released: threading.Event = field(default_factory=threading.Event)
    waiting: int = 0

    def release(self) -> None:
        self.released.set()


class _TrackingH11Protocol(H11Protocol):
    """uvicorn's h11 protocol that exposes each connection's transport, so a fault can abort it."""

    def __init__(self, *args: Any, transports: dict[tuple[str, int], asyncio.Transport], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._transports = transports

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.client:
            self._transports[self.client] = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client:
            self._transports.pop(self.client, None)
        super().connection_lost(exc)


class _NoResponse(Response):
    """Sends nothing: used after the connection was aborted on purpose."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return None


def _is_transfer(method: str, path: str) -> bool:
    """A request that moves blob bytes: an upload's PATCH/PUT, or a GET of a blob."""
    return (method in ("PATCH", "PUT") and "/blobs/uploads/" in path) or (method == "GET" and "/blobs/sha256:" in path)


class FaultProxy:
    """Reverse proxy on 127.0.0.1 in a background thread; streams bodies and keeps the Host header."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.requests: list[RecordedRequest] = []
        self.max_concurrent = 0
        self._in_flight = 0
        # Blob transfers (uploads to or blob reads from the upstream) in flight: what a copy limit bounds.
        self.max_concurrent_transfers = 0
        self._transfers = 0
        self._faults: list[Fault] = []
        self._holds: list[Hold] = []
        self._lock = threading.Lock()
        self._transports: dict[tuple[str, int], asyncio.Transport] = {}
        self._client: httpx.AsyncClient | None = None
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        self._app = Starlette(
            routes=[Route("/{path:path}", self._handle, methods=ALL_METHODS)], lifespan=self._lifespan
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    # --- recording and faults -------------------------------------------------------------------

    def add_fault(
        self,
        method: str | None,
        path_regex: str,
        *,
        status: int = 500,
        times: int = 1,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        reset: bool = False,
        after_upstream: bool = False,
    ) -> None:
        """Program `times` failures for requests whose path matches (re.search) and method equals."""
        fault = Fault(method, re.compile(path_regex), status, times, dict(headers or {}), body, reset, after_upstream)
        with self._lock:
            self._faults.append(fault)

    def refuse_manifest(self, repository: str, tag: str) -> None:
        """Refuse every PUT of `repository:tag`'s manifest as invalid: a permanent failure of that one tag."""
        self.add_fault(
            "PUT",
            rf"/v2/{re.escape(repository)}/manifests/{re.escape(tag)}$",
            status=400,
            times=1_000,
            body=b'{"errors":[{"code":"MANIFEST_INVALID","message":"refused for the test"}]}',
        )

    def hold(self, path_regex: str) -> Hold:
        """Hold requests whose path matches (re.search) until the returned Hold is released: a registry
        that is slow to answer, for as long as a test needs. Stopping the proxy releases every hold."""
        held = Hold(re.compile(path_regex))
        with self._lock:
            self._holds.append(held)
        return held

    def clear(self) -> None:
        """Forget recorded requests, pending faults and the concurrency high-water mark."""
        with self._lock:
            self.requests.clear()
            self._faults.clear()
            self.max_concurrent = self._in_flight
            self.max_concurrent_transfers = self._transfers

    def count(self, method: str | None = None, path_contains: str | None = None) -> int:
        with self._lock:
            return sum(
                1
                for r in self.requests
                if (method is None or r.method == method) and (path_contains is None or path_contains in r.path)
            )

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    fault.times -= 1
                    return fault
        return None

    def _record(self, request: Request, status: int, request_bytes: int) -> None:
        entry = RecordedRequest(
            method=request.method,
            path=request.url.path,
            query=request.url.query,
            status=status,
            request_bytes=request_bytes,
            authorization=request.headers.get("authorization"),
            arrived_at=request.state.arrived_at,
        )
        with self._lock:
            self.requests.append(entry)

    # --- the ASGI side ------------------------------------------------------------------------

    async def _track_concurrency(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Outermost ASGI layer: counts a request as in flight until its response is finished."""
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        with self._lock:
            self._in_flight += 1
            self.max_concurrent = max(self.max_concurrent, self._in_flight)
        try:
            await self._app(scope, receive, send)
        finally:
            with self._lock:
                self._in_flight -= 1

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """The upstream client must live on the server's event loop."""
        async with httpx.AsyncClient(timeout=httpx.Timeout(120.0, connect=5.0), follow_redirects=False) as client:
            self._client = client
            yield
        self._client = None

    async def _handle(self, request: Request) -> Response:
        request.state.arrived_at = time.time()
        with self._lock:
            holds = [held for held in self._holds if held.path_regex.search(request.url.path)]
        for held in holds:
            held.waiting += 1
            await asyncio.to_thread(held.released.wait)
        fault = self._take_fault(request.method, request.url.path)
        if fault is not None and not fault.after_upstream:
            sent = 0
            async for chunk in request.stream():  # drain, so the client is not cut off mid-upload
                sent += len(chunk)
            return await self._fault_response(request, fault, sent)
        counter = [0]
        try:
            upstream = await self._send_upstream(request, counter)
        except httpx.TransportError as exc:
            self._record(request, 502, counter[0])
            return Response(f"proxy: upstream error {exc!r}".encode(), status_code=502)
        if fault is not None:
            await upstream.aclose()
            return await self._fault_response(request, fault, counter[0])
        self._record(request, upstream.status_code, counter[0])
        response = StreamingResponse(self._relay(upstream), status_code=upstream.status_code)
        response.raw_headers = [
            (name, value) for name, value in upstream.headers.raw if name.decode("latin-1").lower() not in HOP_BY_HOP
        ]
        return response

    async def _send_upstream(self, request: Request, counter: list[int]) -> httpx.Response:
        """Forward with the original headers (Host included) and a streamed, counted body."""
        assert self._client is not None
        headers = [
            (name, value) for name, value in request.headers.raw if name.decode("latin-1").lower() not in HOP_BY_HOP
        ]
        has_body = "content-length" in request.headers or "transfer-encoding" in request.headers

        async def body() -> AsyncIterator[bytes]:
            async for chunk in request.stream():
                counter[0] += len(chunk)
                if chunk:
                    yield chunk

        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        query = request.scope.get("query_string", b"")
        url = httpx.URL(self.upstream).copy_with(raw_path=raw_path + (b"?" + query if query else b""))
        outgoing = self._client.build_request(
            request.method, url, headers=headers, content=body() if has_body else None
        )
        # A transfer counts while the upstream works on it: from the first byte until it answers.
        transfer = _is_transfer(request.method, request.url.path)
        with self._lock:
            if transfer:
                self._transfers += 1
                self.max_concurrent_transfers = max(self.max_concurrent_transfers, self._transfers)
        try:
            return await self._client.send(outgoing, stream=True)
        finally:
            with self._lock:
                if transfer:
                    self._transfers -= 1

    @staticmethod
    async def _relay(upstream: httpx.Response) -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        finally:
            await upstream.aclose()

    async def _fault_response(self, request: Request, fault: Fault, sent: int) -> Response:
        if not fault.reset:
            self._record(request, fault.status, sent)
            return Response(fault.body, status_code=fault.status, headers=fault.headers)
        self._record(request, 0, sent)
        client = request.scope.get("client")
        transport = self._transports.get(tuple(client)) if client else None
        assert transport is not None, "no transport for this connection"
        transport.abort()
        while (await request.receive())["type"] != "http.disconnect":  # wait for uvicorn to see the close
            pass
        return _NoResponse()

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Serve on a pre-bound socket (no port race) and wait until the server accepts connections."""
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self._port = int(self._socket.getsockname()[1])
        config = uvicorn.Config(
            self._track_concurrency,
            http=functools.partial(_TrackingH11Protocol, transports=self._transports),  # type: ignore[arg-type]
            interface="asgi3",
            lifespan="on",
            log_level="warning",
            access_log=False,
            server_header=False,
            date_header=False,
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            name=f"fault-proxy-{self._port}",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + START_DEADLINE_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("fault proxy did not start")
            time.sleep(0.01)  # poll interval while waiting for the started flag
        return self

    def stop(self) -> None:
        """Ask uvicorn to exit, join its thread and release the socket."""
        with self._lock:
            for held in self._holds:
                held.release()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
            if self._thread.is_alive():
                raise RuntimeError("fault proxy thread did not stop")
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
