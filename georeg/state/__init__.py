"""georeg's durable state (`state.url`: SQLite by default, PostgreSQL by URL), one module per job:

- `journal`: every accepted registry event, and the work each still owes a secondary;
- `sync`: the sync state per (secondary, repository), like GitLab Geo's registry table;
- `leases`: who holds a backfill of a secondary, or a batch of one;
- `runs`: records of backfills and verifications, for `georeg status`;
- `pauses`: a registry's "retry after", shared by every worker;
- `retention`: forgetting done events and finished runs once they are old (`state.retention_days`);
- `schema`: the Alembic migrations that bring a database to this georeg's schema.

`StateStore` opens the database once and hands out each part; `ensure_schema()` before first use.
"""

from __future__ import annotations

from georeg.state.database import Base, Database, database_url
from georeg.state.journal import Claim, Journal
from georeg.state.leases import Leases
from georeg.state.pauses import Pauses
from georeg.state.retention import Retention
from georeg.state.runs import RunRecord, Runs
from georeg.state.schema import ensure_schema
from georeg.state.sync import RepositoryState, SyncStates

__all__ = ["Base", "Claim", "RepositoryState", "RunRecord", "StateStore", "database_url"]


class StateStore:
    """The state database: one engine per process, short transactions, safe for several processes."""

    def __init__(self, url: str) -> None:
        self.database = Database(url)
        self.journal = Journal(self.database)
        self.sync = SyncStates(self.database)
        self.leases = Leases(self.database)
        self.runs = Runs(self.database)
        self.pauses = Pauses(self.database)
        self.retention = Retention(self.database)

    async def ensure_schema(self, *, migrate: bool = True) -> None:
        """Bring the database to this georeg's schema (one query when it is there already).

        With `migrate` false (`state.migrate_on_start: false`), an older database is refused instead,
        leaving the upgrade to `georeg db upgrade`; a newer one is refused either way.
        """
        await ensure_schema(self.database, migrate=migrate)

    async def close(self) -> None:
        await self.database.close()
