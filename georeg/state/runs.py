"""Run records: when each backfill and verification of a secondary started and ended, and its
summary, for `georeg status` and for a fanned-out backfill to add up its batches."""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import Float, Integer, String, Text, select, update
from sqlalchemy.orm import Mapped, mapped_column

from georeg.state.database import Base, Database


class RunRecord(Base):
    __tablename__ = "georeg_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))  # backfill, backfill-batch or verify
    secondary: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(32), nullable=True)
    summary: Mapped[str | None] = mapped_column(Text, nullable=True)


class Runs:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def started(self, kind: str, secondary: str) -> int:
        async with self._db.transaction() as session:
            record = RunRecord(kind=kind, secondary=secondary, started_at=time.time())
            session.add(record)
            await session.flush()
            return record.id

    async def finished(self, run_id: int, outcome: str, summary: dict[str, Any]) -> None:
        await self._db.execute(
            update(RunRecord)
            .where(RunRecord.id == run_id)
            .values(finished_at=time.time(), outcome=outcome, summary=json.dumps(summary))
        )

    async def last(self, kind: str, secondary: str) -> RunRecord | None:
        """The latest finished run of `kind` for `secondary`."""
        async with self._db.transaction() as session:
            return await session.scalar(
                select(RunRecord)
                .where(RunRecord.kind == kind, RunRecord.secondary == secondary, RunRecord.finished_at.is_not(None))
                .order_by(RunRecord.id.desc())
                .limit(1)
            )

    async def summaries(self, kind: str, secondary: str, limit: int = 10_000) -> list[dict[str, Any]]:
        """The recorded summaries of the latest finished runs of `kind` for `secondary`, newest first."""
        async with self._db.transaction() as session:
            rows = await session.scalars(
                select(RunRecord.summary)
                .where(RunRecord.kind == kind, RunRecord.secondary == secondary, RunRecord.finished_at.is_not(None))
                .order_by(RunRecord.id.desc())
                .limit(limit)
            )
            return [json.loads(summary or "{}") for summary in rows]
