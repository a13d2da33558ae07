"""Sync state per (secondary, repository), like GitLab Geo's registry table: pending, started, synced
or failed, with a retry count that only grows until a success, and the last verification."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from sqlalchemy import Float, Index, Integer, String, Text, UniqueConstraint, delete, func, select
from sqlalchemy.orm import Mapped, mapped_column, undefer

from georeg.retries import backoff_delay
from georeg.state.database import ROWS_PER_STATEMENT, Base, Database

PENDING, STARTED, SYNCED, FAILED = "pending", "started", "synced", "failed"
VERIFIED, MISMATCH = "verified", "mismatch"


class RepositoryState(Base):
    __tablename__ = "georeg_repositories"
    __table_args__ = (
        UniqueConstraint("secondary", "repository"),
        # Status counts and the failing list read this index alone, not 10^5 rows.
        Index("ix_georeg_repositories_state", "secondary", "state", "verification", "updated_at"),
    )

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
    # The tag -> digest georeg last wrote (`georeg.tag_records`), loaded only where a backfill asks for it.
    written_tags: Mapped[str | None] = mapped_column(Text, nullable=True, deferred=True)
    checked_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # last HEAD of every secondary tag


class SyncStates:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def repository_states(self, secondary: str) -> dict[str, RepositoryState]:
        async with self._db.transaction() as session:
            rows = await session.scalars(select(RepositoryState).where(RepositoryState.secondary == secondary))
            return {row.repository: row for row in rows}

    async def deferred_repositories(self, secondary: str) -> set[str]:
        """The repositories that failed and whose retry time is still to come: a backfill skips them."""
        async with self._db.transaction() as session:
            names = await session.scalars(
                select(RepositoryState.repository).where(
                    RepositoryState.secondary == secondary,
                    RepositoryState.state == FAILED,
                    RepositoryState.retry_at > time.time(),
                )
            )
            return set(names)

    async def counts(self, secondary: str) -> tuple[Counter[str], Counter[str | None]]:
        """How many repositories are in each sync state, and in each verification state (None: never verified)."""
        async with self._db.transaction() as session:
            rows = await session.execute(
                select(RepositoryState.state, RepositoryState.verification, func.count())
                .where(RepositoryState.secondary == secondary)
                .group_by(RepositoryState.state, RepositoryState.verification)
            )
            states: Counter[str] = Counter()
            verifications: Counter[str | None] = Counter()
            for state, verification, count in rows.tuples():
                states[state] += count
                verifications[verification] += count
            return states, verifications

    async def latest_failures(self, secondary: str, limit: int) -> list[RepositoryState]:
        """The `limit` repositories that failed most recently."""
        async with self._db.transaction() as session:
            rows = await session.scalars(
                select(RepositoryState)
                .where(RepositoryState.secondary == secondary, RepositoryState.state == FAILED)
                .order_by(RepositoryState.updated_at.desc(), RepositoryState.repository)
                .limit(limit)
            )
            return list(rows)

    async def known_repositories(self, secondary: str) -> set[str]:
        async with self._db.transaction() as session:
            return set(
                await session.scalars(select(RepositoryState.repository).where(RepositoryState.secondary == secondary))
            )

    async def set_repository_state(self, secondary: str, repository: str, **values: object) -> None:
        """Create or update the row of (secondary, repository) with `values`."""
        await self.set_repository_states(secondary, [repository], **values)

    async def set_repository_states(
        self,
        secondary: str,
        repositories: Sequence[str],
        *,
        each: Mapping[str, Mapping[str, object]] | None = None,
        **values: object,
    ) -> None:
        """Create or update the rows of many repositories of `secondary` with the same `values`, a few
        hundred rows per statement in one transaction: a backfill records its repositories in bulk.

        `each`: columns of each repository's own (the same columns for all); a None keeps what the row has."""
        if not repositories:
            return
        now, each = time.time(), each or {}
        own = sorted({column for columns in each.values() for column in columns})
        insert = self._db.insert(RepositoryState)
        kept = {column: func.coalesce(insert.excluded[column], getattr(RepositoryState, column)) for column in own}
        upsert = insert.on_conflict_do_update(
            index_elements=["secondary", "repository"], set_={"updated_at": now, **values, **kept}
        )
        first = {"secondary": secondary, "updated_at": now, "state": PENDING, "retry_count": 0, **values}
        rows = [
            first | {"repository": repository} | {column: each.get(repository, {}).get(column) for column in own}
            for repository in repositories
        ]
        # One statement with many parameter sets: SQLAlchemy compiles it once and sends it in batches
        # of multi-row VALUES; a statement built with .values(rows) is compiled anew, row by row, each time.
        async with self._db.transaction() as session:
            await session.execute(upsert, rows)

    async def repositories_synced(
        self, secondary: str, repositories: Sequence[str], records: Mapping[str, Mapping[str, object]] | None = None
    ) -> None:
        """`records`: per repository, `written_tags` and `checked_at` (`georeg.tag_records.record_columns`)."""
        await self.set_repository_states(
            secondary,
            repositories,
            each=records,
            state=SYNCED,
            retry_count=0,
            retry_at=None,
            last_failure=None,
            last_synced_at=time.time(),
        )

    async def tag_records(
        self, secondary: str, repositories: Sequence[str]
    ) -> dict[str, tuple[str | None, float | None]]:
        """repository -> (written_tags, checked_at) of those `repositories` that have a row, a few
        hundred a query: a backfill loads the records of all its repositories at once."""
        found: dict[str, tuple[str | None, float | None]] = {}
        async with self._db.transaction() as session:
            for start in range(0, len(repositories), ROWS_PER_STATEMENT):
                rows = await session.execute(
                    select(RepositoryState.repository, RepositoryState.written_tags, RepositoryState.checked_at).where(
                        RepositoryState.secondary == secondary,
                        RepositoryState.repository.in_(repositories[start : start + ROWS_PER_STATEMENT]),
                    )
                )
                found.update((repository, (written, checked)) for repository, written, checked in rows)
        return found

    async def update_tag_record(
        self, secondary: str, repository: str, change: Callable[[str | None], str | None]
    ) -> None:
        """Replace the repository's `written_tags` with `change(written_tags)`, the row locked meanwhile
        (an event flow and a backfill may both write it). No row: nothing to change."""
        async with self._db.transaction() as session:
            row = await session.scalar(
                select(RepositoryState)
                .where(RepositoryState.secondary == secondary, RepositoryState.repository == repository)
                .options(undefer(RepositoryState.written_tags))
                .with_for_update()
            )
            if row is not None:
                row.written_tags = change(row.written_tags)

    async def repository_failed(
        self, secondary: str, repository: str, failure: str, *, base: float, cap: float
    ) -> RepositoryState:
        """Count one more failure and schedule the retry (exponential backoff with jitter, capped)."""
        now = time.time()
        async with self._db.transaction() as session:
            # Create the row if need be first (concurrent failures of a new repository must not both
            # insert it), then lock it so every failure counts.
            await session.execute(
                self._db.insert(RepositoryState)
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
            row.retry_at = now + backoff_delay(row.retry_count, base=base, cap=cap)
            row.state, row.last_failure, row.updated_at = FAILED, failure[:2000], now
            row.written_tags = None  # what a failure left on the secondary is not known: HEADs will tell
            return row

    async def repository_verified(self, secondary: str, repository: str, failure: str | None) -> None:
        """Record a verification; a mismatch also sends the repository back to pending for a resync."""
        values: dict[str, object] = {
            "verification": MISMATCH if failure else VERIFIED,
            "verified_at": time.time(),
            "verification_failure": failure,
        }
        if failure:
            # The record says otherwise than the secondary: the next backfill HEADs every tag instead.
            values.update(state=PENDING, retry_at=None, written_tags=None)
        await self.set_repository_state(secondary, repository, **values)

    async def forget_repositories(self, secondary: str, repositories: Sequence[str]) -> None:
        async with self._db.transaction() as session:
            for start in range(0, len(repositories), ROWS_PER_STATEMENT):
                await session.execute(
                    delete(RepositoryState).where(
                        RepositoryState.secondary == secondary,
                        RepositoryState.repository.in_(repositories[start : start + ROWS_PER_STATEMENT]),
                    )
                )


class SyncRecorder:
    """Records a backfill's outcomes: a failure at once (it counts a retry and schedules the next
    attempt), successes a second's worth at a time in one statement, as a no-op backfill finishes
    hundreds of repositories a second and one transaction each would cost more than their HEADs."""

    INTERVAL_S = 1.0

    def __init__(self, states: SyncStates, secondary: str, *, backoff_base: float, backoff_cap: float) -> None:
        self._states, self._secondary = states, secondary
        self._backoff_base, self._backoff_cap = backoff_base, backoff_cap
        self._synced: list[str] = []
        self._records: dict[str, Mapping[str, object]] = {}
        self._flushed_at = time.monotonic()

    async def failed(self, repository: str, failure: str) -> None:
        await self._states.repository_failed(
            self._secondary, repository, failure, base=self._backoff_base, cap=self._backoff_cap
        )

    async def synced(self, repository: str, record: Mapping[str, object] | None = None) -> None:
        """`record`: the repository's `written_tags` and `checked_at` columns, when the pass learned them."""
        self._synced.append(repository)
        if record is not None:
            self._records[repository] = record
        if time.monotonic() - self._flushed_at >= self.INTERVAL_S:
            await self.flush()

    async def flush(self) -> None:
        self._flushed_at = time.monotonic()
        batch, self._synced = self._synced, []
        records, self._records = self._records, {}
        if batch:
            await self._states.repositories_synced(self._secondary, batch, records)
