"""What every flow does around its procedure: load the config, open clients, fan out to secondaries."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from georeg import tag_records
from georeg.config import GeoregConfig, SecondaryConfig
from georeg.deletion import Deletion, DeletionOutcome
from georeg.errors import GeoregError, ReplicationError
from georeg.events import REPLICATE
from georeg.limits import apply_limits
from georeg.prefect_events import emit_replication
from georeg.references import ImageReference
from georeg.registry import RegistryClient, primary_client, secondary_client
from georeg.tag_records import reference_tag

if TYPE_CHECKING:
    from georeg.replication import ImageReplication
    from georeg.state import StateStore
    from georeg.state.journal import Claim

T = TypeVar("T")


async def for_each_secondary(
    config: GeoregConfig,
    name: str | None,
    step: Callable[[RegistryClient, RegistryClient], Awaitable[T]],
    *,
    store: StateStore | None = None,
) -> list[T]:
    """Run `step(primary, secondary)` for every selected secondary at once.

    With `store`, the clients share their registries' pauses (429s) with every other worker. The long
    runs (backfill, verify) pass it; an event flow, over in a second or two, does not open the state
    database before its copy for that: its own 429s still pause it.

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
    """The state database for the length of a flow run (migrated to this georeg's schema on first use)."""
    from georeg.state import StateStore

    store = StateStore(config.state.url)
    try:
        await store.ensure_schema(migrate=config.state.migrate_on_start)
        yield store
    finally:
        await store.close()


@dataclass
class Outcome:
    """What a step tells the record of its outcome: the manifests it put besides its own, the tag it put
    or the reference it removed (for georeg's record of what the secondary holds), and the figures
    (digest, bytes) that Prefect's event feed reports."""

    covers: tuple[str, ...] = ()
    wrote: dict[str, str] = field(default_factory=dict)  # tag -> digest
    removed: str | None = None  # a tag, or a digest and every tag that pointed at it
    figures: dict[str, Any] = field(default_factory=dict)

    def copied(self, image: ImageReplication) -> None:
        self.covers, self.figures = image.children, image.summary()
        tag = reference_tag(image.reference.reference)
        if tag is not None:
            self.wrote = {tag: image.digest}

    def deleted(self, deletion: Deletion) -> None:
        self.figures = {"outcome": deletion.outcome.value, "digest": deletion.digest}
        if deletion.outcome is DeletionOutcome.REMOVED:
            self.removed = deletion.reference.reference


class EventOutcomes:
    """The event path's part in the sync state: a failure fails the repository naming the tag; a
    success only makes the repository known (synced is for a backfill, which sees every tag).

    The state database is opened at the first outcome, after the copy: in a fresh flow-run process,
    importing SQLAlchemy and checking the schema costs about half a second, which then no longer
    stands between a push and the image being on the secondary.
    """

    def __init__(self, config: GeoregConfig) -> None:
        self.config = config
        self._store: StateStore | None = None
        self._opening = asyncio.Lock()
        self._covers_through: int | None = None  # events mode: the journal's newest id when the run started

    async def start(self) -> None:
        """In events mode, a run Prefect's trigger started settles the journal's work itself: note, before
        anything is read from the primary, which events it covers."""
        if self.config.dispatch.mode == "events":
            self._covers_through = await (await self._open()).journal.last_sequence()

    @contextlib.asynccontextmanager
    async def recording(
        self, secondary: str, image: ImageReference, claim: Claim | None = None, *, action: str = REPLICATE
    ) -> AsyncIterator[Outcome]:
        """Record how the block, the work for `image` on `secondary`, ended; a failure is raised on.

        With `claim` (a batch run's item), the journal's work row is settled here too, as the
        dispatcher settles a run of its own. What the block puts in `covers` (an index's children) is
        no longer owed on its own. Either way, Prefect's event feed hears of it."""
        outcome = Outcome()
        if claim is not None:
            action = claim.action
        try:
            yield outcome
        except GeoregError as error:
            emit_replication(secondary, image.repository, image.reference, action, error=str(error))
            await self._failed(secondary, image, error, claim)
            raise
        emit_replication(secondary, image.repository, image.reference, action, **outcome.figures)
        await self._succeeded(secondary, image, outcome, claim)

    async def _succeeded(self, secondary: str, image: ImageReference, outcome: Outcome, claim: Claim | None) -> None:
        store = await self._open()
        await store.sync.set_repository_state(secondary, image.repository)
        if outcome.wrote or outcome.removed is not None:
            await store.sync.update_tag_record(
                secondary,
                image.repository,
                functools.partial(tag_records.changed, wrote=outcome.wrote, removed=outcome.removed),
            )
        await store.journal.covered(secondary, image.repository, outcome.covers)
        if claim is not None:
            await store.journal.succeeded(claim)
        elif self._covers_through is not None:
            await store.journal.settle_through(secondary, image.repository, image.reference, self._covers_through)

    async def _failed(self, secondary: str, image: ImageReference, error: GeoregError, claim: Claim | None) -> None:
        store = await self._open()
        await store.sync.repository_failed(
            secondary,
            image.repository,
            f"tag {image.reference}: {error}",
            base=self.config.replication.retry_backoff_base_seconds,
            cap=self.config.replication.retry_backoff_cap_seconds,
        )
        if claim is not None:
            await store.journal.failed(
                claim,
                f"{type(error).__name__}: {error}",
                max_attempts=self.config.dispatch.max_attempts,
                backoff_cap=self.config.dispatch.backoff_cap_seconds,
            )

    async def _open(self) -> StateStore:
        async with self._opening:
            if self._store is None:
                from georeg.state import StateStore

                store = StateStore(self.config.state.url)
                try:
                    await store.ensure_schema(migrate=self.config.state.migrate_on_start)
                except BaseException:
                    await store.close()
                    raise
                self._store = store
            return self._store

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()
            self._store = None


@contextlib.asynccontextmanager
async def event_outcomes(config: GeoregConfig) -> AsyncIterator[EventOutcomes]:
    """Where `replicate-image` and `delete-image` record what happened, for the length of a flow run."""
    outcomes = EventOutcomes(config)
    try:
        await outcomes.start()
        yield outcomes
    finally:
        await outcomes.close()


def run_holder() -> str:
    """Who holds a lease: the flow run's id inside Prefect, else this process."""
    from prefect.runtime import flow_run

    return str(flow_run.id or f"{socket.gethostname()}:{os.getpid()}")


def run_name(kind: str) -> Callable[[], str]:
    """A flow run name that says what the run does and to which secondary, e.g. "backfill of east
    (dry run)": the UI lists runs by name, and Prefect's random ones ("deft-orca") say nothing."""

    def name() -> str:
        from prefect.runtime import flow_run

        parameters = flow_run.parameters
        words = [f"{kind} of {parameters.get('secondary') or 'every secondary'}"]
        if parameters.get("repositories") is not None:
            words.append(f"({len(parameters['repositories'])} repositories)")
        if parameters.get("deep"):
            words.append("(deep)")
        if parameters.get("dry_run"):
            words.append("(dry run)")
        return " ".join(words)

    return name
