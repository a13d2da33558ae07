"""An index for the sync status: counts per state and the failing repositories, read from the index
instead of every repository's row (seconds at 10^5 repositories).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database adopted at the baseline may have been made by a create_all that had the index already.
    existing = {index["name"] for index in sa.inspect(op.get_bind()).get_indexes("georeg_repositories")}
    if "ix_georeg_repositories_state" in existing:
        return
    op.create_index(
        "ix_georeg_repositories_state",
        "georeg_repositories",
        ["secondary", "state", "verification", "updated_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_georeg_repositories_state", table_name="georeg_repositories")
