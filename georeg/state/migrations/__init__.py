"""The Alembic environment of georeg's state database, shipped inside the package and configured in
code (`georeg.state.schema.alembic_config`), so no alembic.ini is needed where georeg runs.

A schema change is a new file in `versions/`, `NNNN_what_changes.py` with `revision = "NNNN"` and
`down_revision` the previous head (`alembic.command.revision(alembic_config(), "what changes")` drafts
one from `script.py.mako`), and a new `georeg.state.schema.HEAD_REVISION`. tests/test_migrations.py
checks that the two agree and that the revisions build exactly the models' schema.
"""
