"""The journal and the work it owes: what makes the event path durable.

- `georeg_events`, the journal: every accepted registry event, once per event id, written before the
  receiver answers 2xx, so an event the registry considers delivered is never lost;
- `georeg_work`, what is still to be done: one row per (secondary, repository, reference). A new event
  for the same key only bumps the row's `sequence`, which is how a burst of pushes to one tag becomes
  one replication of the latest. A row is deleted only when a run that started at its current
  sequence has succeeded.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Float, Index, Integer, String, Text, UniqueConstraint, delete, func, select, update
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.sql import Executable

from georeg.events import REPLICATE, AcceptedEvent
from georeg.references import is_digest
from georeg.retries import backoff_delay
from georeg.state.database import Base, Database

# A work row's status.
PENDING, RUNNING, FAILED = "pending", "running", "failed"
# A failed run's retry waits 2 s, 4 s, 8 s ... up to `dispatch.backoff_cap_seconds`.
_RETRY_BASE_SECONDS = 2.0


class JournalEvent(Base):
    __tablename__ = "georeg_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(255), unique=True)
    action: Mapped[str] = mapped_column(String(16))
    repository: Mapped[str] = mapped_column(String(255))
    reference: Mapped[str] = mapped_column(String(255))
    received_at: Mapped[float] = mapped_column(Float)


class WorkItem(Base):
    __tablename__ = "georeg_work"
    __table_args__ = (
        UniqueConstraint("secondary", "repository", "reference"),
        Index("ix_georeg_work_due", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    secondary: Mapped[str] = mapped_column(String(255))
    repository: Mapped[str] = mapped_column(String(255))
    reference: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(16))
    sequence: Mapped[int] = mapped_column(Integer)  # the journal id of the latest event for this key
    dispatched_sequence: Mapped[int | None] = mapped_column(Integer, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default=PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    first_event_at: Mapped[float] = mapped_column(Float)  # the oldest event this row still owes
    flow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[float] = mapped_column(Float)


@dataclass(frozen=True)
class Claim:
    """A work row handed to the dispatcher: run `action` for this key, as of `sequence`. A batch flow
    run gets its claims as parameters (`asdict`) and records each one's outcome itself."""

    id: int
    secondary: str
    repository: str
    reference: str
    action: str
    sequence: int
    attempts: int
    first_event_at: float
    flow_run_id: str | None


class Journal:
    """The receiver writes events here; the dispatcher claims the work they owe and records the outcome."""

    def __init__(self, database: Database) -> None:
        self._db = database

    async def record_events(
        self,
        events: Sequence[AcceptedEvent],
        secondaries: Sequence[str],
        *,
        digest_delay: float = 0.0,
        dispatch_delay: float = 0.0,
    ) -> int:
        """Journal new events and owe their work to every secondary, in one transaction.

        A push by digest alone is owed `digest_delay` seconds later: it is most often a child of an index
        whose own push follows at once, and the index's run covers it (`covered`). Every event's work is
        owed no sooner than `dispatch_delay` (events mode: the run Prefect's trigger starts settles it
        first, `settle_through`; the dispatcher only starts what is still owed then).

        Returns how many were new: a redelivered event id is recorded once.
        """
        now = time.time()
        new = 0
        async with self._db.transaction() as session:
            for accepted in events:
                # One statement, not "select, then insert": two receivers on one PostgreSQL database may
                # journal the same delivery at the same moment; the second one waits and inserts nothing.
                journal_id = await session.scalar(
                    self._db.insert(JournalEvent)
                    .values(
                        event_id=accepted.event_id,
                        action=accepted.action,
                        repository=accepted.repository,
                        reference=accepted.reference,
                        received_at=now,
                    )
                    .on_conflict_do_nothing(index_elements=["event_id"])
                    .returning(JournalEvent.id)
                )
                if journal_id is None:
                    continue
                new += 1
                by_digest = accepted.action == REPLICATE and is_digest(accepted.reference)
                due = now + max(dispatch_delay, digest_delay if by_digest else 0.0)
                for secondary in secondaries:
                    await session.execute(self._owe(secondary, accepted, journal_id, now, due))
        return new

    def _owe(self, secondary: str, accepted: AcceptedEvent, sequence: int, now: float, due: float) -> Executable:
        values = {
            "secondary": secondary,
            "repository": accepted.repository,
            "reference": accepted.reference,
            "action": accepted.action,
            "sequence": sequence,
            "status": PENDING,
            "attempts": 0,
            "next_attempt_at": due,
            "first_event_at": now,
            "updated_at": now,
        }
        insert = self._db.insert(WorkItem).values(**values)
        current = WorkItem.__table__.c
        # The latest event decides what to do; a failed row comes back to life; a running row keeps
        # running and is picked up again afterwards because its sequence moved on.
        return insert.on_conflict_do_update(
            index_elements=["secondary", "repository", "reference"],
            set_={
                "action": insert.excluded.action,
                "sequence": insert.excluded.sequence,
                "status": func.coalesce(func.nullif(current.status, FAILED), PENDING),
                "attempts": 0,
                "next_attempt_at": due,
                "updated_at": now,
            },
        )

    async def claim_due(self, limit: int) -> list[Claim]:
        """Mark up to `limit` due rows running and return them (SKIP LOCKED lets receivers share a database)."""
        if limit <= 0:
            return []
        now = time.time()
        async with self._db.transaction() as session:
            rows = (
                await session.scalars(
                    select(WorkItem)
                    .where(WorkItem.status == PENDING, WorkItem.next_attempt_at <= now)
                    .order_by(WorkItem.next_attempt_at)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            for row in rows:
                row.status, row.dispatched_sequence, row.updated_at = RUNNING, row.sequence, now
            return [_claim(row) for row in rows]

    async def running(self) -> list[Claim]:
        """Rows some dispatcher started: after a restart they are watched again (or re-run)."""
        async with self._db.transaction() as session:
            rows = (await session.scalars(select(WorkItem).where(WorkItem.status == RUNNING))).all()
            return [_claim(row) for row in rows]

    async def set_flow_run(self, claim: Claim, flow_run_id: str) -> None:
        await self._db.execute(update(WorkItem).where(WorkItem.id == claim.id).values(flow_run_id=flow_run_id))

    async def release(self, claim: Claim) -> None:
        """Put a claimed row back untouched (for example while the Prefect API is unreachable)."""
        await self._db.execute(update(WorkItem).where(WorkItem.id == claim.id).values(status=PENDING, flow_run_id=None))

    async def succeeded(self, claim: Claim) -> bool:
        """Done as of the claim's sequence. Returns False if newer events arrived meanwhile (run again)."""
        now = time.time()
        async with self._db.transaction() as session:
            removed = await session.execute(
                delete(WorkItem).where(WorkItem.id == claim.id, WorkItem.sequence == claim.sequence)
            )
            if removed.rowcount:
                return True
            again = await session.execute(
                update(WorkItem)
                .where(WorkItem.id == claim.id)
                .values(status=PENDING, attempts=0, next_attempt_at=now, flow_run_id=None, updated_at=now)
            )
            return not again.rowcount  # no row at all: settled already (a batch run settles its own)

    async def failed(self, claim: Claim, error: str, *, max_attempts: int, backoff_cap: float) -> float:
        """Record a failed run; retry later with exponential backoff and jitter, or park it as failed."""
        attempts = claim.attempts + 1
        delay = backoff_delay(attempts, base=_RETRY_BASE_SECONDS, cap=backoff_cap)
        now = time.time()
        await self._db.execute(
            update(WorkItem)
            .where(WorkItem.id == claim.id)
            .values(
                status=FAILED if attempts >= max_attempts else PENDING,
                attempts=attempts,
                next_attempt_at=now + delay,
                last_error=error[:1000],
                flow_run_id=None,
                updated_at=now,
            )
        )
        return delay

    async def covered(self, secondary: str, repository: str, digests: Sequence[str]) -> int:
        """Drop the pending replications of these manifests: a run that replicated an index put its
        children too. A digest names the same bytes for ever, so a child pushed again is covered as well.
        Returns how many rows went."""
        if not digests:
            return 0
        async with self._db.transaction() as session:
            removed = await session.execute(
                delete(WorkItem).where(
                    WorkItem.secondary == secondary,
                    WorkItem.repository == repository,
                    WorkItem.reference.in_(list(digests)),
                    WorkItem.action == REPLICATE,
                    WorkItem.status == PENDING,
                )
            )
            return int(removed.rowcount or 0)

    async def last_sequence(self) -> int:
        """The newest journal id: a run that starts now covers every event up to it."""
        async with self._db.transaction() as session:
            return int(await session.scalar(select(func.max(JournalEvent.id))) or 0)

    async def settle_through(self, secondary: str, repository: str, reference: str, sequence: int) -> int:
        """A run not started by the dispatcher (events mode: by Prefect's trigger) made this reference on
        `secondary` equal to the primary, having started after journal id `sequence`: the work owed for
        events up to it is done. A row a dispatcher is running is left to that run. Returns rows removed."""
        async with self._db.transaction() as session:
            removed = await session.execute(
                delete(WorkItem).where(
                    WorkItem.secondary == secondary,
                    WorkItem.repository == repository,
                    WorkItem.reference == reference,
                    WorkItem.status != RUNNING,
                    WorkItem.sequence <= sequence,
                )
            )
            return int(removed.rowcount or 0)

    async def unsettled(self, claims: Sequence[Claim]) -> list[Claim]:
        """The claims whose run recorded no outcome: their rows are still running as these claims. A row
        the run settled and another run has claimed since (newer events, or a retry) is not this claim's."""
        async with self._db.transaction() as session:
            rows = await session.execute(
                select(WorkItem.id, WorkItem.dispatched_sequence, WorkItem.attempts).where(
                    WorkItem.id.in_([claim.id for claim in claims]), WorkItem.status == RUNNING
                )
            )
            running = {(row.id, row.dispatched_sequence, row.attempts) for row in rows}
        return [claim for claim in claims if (claim.id, claim.sequence, claim.attempts) in running]

    async def depth(self) -> int:
        """Work rows not yet done (pending, running or failed)."""
        async with self._db.transaction() as session:
            return int(await session.scalar(select(func.count()).select_from(WorkItem)) or 0)

    async def oldest_owed_event(self, secondary: str) -> float | None:
        """When the oldest event still owed to `secondary` arrived (None when nothing is owed)."""
        async with self._db.transaction() as session:
            return await session.scalar(
                select(func.min(WorkItem.first_event_at)).where(WorkItem.secondary == secondary)
            )


def _claim(row: WorkItem) -> Claim:
    return Claim(
        id=row.id,
        secondary=row.secondary,
        repository=row.repository,
        reference=row.reference,
        action=row.action,
        sequence=row.sequence,
        attempts=row.attempts,
        first_event_at=row.first_event_at,
        flow_run_id=row.flow_run_id,
    )
