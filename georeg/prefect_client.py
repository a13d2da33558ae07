"""The Prefect API clients `georeg serve` shares among the flow runs it starts, watches or runs inline."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import httpx

from georeg.retries import backoff_delay


class BusyServerRetries(httpx.AsyncBaseTransport):
    """Sends a request again, within 50 ms, then 100 ms and so on, while the Prefect server answers 503.

    A Prefect server on SQLite (its default database) answers 503 when two of its writes meet, and
    Prefect's client then waits 2 s, 4 s, 8 s before it tries again: in a burst of pushes one flow
    run's creation waited 14 s that way while the server was idle again after a fraction of a second
    (benchmarks/burst.py). The refused write was rolled back, so sending it again is safe. After
    these few quick tries the 503 reaches Prefect's client, whose own backoff then applies.
    """

    QUICK_TRIES = 5  # waits of 50 ms to 0.8 s: 1.5 s at most in all

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(1, self.QUICK_TRIES + 1):
            response = await self._inner.handle_async_request(request)
            if response.status_code != httpx.codes.SERVICE_UNAVAILABLE:
                return response
            await response.aclose()
            await asyncio.sleep(backoff_delay(attempt, base=0.05, cap=0.8))
        return await self._inner.handle_async_request(request)

    async def __aenter__(self) -> BusyServerRetries:
        await self._inner.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self._inner.__aexit__(exc_type, exc_value, traceback)

    async def aclose(self) -> None:
        await self._inner.aclose()


def retry_busy_server(client: Any) -> Any:
    """`client` (a PrefectClient, not yet entered) with `BusyServerRetries` around its transport.

    httpx takes one transport per client and Prefect builds it (proxies, connection retries), so the
    retries wrap the one it built rather than replacing it."""
    http: httpx.AsyncClient = client._client
    http._transport = BusyServerRetries(http._transport)
    return client


class SharedPrefectClient:
    """One Prefect API client for the flow runs the dispatcher watches or runs inline.

    Outside a flow run, `get_client()` makes a new client at every call, and each one builds its own
    TLS context (loading the CA bundle: about 0.1 s of CPU) and opens new connections. With every run
    polled every `poll_seconds` and, inline, run through its engine, that was most of the receiver's
    own work per event. The client is opened on first use, without asking the API anything. Once it
    has connected, Prefect's client retries refused connections for about a minute (it rides through
    a server restart), so calls that must notice an outage at once use a client of their own.
    """

    def __init__(self) -> None:
        self._context: Any = None  # prefect.context.AsyncClientContext, imported on first use
        self._sync_context: Any = None  # prefect.context.SyncClientContext, for inline runs
        self._opening = asyncio.Lock()

    async def context(self) -> Any:
        async with self._opening:
            if self._context is None:
                from prefect.context import AsyncClientContext

                context = AsyncClientContext()
                retry_busy_server(context.client)
                await context.client.__aenter__()
                self._context = context
            return self._context

    async def client(self) -> Any:
        return (await self.context()).client

    def sync_context(self) -> Any:
        """The synchronous client the flow engine asks for at every run (to read the server's default
        result storage): made anew each time, it cost the receiver a TLS context, 12% of its CPU in a
        burst (py-spy)."""
        if self._sync_context is None:
            from prefect.context import SyncClientContext

            context = SyncClientContext()
            context.client.__enter__()  # not the context's own __enter__: the variable is set per run below
            self._sync_context = context
        return self._sync_context

    @contextlib.asynccontextmanager
    async def installed(self) -> AsyncIterator[None]:
        """Inside this block, Prefect's own `get_client()` (the flow engine's), async or sync, answers with
        the shared clients."""
        from prefect.context import AsyncClientContext, SyncClientContext

        token = AsyncClientContext.__var__.set(await self.context())
        sync_token = SyncClientContext.__var__.set(self.sync_context())
        try:
            yield
        finally:
            SyncClientContext.__var__.reset(sync_token)
            AsyncClientContext.__var__.reset(token)

    async def close(self) -> None:
        context, self._context = self._context, None
        if context is not None:
            await context.client.__aexit__(None, None, None)
        sync_context, self._sync_context = self._sync_context, None
        if sync_context is not None:
            sync_context.client.__exit__(None, None, None)
