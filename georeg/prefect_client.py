"""The Prefect API clients `georeg serve` shares among the flow runs it starts, watches or runs inline."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any


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
