"""Alembic's environment script: run by `alembic.command` with the connection georeg hands it.

georeg's processes migrate on an async engine; `georeg.state.schema` opens the transaction (and takes
the lock that keeps concurrent starts apart), then calls Alembic inside `AsyncConnection.run_sync`,
passing the synchronous connection as `config.attributes["connection"]`. Migrations therefore run in
the caller's transaction: on PostgreSQL and SQLite alike, DDL is transactional, so a failed upgrade
leaves the database as it was.
"""

from __future__ import annotations

from alembic import context

import georeg.state  # noqa: F401  (every model module, so Base.metadata is the whole schema)
from georeg.state.database import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("georeg's migrations run on a connection georeg provides (see georeg.state.schema)")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things in place; batch mode copies the table, so later revisions can.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
