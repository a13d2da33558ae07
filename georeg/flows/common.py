"""What every flow does around its procedure: load the config, open clients, fan out to secondaries."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from georeg.config import GeoregConfig, SecondaryConfig
from georeg.errors import GeoregError, ReplicationError
from georeg.registry import RegistryClient, primary_client, secondary_client

T = TypeVar("T")


async def for_each_secondary(
    config: GeoregConfig,
    name: str | None,
    step: Callable[[RegistryClient, RegistryClient], Awaitable[T]],
) -> list[T]:
    """Run `step(primary, secondary)` for every selected secondary at once.

    Every secondary is attempted; if any failed, the whole run fails naming each failure, so a
    flow never reports success for a secondary it did not bring up to date.
    """
    targets = config.select_secondaries(name)

    async def run(target: SecondaryConfig) -> T:
        async with primary_client(config) as primary, secondary_client(config, target) as secondary:
            return await step(primary, secondary)

    outcomes = await asyncio.gather(*(run(target) for target in targets), return_exceptions=True)
    failures = [
        f"{target.name}: {outcome}"
        for target, outcome in zip(targets, outcomes, strict=True)
        if isinstance(outcome, BaseException)
    ]
    for outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
            raise outcome  # cancellation and interrupts are not failures to summarise
    if failures:
        if len(failures) == 1 and isinstance(outcomes[0], GeoregError) and len(targets) == 1:
            raise outcomes[0]
        raise ReplicationError("; ".join(failures))
    return list(outcomes)  # type: ignore[arg-type]


async def bounded(semaphore: asyncio.Semaphore, work: Awaitable[T]) -> T:
    """Await `work` once `semaphore` has room: bounds how many copies run at once."""
    async with semaphore:
        return await work
