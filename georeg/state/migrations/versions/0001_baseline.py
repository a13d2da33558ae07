"""Baseline: the schema georeg created with `Base.metadata.create_all` before it had migrations.

A database from before migrations holds these tables already (with their rows) and no
`alembic_version`; it is adopted as this revision. Each table is created only when it is missing, as
`create_all` did, so such a database keeps its rows and gains any table its georeg did not have yet.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())

    def create(name: str, *elements: sa.SchemaItem) -> bool:
        if name in existing:
            return False
        op.create_table(name, *elements)
        return True

    create(
        "georeg_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=255), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("repository", sa.String(length=255), nullable=False),
        sa.Column("reference", sa.String(length=255), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_id"),
    )
    create(
        "georeg_leases",
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("holder", sa.String(length=255), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    create(
        "georeg_pauses",
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("until", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    create(
        "georeg_repositories",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("secondary", sa.String(length=255), nullable=False),
        sa.Column("repository", sa.String(length=255), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("retry_count", sa.Integer(), nullable=False),
        sa.Column("retry_at", sa.Float(), nullable=True),
        sa.Column("last_synced_at", sa.Float(), nullable=True),
        sa.Column("last_failure", sa.Text(), nullable=True),
        sa.Column("verification", sa.String(length=16), nullable=True),
        sa.Column("verified_at", sa.Float(), nullable=True),
        sa.Column("verification_failure", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("secondary", "repository"),
    )
    create(
        "georeg_runs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("secondary", sa.String(length=255), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.Column("outcome", sa.String(length=32), nullable=True),
        sa.Column("summary", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    if create(
        "georeg_work",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("secondary", sa.String(length=255), nullable=False),
        sa.Column("repository", sa.String(length=255), nullable=False),
        sa.Column("reference", sa.String(length=255), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("dispatched_sequence", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.Float(), nullable=False),
        sa.Column("first_event_at", sa.Float(), nullable=False),
        sa.Column("flow_run_id", sa.String(length=64), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("secondary", "repository", "reference"),
    ):
        op.create_index("ix_georeg_work_due", "georeg_work", ["status", "next_attempt_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_georeg_work_due", table_name="georeg_work")
    for table in (
        "georeg_work",
        "georeg_runs",
        "georeg_repositories",
        "georeg_pauses",
        "georeg_leases",
        "georeg_events",
    ):
        op.drop_table(table)
