"""The state database's schema: which Alembic revision it is at, and bringing it to this georeg's.

Every process checks the schema when it opens the state database (`ensure_schema`). An up-to-date
database costs one query, `SELECT version_num FROM alembic_version`, compared with `HEAD_REVISION`;
Alembic is imported, and its scripts read, only when the answer differs. Then, under a lock that
keeps concurrent starts apart (PostgreSQL: an advisory lock; SQLite: `BEGIN IMMEDIATE`, the write
lock), the revision is read again and:

- an older database (or a new, empty one) is upgraded, unless `state.migrate_on_start` is false;
- a database from before migrations (georeg's tables, no `alembic_version`) is adopted as the
  baseline, its rows kept, then upgraded;
- a database at a revision this georeg does not know (a newer georeg migrated it) is refused.

Alembic is imported inside the functions of that slow path on purpose: its import costs about 0.3 s
(with SQLAlchemy already loaded), which every flow run would otherwise pay to learn nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy import text
from sqlalchemy.exc import OperationalError, ProgrammingError

from georeg.errors import StateSchemaError
from georeg.state.database import Database

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.engine import Connection

logger = logging.getLogger("georeg.state")
T = TypeVar("T")

# The newest revision in migrations/versions/, so that the start-up check needs no script loading
# (tests/test_migrations.py fails when a revision is added without moving this).
HEAD_REVISION = "0003"
BASELINE_REVISION = "0001"
MIGRATIONS = Path(__file__).parent / "migrations"
# pg_advisory_xact_lock's key: any constant bigint that nothing else on the database uses ("georegdb").
_ADVISORY_LOCK_KEY = int.from_bytes(b"georegdb", "big") & 0x7FFF_FFFF_FFFF_FFFF
_GEOREG_TABLE = "georeg_events"  # present in every georeg database, from before migrations on


@dataclass(frozen=True)
class SchemaState:
    """Where a state database stands against this georeg's migrations."""

    current: tuple[str, ...]  # the revisions in alembic_version: () when there is none
    head: str
    unknown: tuple[str, ...]  # revisions of `current` this georeg's scripts do not have: a newer georeg's
    legacy: bool  # georeg's tables without alembic_version: made before georeg had migrations

    @property
    def up_to_date(self) -> bool:
        return self.current == (self.head,)

    def describe(self) -> str:
        if self.unknown:
            return f"{', '.join(self.current)} (newer than this georeg, whose newest revision is {self.head})"
        if self.up_to_date:
            return f"{self.head} (head: up to date)"
        if self.legacy:
            return f"none: made before georeg had migrations (baseline {BASELINE_REVISION}); head is {self.head}"
        if not self.current:
            return f"none: no georeg schema yet; head is {self.head}"
        return f"{', '.join(self.current)} (older; head is {self.head})"


def alembic_config() -> Config:
    """Alembic's configuration, in code: the scripts inside the package, no alembic.ini."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


async def ensure_schema(database: Database, *, migrate: bool) -> None:
    """Make sure the database is at this georeg's schema, upgrading it when `migrate` allows.

    Raises StateSchemaError for a database newer than this georeg, or older when `migrate` is false.
    """
    if await _stored_revisions(database) == (HEAD_REVISION,):
        return
    await _under_lock(database, lambda connection: _bring_up_to_date(connection, database, migrate))


async def upgrade(database: Database) -> tuple[SchemaState, SchemaState]:
    """`georeg db upgrade`: the state before and after upgrading to the head."""
    return await _under_lock(database, lambda connection: _upgrade(connection, database))


async def current(database: Database) -> SchemaState:
    """`georeg db current`: where the database stands (reads only)."""
    async with database.engine.connect() as connection:
        return await connection.run_sync(_inspect)


async def _stored_revisions(database: Database) -> tuple[str, ...] | None:
    """The revisions in alembic_version, in one query; None when there is no such table (or no answer)."""
    try:
        async with database.engine.connect() as connection:
            result = await connection.execute(text("SELECT version_num FROM alembic_version"))
            return tuple(sorted(row[0] for row in result))
    except (OperationalError, ProgrammingError):
        # A missing table (a new or pre-migration database): the locked path finds out which. Were the
        # database unreachable, the locked path fails again with the same error, raised from there.
        return None


async def _under_lock(database: Database, work: Callable[[Connection], T]) -> T:
    """Run `work(sync_connection)` in one transaction that no other georeg process's schema work overlaps."""
    # SQLite: the engine begins every transaction with BEGIN IMMEDIATE (georeg.state.database), so
    # this one holds the write lock from the start and a concurrent start waits for it (busy_timeout).
    async with database.engine.begin() as connection:
        if database.dialect == "postgresql":
            # Released with the transaction: after the winner's commit, the next one sees its schema.
            await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK_KEY})
        return await connection.run_sync(work)


def _inspect(connection: Connection) -> SchemaState:
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import inspect

    script = ScriptDirectory.from_config(alembic_config())
    known = {revision.revision for revision in script.walk_revisions()}
    current = tuple(sorted(MigrationContext.configure(connection).get_current_heads()))
    legacy = not current and inspect(connection).has_table(_GEOREG_TABLE)
    return SchemaState(
        current=current,
        head=script.get_current_head() or "",
        unknown=tuple(revision for revision in current if revision not in known),
        legacy=legacy,
    )


def _bring_up_to_date(connection: Connection, database: Database, migrate: bool) -> None:
    state = _inspect(connection)
    _refuse_newer(state, database)
    if state.up_to_date:
        return  # another process upgraded it while this one waited for the lock
    if not migrate:
        raise StateSchemaError(
            f"the state database ({_where(database)}) is at schema revision {state.describe()}, and "
            "state.migrate_on_start is false: back the database up, then run `georeg db upgrade`"
        )
    _run_upgrade(connection, state, database)


def _upgrade(connection: Connection, database: Database) -> tuple[SchemaState, SchemaState]:
    before = _inspect(connection)
    _refuse_newer(before, database)
    if not before.up_to_date:
        _run_upgrade(connection, before, database)
    return before, _inspect(connection)


def _run_upgrade(connection: Connection, state: SchemaState, database: Database) -> None:
    from alembic import command

    if state.legacy:
        logger.info("the state database (%s) predates migrations: adopting it as the baseline", _where(database))
    config = alembic_config()
    config.attributes["connection"] = connection  # env.py migrates on it, inside this transaction
    command.upgrade(config, "head")
    logger.info("upgraded the state database (%s) from %s to %s", _where(database), state.current, state.head)


def _refuse_newer(state: SchemaState, database: Database) -> None:
    if state.unknown:
        raise StateSchemaError(
            f"the state database ({_where(database)}) is at schema revision {', '.join(state.unknown)}, which this "
            f"georeg does not know (its newest is {state.head}): a newer georeg has migrated it. Upgrade georeg to "
            "that version (or restore the database from the backup taken before that upgrade)"
        )


def _where(database: Database) -> str:
    return database.engine.url.render_as_string(hide_password=True)
