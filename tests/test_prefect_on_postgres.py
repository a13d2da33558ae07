"""A real Prefect server on a real PostgreSQL database: the base for tests with several workers and receivers."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from prefect import flow
from prefect.runtime import flow_run

from tests.support.postgres import PostgresServer
from tests.support.services import REPOSITORY_ROOT, PrefectServer, clean_environment


@flow(name="georeg-postgres-smoke")
def smoke() -> str:
    """A trivial flow: returns its own flow run id so the test can look the run up."""
    return str(flow_run.id)


@dataclass
class PrefectOnPostgres:
    server: PrefectServer
    postgres: PostgresServer
    database: str


@pytest.fixture(scope="module")
def prefect_on_postgres(
    postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrefectOnPostgres]:
    database = f"prefect_{uuid.uuid4().hex[:8]}"
    postgres.create_database(database)
    home = tmp_path_factory.mktemp("prefect-on-postgres")
    with PrefectServer(home, database_url=postgres.url(database, driver="asyncpg")) as server:
        yield PrefectOnPostgres(server, postgres, database)


def test_the_server_answers_and_keeps_its_state_in_postgresql(prefect_on_postgres: PrefectOnPostgres):
    assert httpx.get(f"{prefect_on_postgres.server.api_url}/health", timeout=10).json() is True
    # The migrations ran against PostgreSQL, not a SQLite file in PREFECT_HOME.
    tables = prefect_on_postgres.postgres.psql(
        prefect_on_postgres.database, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
    ).split()
    assert {"flow", "flow_run", "task_run", "alembic_version"} <= set(tables)


def test_a_flow_run_is_recorded_completed_in_postgresql(prefect_on_postgres: PrefectOnPostgres, tmp_path):
    server = prefect_on_postgres.server
    environment = clean_environment(PREFECT_API_URL=server.api_url, PREFECT_HOME=str(tmp_path / "client-home"))
    done = subprocess.run(
        [sys.executable, "-c", f"from {__name__} import smoke; print('flow-run-id', smoke())"],
        cwd=REPOSITORY_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, f"the flow failed:\n{done.stdout}\n{done.stderr}"
    [flow_run_id] = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("flow-run-id ")]

    response = httpx.get(f"{server.api_url}/flow_runs/{flow_run_id}", timeout=10)
    assert response.status_code == 200 and response.json()["state_type"] == "COMPLETED"
    assert response.json()["flow_id"]
    recorded = prefect_on_postgres.postgres.psql(
        prefect_on_postgres.database, f"SELECT state_type FROM flow_run WHERE id = '{flow_run_id}'"
    )
    assert recorded.strip() == "COMPLETED"
