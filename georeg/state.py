"""georeg's durable state (`state.url`: SQLite by default, PostgreSQL by URL).

`georeg_repositories` is the sync state per (secondary, repository), like GitLab Geo's registry
table: pending, started, synced or failed, with a retry count that only grows until a success.
`georeg_leases` keeps two backfills of one secondary from overlapping; `georeg_runs` remembers
backfills and verifications for `georeg status`; `georeg_pauses` holds a registry's "retry after"
(a 429), so that every worker slows down, not only the one that was told.

Two tables make the event path durable:
- `georeg_events`, the journal: every accepted registry event, once per event id, written before the
  receiver answers 2xx, so an event the registry considers delivered is never lost;
- `georeg_work`, what is still to be done: one row per (secondary, repository, reference). A new event
  for the same key only bumps the row's `sequence`, which is how a burst of pushes to one tag becomes
  one replication of the latest. A row is deleted only when a run that started at its current
  sequence has succeeded.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Float, Index, Integer, String, Text, UniqueConstraint, case, delete, event, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql import Executable

from georeg.errors import ConfigError

PENDING, RUNNING, FAILED = "pending", "running", "failed"
STARTED, SYNCED = "started", "synced"
VERIFIED, MISMATCH = "verified", "mismatch"
REPLICATE, DELETE = "replicate", "delete"


# Rows per multi-row INSERT: well under SQLite's 32,766 and PostgreSQL's 65,535 bound parameters.
_ROWS_PER_STATEMENT = 500


class Base(DeclarativeBase):
    pass


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


class RepositoryState(Base):
    __tablename__ = "georeg_repositories"
    __table_args__ = (UniqueConstraint("secondary", "repository"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    secondary: Mapped[str] = mapped_column(String(255))
    repository: Mapped[str] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16), default=PENDING)
    retry_count: Mapped[int] = mapped_column(Integer, default=0)
    retry_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_synced_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_failure: Mapped[str | None] = mapped_column(Text, nullable=True)
    verification: Mapped[str | None] = mapped_column(String(16), nullable=True)  # VERIFIED or MISMATCH
    verified_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    verification_failure: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[float] = mapped_column(Float)


class Lease(Base):
    __tablename__ = "georeg_leases"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[float] = mapped_column(Float)


class RunRecord(Base):
    __tablename__ = "georeg_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))  # backfill or verify
    secondary: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(32), nullable=True)
    summary: Mapped[str | None] = mapped_column(Text, nullable=True)


class RegistryPause(Base):
    __tablename__ = "georeg_pauses"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # georeg-pause-<host>-<port>
    until: Mapped[float] = mapped_column(Float)


@dataclass(frozen=True)
class AcceptedEvent:
    """A registry event the receiver keeps: a manifest push (replicate) or a delete."""

    event_id: str
    action: str  # REPLICATE or DELETE
    repository: str
    reference: str


@dataclass(frozen=True)
class Claim:
    """A work row handed to the dispatcher: run `action` for this key, as of `sequence`."""

    id: int
    secondary: str
    repository: str
    reference: str
    action: str
    sequence: int
    attempts: int
    first_event_at: float
    flow_run_id: str | None


def database_url(url: str) -> str:
    """`sqlite:///x.db` and `postgresql://...` as the async drivers Prefect already installs."""
    for plain, driver in (
        ("sqlite://", "sqlite+aiosqlite://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
    ):
        if url.startswith(plain):
            return driver + url[len(plain) :]
    if url.startswith(("sqlite+", "postgresql+")):
        return url
    raise ConfigError(f"state.url: {url.split('://')[0]!r} is not supported; use sqlite:///PATH or postgresql://...")


class StateStore:
    """The state database: one engine per process, short transactions, safe for several processes."""

    def __init__(self, url: str) -> None:
        self.engine: AsyncEngine = create_async_engine(database_url(url))
        self._dialect = self.engine.dialect.name
        if self._dialect == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
            event.listen(self.engine.sync_engine, "begin", _sqlite_begin_immediate)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    async def create_tables(self) -> None:
        async with self.engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)

    async def close(self) -> None:
        await self.engine.dispose()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        async with self._sessions() as session, session.begin():
            yield session

    # --- the journal --------------------------------------------------------------------------

    async def record_events(self, events: Sequence[AcceptedEvent], secondaries: Sequence[str]) -> int:
        """Journal new events and owe their work to every secondary, in one transaction.

        Returns how many were new: a redelivered event id is recorded once.
        """
        now = time.time()
        new = 0
        async with self.transaction() as session:
            for accepted in events:
                # One statement, not "select, then insert": two receivers on one PostgreSQL database may
                # journal the same delivery at the same moment; the second one waits and inserts nothing.
                journal_id = await session.scalar(
                    self._insert(JournalEvent)
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
                for secondary in secondaries:
                    await session.execute(self._owe(secondary, accepted, journal_id, now))
        return new

    def _owe(self, secondary: str, accepted: AcceptedEvent, sequence: int, now: float) -> Executable:
        values = {
            "secondary": secondary,
            "repository": accepted.repository,
            "reference": accepted.reference,
            "action": accepted.action,
            "sequence": sequence,
            "status": PENDING,
            "attempts": 0,
            "next_attempt_at": now,
            "first_event_at": now,
            "updated_at": now,
        }
        insert = self._insert(WorkItem).values(**values)
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
                "next_attempt_at": now,
                "updated_at": now,
            },
        )

    def _insert(self, table: type[Base]) -> Any:  # the dialect's INSERT, with on_conflict_do_update/nothing
        return (postgresql.insert if self._dialect == "postgresql" else sqlite.insert)(table)

    # --- the dispatcher's side ----------------------------------------------------------------

    async def claim_due(self, limit: int) -> list[Claim]:
        """Mark up to `limit` due rows running and return them (SKIP LOCKED lets receivers share a database)."""
        if limit <= 0:
            return []
        now = time.time()
        async with self.transaction() as session:
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
        async with self.transaction() as session:
            rows = (await session.scalars(select(WorkItem).where(WorkItem.status == RUNNING))).all()
            return [_claim(row) for row in rows]

    async def set_flow_run(self, claim: Claim, flow_run_id: str) -> None:
        async with self.transaction() as session:
            await session.execute(update(WorkItem).where(WorkItem.id == claim.id).values(flow_run_id=flow_run_id))

    async def release(self, claim: Claim) -> None:
        """Put a claimed row back untouched (for example while the Prefect API is unreachable)."""
        async with self.transaction() as session:
            await session.execute(
                update(WorkItem).where(WorkItem.id == claim.id).values(status=PENDING, flow_run_id=None)
            )

    async def succeeded(self, claim: Claim) -> bool:
        """Done as of the claim's sequence. Returns False if newer events arrived meanwhile (run again)."""
        now = time.time()
        async with self.transaction() as session:
            removed = await session.execute(
                delete(WorkItem).where(WorkItem.id == claim.id, WorkItem.sequence == claim.sequence)
            )
            if removed.rowcount:
                return True
            await session.execute(
                update(WorkItem)
                .where(WorkItem.id == claim.id)
                .values(status=PENDING, attempts=0, next_attempt_at=now, flow_run_id=None, updated_at=now)
            )
            return False

    async def failed(self, claim: Claim, error: str, *, max_attempts: int, backoff_cap: float) -> float:
        """Record a failed run; retry later with exponential backoff and jitter, or park it as failed."""
        attempts = claim.attempts + 1
        delay = min(backoff_cap, 2.0**attempts) * random.uniform(0.5, 1.0)
        now = time.time()
        async with self.transaction() as session:
            await session.execute(
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

    async def depth(self) -> int:
        """Work rows not yet done (pending, running or failed)."""
        async with self.transaction() as session:
            return int(await session.scalar(select(func.count()).select_from(WorkItem)) or 0)

    async def oldest_owed_event(self, secondary: str) -> float | None:
        """When the oldest event still owed to `secondary` arrived (None when nothing is owed)."""
        async with self.transaction() as session:
            return await session.scalar(
                select(func.min(WorkItem.first_event_at)).where(WorkItem.secondary == secondary)
            )

    # --- sync state per repository ----------------------------------------------------------

    async def repository_states(self, secondary: str) -> dict[str, RepositoryState]:
        async with self.transaction() as session:
            rows = await session.scalars(select(RepositoryState).where(RepositoryState.secondary == secondary))
            return {row.repository: row for row in rows}

    async def set_repository_state(self, secondary: str, repository: str, **values: object) -> None:
        """Create or update the row of (secondary, repository) with `values`."""
        await self.set_repository_states(secondary, [repository], **values)

    async def set_repository_states(self, secondary: str, repositories: Sequence[str], **values: object) -> None:
        """Create or update the rows of many repositories of `secondary` with the same `values`, a few
        hundred rows per statement in one transaction: a backfill records its repositories in bulk."""
        now = time.time()
        async with self.transaction() as session:
            for start in range(0, len(repositories), _ROWS_PER_STATEMENT):
                rows = [
                    {"secondary": secondary, "repository": repository, "updated_at": now, "state": PENDING}
                    | {"retry_count": 0, **values}
                    for repository in repositories[start : start + _ROWS_PER_STATEMENT]
                ]
                await session.execute(
                    self._insert(RepositoryState)
                    .values(rows)
                    .on_conflict_do_update(
                        index_elements=["secondary", "repository"], set_={"updated_at": now, **values}
                    )
                )

    async def repository_synced(self, secondary: str, repository: str) -> None:
        await self.repositories_synced(secondary, [repository])

    async def repositories_synced(self, secondary: str, repositories: Sequence[str]) -> None:
        await self.set_repository_states(
            secondary,
            repositories,
            state=SYNCED,
            retry_count=0,
            retry_at=None,
            last_failure=None,
            last_synced_at=time.time(),
        )

    async def repository_failed(
        self, secondary: str, repository: str, failure: str, *, base: float, cap: float
    ) -> RepositoryState:
        """Count one more failure and schedule the retry (exponential backoff with jitter, capped)."""
        now = time.time()
        async with self.transaction() as session:
            # Create the row if need be first (concurrent failures of a new repository must not both
            # insert it), then lock it so every failure counts.
            await session.execute(
                self._insert(RepositoryState)
                .values(secondary=secondary, repository=repository, retry_count=0, updated_at=now)
                .on_conflict_do_nothing(index_elements=["secondary", "repository"])
            )
            row = await session.scalar(
                select(RepositoryState)
                .where(RepositoryState.secondary == secondary, RepositoryState.repository == repository)
                .with_for_update()
            )
            if row is None:  # forgotten between the two statements
                row = RepositoryState(secondary=secondary, repository=repository, retry_count=0, updated_at=now)
                session.add(row)
            row.retry_count = (row.retry_count or 0) + 1
            row.retry_at = now + min(cap, base * 2 ** (row.retry_count - 1)) * random.uniform(0.5, 1.0)
            row.state, row.last_failure, row.updated_at = FAILED, failure[:2000], now
            return row

    async def repository_verified(self, secondary: str, repository: str, failure: str | None) -> None:
        """Record a verification; a mismatch also sends the repository back to pending for a resync."""
        values: dict[str, object] = {
            "verification": MISMATCH if failure else VERIFIED,
            "verified_at": time.time(),
            "verification_failure": failure,
        }
        if failure:
            values.update(state=PENDING, retry_at=None)
        await self.set_repository_state(secondary, repository, **values)

    async def forget_repository(self, secondary: str, repository: str) -> None:
        async with self.transaction() as session:
            await session.execute(
                delete(RepositoryState).where(
                    RepositoryState.secondary == secondary, RepositoryState.repository == repository
                )
            )

    # --- leases and run records -------------------------------------------------------------

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> str | None:
        """Take the lease `name` for `ttl` seconds; None if taken, else the holder that had it before."""
        now = time.time()
        async with self.transaction() as session:
            # A new lease is inserted in one statement: of two takers at once, the second one waits, inserts
            # nothing and sees the first one's lease below (a "get, then add" raced into a duplicate key).
            created = await session.scalar(
                self._insert(Lease)
                .values(name=name, holder=holder, expires_at=now + ttl)
                .on_conflict_do_nothing(index_elements=["name"])
                .returning(Lease.name)
            )
            if created is not None:
                return holder
            lease = await session.get(Lease, name, with_for_update=True)
            if lease is None:  # released between the two statements
                session.add(Lease(name=name, holder=holder, expires_at=now + ttl))
                return holder
            if lease.expires_at > now and lease.holder != holder:
                return None
            lease.holder, lease.expires_at = holder, now + ttl
            return holder

    async def lease_holder(self, name: str) -> str | None:
        async with self.transaction() as session:
            lease = await session.get(Lease, name)
            return lease.holder if lease is not None and lease.expires_at > time.time() else None

    async def release_lease(self, name: str, holder: str) -> None:
        async with self.transaction() as session:
            await session.execute(delete(Lease).where(Lease.name == name, Lease.holder == holder))

    async def run_started(self, kind: str, secondary: str) -> int:
        async with self.transaction() as session:
            record = RunRecord(kind=kind, secondary=secondary, started_at=time.time())
            session.add(record)
            await session.flush()
            return record.id

    async def run_finished(self, run_id: int, outcome: str, summary: str) -> None:
        async with self.transaction() as session:
            await session.execute(
                update(RunRecord)
                .where(RunRecord.id == run_id)
                .values(finished_at=time.time(), outcome=outcome, summary=summary)
            )

    async def last_run(self, kind: str, secondary: str) -> RunRecord | None:
        async with self.transaction() as session:
            return await session.scalar(
                select(RunRecord)
                .where(RunRecord.kind == kind, RunRecord.secondary == secondary, RunRecord.finished_at.is_not(None))
                .order_by(RunRecord.id.desc())
                .limit(1)
            )

    async def run_summaries(self, kind: str, secondary: str, limit: int = 10_000) -> list[dict[str, Any]]:
        """The recorded summaries of the latest finished runs of `kind` for `secondary`, newest first."""
        async with self.transaction() as session:
            rows = await session.scalars(
                select(RunRecord.summary)
                .where(RunRecord.kind == kind, RunRecord.secondary == secondary, RunRecord.finished_at.is_not(None))
                .order_by(RunRecord.id.desc())
                .limit(limit)
            )
            return [json.loads(summary or "{}") for summary in rows]

    # --- registry pauses ----------------------------------------------------------------------

    async def pause_registry(self, registry: str, until: float) -> None:
        """No request to `registry` before `until` (a pause already longer is kept)."""
        insert = self._insert(RegistryPause).values(name=registry, until=until)
        later = case((RegistryPause.until > insert.excluded.until, RegistryPause.until), else_=insert.excluded.until)
        await self._execute(insert.on_conflict_do_update(index_elements=["name"], set_={"until": later}))

    async def registry_paused_until(self, registry: str) -> float:
        """When requests to `registry` may go on (0 if it was never paused)."""
        async with self.transaction() as session:
            return await session.scalar(select(RegistryPause.until).where(RegistryPause.name == registry)) or 0.0

    async def _execute(self, statement: Executable) -> None:
        async with self.transaction() as session:
            await session.execute(statement)


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


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    # WAL lets `georeg status` read while the receiver writes; busy_timeout waits instead of failing.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()
    # SQLAlchemy issues BEGIN itself (below), not the driver.
    connection.isolation_level = None


def _sqlite_begin_immediate(connection: Connection) -> None:
    # A transaction that reads and then writes cannot be upgraded while another connection writes
    # (SQLite answers "database is locked" at once, busy_timeout or not): take the write lock up front.
    connection.exec_driver_sql("BEGIN IMMEDIATE")
