"""What every flow does around its procedure: load the config, open clients, fan out to secondaries."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from georeg.config import GeoregConfig, SecondaryConfig
from georeg.errors import ReplicationError
from georeg.limits import apply_limits
from georeg.registry import RegistryClient, primary_client, secondary_client
from georeg.state import StateStore

T = TypeVar("T")


async def for_each_secondary(
    config: GeoregConfig,
    name: str | None,
    step: Callable[[RegistryClient, RegistryClient], Awaitable[T]],
    *,
    store: StateStore,
) -> list[T]:
    """Run `step(primary, secondary)` for every selected secondary at once; the clients share their
    registries' pauses through `store`.

    Every secondary is attempted; if any failed, the whole run fails naming each failure, so a
    flow never reports success for a secondary it did not bring up to date.
    """
    targets = config.select_secondaries(name)
    await apply_limits(config)  # limits must exist before the first copy asks for a slot

    async def run(target: SecondaryConfig) -> T:
        async with primary_client(config, store) as primary, secondary_client(config, target, store) as secondary:
            return await step(primary, secondary)

    outcomes = await asyncio.gather(*(run(target) for target in targets), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
            raise outcome  # cancellation and interrupts are not failures to summarise
    if len(targets) == 1 and isinstance(outcomes[0], Exception):
        raise outcomes[0]  # one secondary: its own error, with its own type
    failures = [f"{t.name}: {o}" for t, o in zip(targets, outcomes, strict=True) if isinstance(o, Exception)]
    if failures:
        raise ReplicationError("; ".join(failures))
    return list(outcomes)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def open_state(config: GeoregConfig) -> AsyncIterator[StateStore]:
    """The state database for the length of a flow run (tables created on first use)."""
    store = StateStore(config.state.url)
    try:
        await store.create_tables()
        yield store
    finally:
        await store.close()


async def record_event_outcome(
    store: StateStore, config: GeoregConfig, secondary: str, repository: str, reference: str, error: Exception | None
) -> None:
    """The event path's part in the sync state: a failure fails the repository naming the tag; a
    success only makes the repository known (synced is for a backfill, which sees every tag)."""
    if error is None:
        await store.set_repository_state(secondary, repository)
    else:
        await store.repository_failed(
            secondary,
            repository,
            f"tag {reference}: {error}",
            base=config.replication.retry_backoff_base_seconds,
            cap=config.replication.retry_backoff_cap_seconds,
        )


def run_holder() -> str:
    """Who holds a lease: the flow run's id inside Prefect, else this process."""
    from prefect.runtime import flow_run

    return str(flow_run.id or f"{socket.gethostname()}:{os.getpid()}")
