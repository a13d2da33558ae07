"""georeg's record of what it wrote to each secondary repository, for no-op backfills that ask no HEADs.

`written_tags`: the tag -> digest georeg last wrote (JSON), trusted while the secondary's tag list
matches it; `checked_at`: when the secondary's tags were last checked one HEAD each.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Like the baseline, only what is missing: a database adopted from before migrations was made by
    # `create_all` of whichever georeg made it, which may have had these columns already.
    existing = {column["name"] for column in sa.inspect(op.get_bind()).get_columns("georeg_repositories")}
    with op.batch_alter_table("georeg_repositories") as table:
        if "written_tags" not in existing:
            table.add_column(sa.Column("written_tags", sa.Text(), nullable=True))
        if "checked_at" not in existing:
            table.add_column(sa.Column("checked_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("georeg_repositories") as table:
        table.drop_column("checked_at")
        table.drop_column("written_tags")
