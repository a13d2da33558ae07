"""Retention: what the state database may forget, so that years of events and runs do not pile up.

- a journal event (`georeg_events`) whose work is done: no work row still owes it, as its latest
  (`sequence`) or as the one a running flow run started from (`dispatched_sequence`);
- a run record (`georeg_runs`) that has finished, except the latest of each kind and secondary,
  which `georeg status` shows as the last backfill or verification however old it is;

once older than `state.retention_days`. Rows go in batches of `batch_size`, each statement in a
transaction of its own, so a long-neglected database is cleaned in many short locks rather than one
that holds up the receiver for minutes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from sqlalchemy import Delete, delete, exists, func, or_, select

from georeg.state.database import Database
from georeg.state.journal import JournalEvent, WorkItem
from georeg.state.runs import RunRecord

logger = logging.getLogger("georeg.state")

BATCH_SIZE = 1000
DAY_SECONDS = 86_400.0
# How often `georeg serve` prunes: often enough that one pass is a few batches, rarely enough to cost nothing.
PRUNE_INTERVAL_SECONDS = 3600.0


@dataclass
class Pruned:
    """What one pass deleted; `batches` holds each statement's row count, in order."""

    events: int = 0
    runs: int = 0
    batches: list[int] = field(default_factory=list)


class Retention:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def prune(self, retention_days: float, *, batch_size: int = BATCH_SIZE, now: float | None = None) -> Pruned:
        """Delete done events and finished runs older than `retention_days`, `batch_size` rows a statement."""
        cutoff = (time.time() if now is None else now) - retention_days * DAY_SECONDS
        pruned = Pruned()
        pruned.events = await self._in_batches(self._done_events(cutoff, batch_size), batch_size, pruned)
        pruned.runs = await self._in_batches(self._finished_runs(cutoff, batch_size), batch_size, pruned)
        if pruned.events or pruned.runs:
            logger.info(
                "retention: deleted %d journal events and %d run records older than %g days",
                pruned.events,
                pruned.runs,
                retention_days,
            )
        return pruned

    async def prune_forever(self, retention_days: float, interval: float = PRUNE_INTERVAL_SECONDS) -> None:
        """Prune now and every `interval` seconds until cancelled; a failed pass is logged and retried later."""
        while True:
            try:
                await self.prune(retention_days)
            except Exception:  # housekeeping: a database hiccup must not stop the receiver
                logger.exception("retention: pruning the state database failed; trying again in %g s", interval)
            await asyncio.sleep(interval)

    async def _in_batches(self, statement: Delete, batch_size: int, pruned: Pruned) -> int:
        total = 0
        while True:
            async with self._db.transaction() as session:
                deleted = (await session.execute(statement)).rowcount
            pruned.batches.append(deleted)
            total += deleted
            if deleted < batch_size:
                return total

    @staticmethod
    def _done_events(cutoff: float, batch_size: int) -> Delete:
        event = JournalEvent.id
        owed = exists().where(or_(WorkItem.sequence == event, WorkItem.dispatched_sequence == event))
        # The oldest first, through the primary key: ids grow with received_at.
        batch = (
            select(JournalEvent.id)
            .where(JournalEvent.received_at < cutoff, ~owed)
            .order_by(JournalEvent.id)
            .limit(batch_size)
        )
        return delete(JournalEvent).where(JournalEvent.id.in_(batch.scalar_subquery()))

    @staticmethod
    def _finished_runs(cutoff: float, batch_size: int) -> Delete:
        latest = (
            select(func.max(RunRecord.id))
            .where(RunRecord.finished_at.is_not(None))
            .group_by(RunRecord.kind, RunRecord.secondary)
        )
        batch = (
            select(RunRecord.id)
            .where(RunRecord.finished_at.is_not(None), RunRecord.finished_at < cutoff, RunRecord.id.not_in(latest))
            .order_by(RunRecord.id)
            .limit(batch_size)
        )
        return delete(RunRecord).where(RunRecord.id.in_(batch.scalar_subquery()))
