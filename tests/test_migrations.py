"""The state database's migrations on a real SQLite file and a real PostgreSQL database: they build
exactly the models' schema, adopt a database from before migrations with its rows, keep concurrent
starts apart, refuse a newer database, and leave an older one to `georeg db upgrade` when told to."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from georeg.config import parse_config
from georeg.errors import StateSchemaError
from georeg.events import REPLICATE, AcceptedEvent
from georeg.receiver import create_app
from georeg.state import Base, StateStore
from georeg.state.database import Database
from georeg.state.schema import HEAD_REVISION, alembic_config, current
from georeg.state.sync import FAILED
from tests.support.services import wait_until

PROCESS_TIMEOUT_S = 120


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """`state.url` of a new, empty database; PostgreSQL is started only when a test asks for it."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'state.db'}"


async def on_connection(url: str, work: Callable[[Connection], Any]) -> Any:
    """`work(connection)` in a transaction of its own, on an engine of its own (not a StateStore's)."""
    database = Database(url)
    try:
        async with database.engine.begin() as connection:
            return await connection.run_sync(work)
    finally:
        await database.close()


async def schema_differences(url: str) -> list[Any]:
    """What `alembic check` would report: differences between the database and the models."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    def compare(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)

    return await on_connection(url, compare)


async def versions(url: str) -> list[str] | None:
    """The revisions in alembic_version; None when the database has no such table."""

    def read(connection: Connection) -> list[str] | None:
        if not inspect(connection).has_table("alembic_version"):
            return None
        return [row[0] for row in connection.execute(text("SELECT version_num FROM alembic_version"))]

    return await on_connection(url, read)


async def make_legacy_database(url: str, *, without: tuple[str, ...] = ()) -> None:
    """A database as georeg made it before migrations: `Base.metadata.create_all`, no alembic_version."""
    tables = [table for name, table in Base.metadata.tables.items() if name not in without]
    await on_connection(url, lambda connection: Base.metadata.create_all(connection, tables=tables))


async def fill(store: StateStore) -> None:
    """A row in each of the tables a pre-migration georeg wrote."""
    await store.journal.record_events([AcceptedEvent("kept-event", REPLICATE, "group/app", "1.0")], ["east"])
    await store.sync.repository_failed("east", "group/app", "boom", base=1, cap=10)
    run_id = await store.runs.started("backfill", "east")
    await store.runs.finished(run_id, "completed", {"repositories": 1})
    await store.leases.acquire("backfill:east", "someone", 600)


def test_the_head_revision_constant_is_the_scripts_head():
    """The start-up check compares with HEAD_REVISION instead of reading the scripts: they must agree."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    assert script.get_heads() == [HEAD_REVISION]


async def test_the_migrations_build_exactly_the_models_schema(url: str):
    store = StateStore(url)
    try:
        await store.ensure_schema()
    finally:
        await store.close()

    assert await schema_differences(url) == []
    assert await versions(url) == [HEAD_REVISION]


async def test_a_database_from_before_migrations_is_adopted_with_its_rows(url: str):
    # An older georeg's create_all, before it had the pauses table: the upgrade adds what is missing.
    await make_legacy_database(url, without=("georeg_pauses",))
    old = StateStore(url)
    try:
        await fill(old)
    finally:
        await old.close()
    assert await schema_differences(url) != []  # the missing table, and no alembic_version

    store = StateStore(url)
    try:
        assert (await current(store.database)).legacy
        await store.ensure_schema()

        assert await versions(url) == [HEAD_REVISION]
        assert await schema_differences(url) == []
        [claim] = await store.journal.claim_due(10)
        assert (claim.secondary, claim.repository, claim.reference) == ("east", "group/app", "1.0")
        states = await store.sync.repository_states("east")
        assert (states["group/app"].state, states["group/app"].last_failure) == (FAILED, "boom")
        assert (await store.runs.last("backfill", "east")).outcome == "completed"  # type: ignore[union-attr]
        assert await store.leases.holder("backfill:east") == "someone"
        await store.pauses.pause("georeg-pause-registry-443", 5.0)  # the table it gained works
        assert await store.pauses.paused_until("georeg-pause-registry-443") == 5.0
    finally:
        await store.close()


async def test_a_database_at_the_baseline_gains_the_tag_records_with_its_rows_kept(url: str):
    from alembic import command

    def to_baseline(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        connection.execute(
            text(
                "INSERT INTO georeg_repositories (secondary, repository, state, retry_count, updated_at)"
                " VALUES ('east', 'group/app', 'synced', 0, 1.0)"
            )
        )

    await on_connection(url, to_baseline)
    store = StateStore(url)
    try:
        await store.ensure_schema()
        assert await versions(url) == [HEAD_REVISION] and await schema_differences(url) == []
        assert await store.sync.tag_records("east", ["group/app"]) == {"group/app": (None, None)}
        await store.sync.repositories_synced(
            "east", ["group/app"], {"group/app": {"written_tags": "{}", "checked_at": 2.0}}
        )
        assert await store.sync.tag_records("east", ["group/app"]) == {"group/app": ("{}", 2.0)}
    finally:
        await store.close()


async def test_an_up_to_date_database_costs_one_query_and_no_alembic(url: str):
    store = StateStore(url)
    try:
        await store.ensure_schema()
    finally:
        await store.close()
    probe = (
        "import asyncio, json, sys\n"
        "from sqlalchemy import event\n"
        "from sqlalchemy.engine import Engine\n"
        "from georeg.state import StateStore\n"
        "statements = []\n"
        "event.listen(Engine, 'before_cursor_execute', lambda c, cur, sql, *rest: statements.append(sql))\n"
        "async def main():\n"
        "    store = StateStore(sys.argv[1])\n"
        "    await store.ensure_schema()\n"
        "    await store.close()\n"
        "asyncio.run(main())\n"
        "print(json.dumps({'alembic': 'alembic' in sys.modules, 'statements': statements}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, url], capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S, check=True
    )
    report = json.loads(done.stdout)

    assert report["alembic"] is False
    # BEGIN IMMEDIATE is SQLite's transaction; PostgreSQL's first connection asks about the server.
    schema_statements = [sql for sql in report["statements"] if "georeg" in sql or "alembic" in sql]
    assert schema_statements == ["SELECT version_num FROM alembic_version"]


async def test_stores_starting_at_once_on_a_new_database_agree_on_one_schema(url: str):
    stores = [StateStore(url) for _ in range(6)]
    try:
        await asyncio.gather(*(store.ensure_schema() for store in stores))
        # Every one of them works on it.
        for number, store in enumerate(stores):
            await store.journal.record_events([AcceptedEvent(f"e{number}", REPLICATE, "group/app", "1.0")], ["east"])
        assert await stores[0].journal.depth() == 1
    finally:
        for store in stores:
            await store.close()
    assert await versions(url) == [HEAD_REVISION]
    assert await schema_differences(url) == []


async def test_processes_starting_at_once_on_a_new_database_agree_on_one_schema(url: str, tmp_path: Path):
    """Several processes, released together once all have imported georeg, migrate one new database."""
    go = tmp_path / "go"
    starter = (
        "import asyncio, pathlib, sys, time\n"
        "from georeg.events import REPLICATE, AcceptedEvent\n"
        "from georeg.state import StateStore\n"
        "go = pathlib.Path(sys.argv[2])\n"
        "pathlib.Path(sys.argv[3]).touch()\n"
        "while not go.exists():\n"
        "    time.sleep(0.005)\n"
        "async def main():\n"
        "    store = StateStore(sys.argv[1])\n"
        "    await store.ensure_schema()\n"
        "    event = AcceptedEvent('event-' + sys.argv[4], REPLICATE, 'group/app', sys.argv[4])\n"
        "    assert await store.journal.record_events([event], ['east']) == 1\n"
        "    await store.close()\n"
        "asyncio.run(main())\n"
    )
    count = 5
    ready = [tmp_path / f"ready-{number}" for number in range(count)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", starter, url, str(go), str(ready[number]), str(number)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for number in range(count)
    ]
    try:
        wait_until(lambda: all(path.exists() for path in ready), deadline=PROCESS_TIMEOUT_S, what="every starter")
        go.touch()
        outcomes = [process.communicate(timeout=PROCESS_TIMEOUT_S) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert [process.returncode for process in processes] == [0] * count, [err for _, err in outcomes]
    assert await versions(url) == [HEAD_REVISION]
    assert await schema_differences(url) == []
    count_events = await on_connection(url, lambda c: c.execute(text("SELECT count(*) FROM georeg_events")).scalar())
    assert count_events == count


@pytest.mark.parametrize("migrate", [True, False])
async def test_a_database_newer_than_this_georeg_is_refused(url: str, migrate: bool):
    store = StateStore(url)
    try:
        await store.ensure_schema()
        await on_connection(url, lambda c: c.execute(text("UPDATE alembic_version SET version_num = '9999'")))

        with pytest.raises(StateSchemaError) as refused:
            await store.ensure_schema(migrate=migrate)
    finally:
        await store.close()
    assert "revision 9999, which this georeg does not know" in str(refused.value)
    assert "Upgrade georeg to that version" in str(refused.value)
    assert await versions(url) == ["9999"]  # left as it was


async def test_serve_refuses_an_old_database_when_migrate_on_start_is_false(url: str, tmp_path: Path):
    await make_legacy_database(url)
    config = parse_config(
        {
            "primary": {"url": "http://127.0.0.1:1"},
            "secondaries": [{"name": "east", "url": "http://127.0.0.1:2"}],
            "notifications": {"secret": "s"},
            "state": {"url": url, "migrate_on_start": False},
        },
        base_dir=tmp_path,
    )
    store = StateStore(config.state.url)
    app = create_app(config, store, dispatch=False)
    try:
        with pytest.raises(StateSchemaError, match=r"state\.migrate_on_start is false: .* run `georeg db upgrade`"):
            async with app.router.lifespan_context(app):
                pass
    finally:
        await store.close()
    assert await versions(url) is None  # nothing was changed


def georeg(*arguments: str) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    return subprocess.run(
        [sys.executable, "-m", "georeg.cli", *arguments],
        capture_output=True,
        text=True,
        env=environment,
        timeout=PROCESS_TIMEOUT_S,
    )


async def test_with_migrate_on_start_false_an_old_database_waits_for_georeg_db_upgrade(url: str, tmp_path: Path):
    await make_legacy_database(url)
    old = StateStore(url)
    try:
        await fill(old)
    finally:
        await old.close()
    config = tmp_path / "georeg.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "primary": {"url": "http://127.0.0.1:1"},
                "secondaries": [{"name": "east", "url": "http://127.0.0.1:2"}],
                "state": {"url": url, "migrate_on_start": False},
            }
        )
    )

    refused = georeg("--config", str(config), "status", "--json")
    assert refused.returncode == 1
    assert "state.migrate_on_start is false: back the database up, then run `georeg db upgrade`" in refused.stderr
    before = georeg("--config", str(config), "db", "current")
    assert (
        before.stdout.strip()
        == f"state database: none: made before georeg had migrations (baseline 0001); head is {HEAD_REVISION}"
    )

    upgraded = georeg("--config", str(config), "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout.strip().startswith("state database: upgraded from none: made before georeg had migrations")

    after = georeg("--config", str(config), "db", "current")
    assert after.stdout.strip() == f"state database: {HEAD_REVISION} (head: up to date)"
    again = georeg("--config", str(config), "db", "upgrade")
    assert again.stdout.strip() == f"state database: already at {HEAD_REVISION}, nothing to do"
    status = georeg("--config", str(config), "status", "--json")
    assert status.returncode == 0, status.stderr
    [east] = json.loads(status.stdout)["secondaries"]
    assert east["repositories"]["failed"] == 1  # the row from before the upgrade


async def test_georeg_db_current_names_a_newer_database(url: str, tmp_path: Path):
    await on_connection(
        url,
        lambda c: [
            c.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")),
            c.execute(text("INSERT INTO alembic_version VALUES ('9999')")),
        ],
    )
    config = tmp_path / "georeg.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "primary": {"url": "http://127.0.0.1:1"},
                "secondaries": [{"name": "east", "url": "http://127.0.0.1:2"}],
                "state": {"url": url},
            }
        )
    )

    shown = georeg("--config", str(config), "db", "current")
    upgrade = georeg("--config", str(config), "db", "upgrade")

    assert (
        shown.stdout.strip()
        == f"state database: 9999 (newer than this georeg, whose newest revision is {HEAD_REVISION})"
    )
    assert upgrade.returncode == 1
    assert "georeg: db upgrade failed: the state database" in upgrade.stderr
    assert "which this georeg does not know" in upgrade.stderr
