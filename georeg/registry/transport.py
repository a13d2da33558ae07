"""How the registry client's requests reach the network: one connection per request slot."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable

import httpx


class ConnectionPerSlot(httpx.AsyncBaseTransport):
    """Many one-connection transports in place of one pool of many connections.

    Every time a request starts or ends, httpcore's pool checks each of its connections (probing the
    socket of every idle one) and counts the idle ones once per connection: with the 20 connections a
    backfill keeps busy, that bookkeeping cost a third of georeg's CPU. A pool of one connection does
    it for one. A request takes a free transport and gives it back when its response is closed;
    RegistryClient's slots keep one free in the normal course, and when none is, one more is made."""

    def __init__(self, verify: ssl.SSLContext | bool) -> None:
        self._verify = verify
        self._free: list[httpx.AsyncHTTPTransport] = []
        self._every: list[httpx.AsyncHTTPTransport] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._free:
            transport = self._free.pop()
        else:
            limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
            transport = httpx.AsyncHTTPTransport(verify=self._verify, limits=limits)
            self._every.append(transport)
        try:
            response = await transport.handle_async_request(request)
        except BaseException:
            self._free.append(transport)
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _ReleasingStream(response.stream, lambda: self._free.append(transport))
        return response

    async def aclose(self) -> None:
        for transport in self._every:
            await transport.aclose()


class _ReleasingStream(httpx.AsyncByteStream):
    """A response body that hands its connection's transport back once closed."""

    def __init__(self, stream: httpx.AsyncByteStream, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release: Callable[[], None] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        release, self._release = self._release, None
        try:
            await self._stream.aclose()
        finally:
            if release is not None:
                release()
