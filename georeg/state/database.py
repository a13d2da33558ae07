"""The state database itself: the engine, short transactions, and the SQL that differs by dialect.

`state.url` is SQLite by default and PostgreSQL by URL; both through the async drivers Prefect already
installs. Every table of georeg derives from `Base`, so one `Base.metadata` describes the schema; the
migrations in `migrations/` build it (`georeg.state.schema`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.sql import Executable

from georeg.errors import ConfigError

# Rows per multi-row INSERT: well under SQLite's 32,766 and PostgreSQL's 65,535 bound parameters.
ROWS_PER_STATEMENT = 500


class Base(DeclarativeBase):
    pass


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


class Database:
    """One engine per process, short transactions, safe for several processes."""

    def __init__(self, url: str) -> None:
        self.engine: AsyncEngine = create_async_engine(database_url(url))
        self.dialect = self.engine.dialect.name
        if self.dialect == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
            event.listen(self.engine.sync_engine, "begin", _sqlite_begin_immediate)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    async def close(self) -> None:
        await self.engine.dispose()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        async with self._sessions() as session, session.begin():
            yield session

    async def execute(self, statement: Executable) -> None:
        """One statement in a transaction of its own."""
        async with self.transaction() as session:
            await session.execute(statement)

    def insert(self, table: type[Base]) -> Any:
        """The dialect's INSERT, which has on_conflict_do_update / on_conflict_do_nothing."""
        return (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(table)


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
