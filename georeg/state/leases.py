"""Leases: a named claim with an expiry, held by one run at a time and renewed while it lives.

A backfill holds `backfill:<secondary>` so that two backfills of one secondary never overlap; a batch
flow run holds one so that the backfill waiting for it can tell a live worker from a dead one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from sqlalchemy import Float, String, delete
from sqlalchemy.orm import Mapped, mapped_column

from georeg.state.database import Base, Database


class Lease(Base):
    __tablename__ = "georeg_leases"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[float] = mapped_column(Float)


class Leases:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def acquire(self, name: str, holder: str, ttl: float) -> str | None:
        """Take the lease `name` for `ttl` seconds (or renew it); None if someone else holds it."""
        now = time.time()
        async with self._db.transaction() as session:
            # A new lease is inserted in one statement: of two takers at once, the second one waits, inserts
            # nothing and sees the first one's lease below (a "get, then add" raced into a duplicate key).
            created = await session.scalar(
                self._db.insert(Lease)
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

    async def holder(self, name: str) -> str | None:
        """Who holds the lease now (None when nobody does or it ran out)."""
        async with self._db.transaction() as session:
            lease = await session.get(Lease, name)
            return lease.holder if lease is not None and lease.expires_at > time.time() else None

    async def release(self, name: str, holder: str) -> None:
        await self._db.execute(delete(Lease).where(Lease.name == name, Lease.holder == holder))

    @contextlib.asynccontextmanager
    async def renewed(self, name: str, holder: str, ttl: float) -> AsyncIterator[None]:
        """Renew a lease already taken every third of its `ttl` while the block runs."""

        async def renew() -> None:
            while True:
                await asyncio.sleep(ttl / 3)
                await self.acquire(name, holder, ttl)

        renewing = asyncio.create_task(renew())
        try:
            yield
        finally:
            renewing.cancel()
