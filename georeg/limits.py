"""Limits per registry that hold across every worker, however many run and wherever: Prefect global
concurrency limits, named after the registry's host.

- `max_concurrent_copies`: blob transfers in flight against the registry; each copy holds one slot
  of its source and one of its target for as long as bytes move. Slots are leases: a worker that
  dies holding one gives it back when the lease runs out.
- `requests_per_second`: a rate limit (a limit whose slots decay) taken before every request.

georeg creates or updates these limits itself, from the config, when a flow starts (and
`georeg limits` does it at deploy time); with neither setting nothing is asked of Prefect.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from georeg.config import GeoregConfig, RegistryConfig


def limit_name(registry: RegistryConfig, kind: str) -> str:
    """e.g. georeg-copies-registry.example.com-443 (the same name on every worker)."""
    url = httpx.URL(registry.url)
    port = url.port or (443 if url.scheme == "https" else 80)
    return re.sub(r"[^A-Za-z0-9.-]", "-", f"georeg-{kind}-{url.host}-{port}")


@dataclass(frozen=True)
class RegistryLimits:
    """What a client of one registry must respect; nothing when the config sets no limits."""

    copies: str | None = None
    rate: str | None = None

    @classmethod
    def of(cls, registry: RegistryConfig) -> RegistryLimits:
        return cls(
            copies=limit_name(registry, "copies") if registry.max_concurrent_copies else None,
            rate=limit_name(registry, "rate") if registry.requests_per_second else None,
        )

    @contextlib.asynccontextmanager
    async def copy_slot(self) -> AsyncIterator[None]:
        if self.copies is None:
            yield
            return
        from prefect.concurrency.asyncio import concurrency

        async with concurrency(self.copies, occupy=1, strict=True):
            yield

    async def before_request(self) -> None:
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
