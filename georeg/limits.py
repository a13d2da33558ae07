"""Limits per registry that hold across every worker, however many run and wherever: Prefect global
concurrency limits, named after the registry's host.

- `max_concurrent_copies`: blob transfers in flight against the registry; each copy holds one slot
  of its source and one of its target for as long as bytes move. Slots are leases: a worker that
  dies holding one gives it back when the lease runs out.
- `requests_per_second`: a rate limit (a limit whose slots decay) taken before every request.
- a 429's `Retry-After` (or, without one, the client's backoff) pauses the registry for every client
  of it: the pause is written to the state database, which every worker shares, and each client
  looks there at most once a second before its requests.

georeg creates or updates these limits itself, from the config, when a flow starts (and
`georeg limits` does it at deploy time); with neither setting nothing is asked of Prefect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx

from georeg.config import GeoregConfig, RegistryConfig

if TYPE_CHECKING:
    from georeg.state import StateStore

logger = logging.getLogger("georeg.limits")
# How long the copy slots of a worker that died stay taken: the shortest lease Prefect grants (it renews
# the lease of a live holder in the background).
COPY_SLOT_LEASE_SECONDS = 60


def limit_name(registry: RegistryConfig, kind: str) -> str:
    """e.g. georeg-copies-registry.example.com-443 (the same name on every worker)."""
    url = httpx.URL(registry.url)
    port = url.port or (443 if url.scheme == "https" else 80)
    return re.sub(r"[^A-Za-z0-9.-]", "-", f"georeg-{kind}-{url.host}-{port}")


class RegistryPause:
    """When a registry said "retry after": every request to it waits until then, in every worker.

    Without a state store (a bare client) the pause holds for this client's own requests only.
    """

    REFRESH_SECONDS = 1.0  # how stale another worker's pause may be when a request looks

    def __init__(self, name: str = "", store: StateStore | None = None) -> None:
        self.name = name
        self._store = store
        self._until = 0.0
        self._looked_at = -self.REFRESH_SECONDS
        self._looking = asyncio.Lock()

    @property
    def until(self) -> float:
        return self._until

    async def wait(self) -> None:
        """Return once the registry may be asked again."""
        await self._look()
        while (remaining := self._until - time.time()) > 0:
            await asyncio.sleep(remaining)

    async def extend(self, seconds: float) -> None:
        """Pause the registry for `seconds` from now, for this client and (through the store) every other."""
        until = time.time() + seconds
        self._until = max(self._until, until)
        if self._store is not None:
            from sqlalchemy.exc import SQLAlchemyError  # only with a store: an event flow never imports it

            try:
                await self._store.pauses.pause(self.name, until)
            except SQLAlchemyError as error:  # the pause still holds here; the others learn of it by their own 429
                logger.warning("could not share the pause of %s: %s", self.name, error)

    async def _look(self) -> None:
        if self._store is None or time.monotonic() - self._looked_at < self.REFRESH_SECONDS:
            return
        from sqlalchemy.exc import SQLAlchemyError

        async with self._looking:  # one look for all the requests that are about to start
            if time.monotonic() - self._looked_at < self.REFRESH_SECONDS:
                return
            self._looked_at = time.monotonic()
            try:
                self._until = max(self._until, await self._store.pauses.paused_until(self.name))
            except SQLAlchemyError as error:
                logger.warning("could not read the pause of %s: %s", self.name, error)


@dataclass(frozen=True)
class RegistryLimits:
    """What a client of one registry must respect; nothing but its own pauses when the config sets no limits."""

    copies: str | None = None
    rate: str | None = None
    pause: RegistryPause = field(default_factory=RegistryPause)

    @classmethod
    def of(cls, registry: RegistryConfig, store: StateStore | None = None) -> RegistryLimits:
        return cls(
            copies=limit_name(registry, "copies") if registry.max_concurrent_copies else None,
            rate=limit_name(registry, "rate") if registry.requests_per_second else None,
            pause=RegistryPause(limit_name(registry, "pause"), store),
        )

    @contextlib.asynccontextmanager
    async def copy_slot(self) -> AsyncIterator[None]:
        if self.copies is None:
            yield
            return
        from prefect.concurrency.asyncio import concurrency

        async with concurrency(self.copies, occupy=1, strict=True, lease_duration=COPY_SLOT_LEASE_SECONDS):
            yield

    async def before_request(self) -> None:
        await self.pause.wait()
        if self.rate is not None:
            from prefect.concurrency.asyncio import rate_limit

            await rate_limit(self.rate, occupy=1, strict=True)


async def apply_limits(config: GeoregConfig) -> list[tuple[str, float]]:
    """Create or update the limits the config asks for in the Prefect API; returns (name, value) pairs."""
    wanted: dict[str, tuple[int, float | None]] = {}
    for registry in [config.primary, *config.secondaries]:
        if registry.max_concurrent_copies:
            wanted[limit_name(registry, "copies")] = (registry.max_concurrent_copies, None)
        if registry.requests_per_second:
            # A burst of one second's worth, refilled continuously.
            rate = registry.requests_per_second
            wanted[limit_name(registry, "rate")] = (max(1, round(rate)), rate)
    if not wanted:
        return []
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        for name, (limit, decay) in wanted.items():
            await client.upsert_global_concurrency_limit_by_name(name, limit, slot_decay_per_second=decay)
    return [(name, decay or limit) for name, (limit, decay) in wanted.items()]
