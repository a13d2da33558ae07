"""Shared fixtures: real registries (open and token-auth) and a unique repository per test."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.emulators import BUCKET, Azurite, GcsEmulator, MotoServer, SwiftNode
from tests.support.oss_standin import OssStandIn
from tests.support.postgres import PostgresServer
from tests.support.registry import RegistryProcess, TokenAuthSetup, make_token_auth_setup


@dataclass
class RegistryPair:
    """A primary and a secondary registry; token_setup is set when both require bearer tokens."""

    primary: RegistryProcess
    secondary: RegistryProcess
    token_setup: TokenAuthSetup | None


@pytest.fixture(scope="session")
def registry_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryPair]:
    """Two open registries for the whole session; tests isolate themselves by repository name."""
    with (
        RegistryProcess(tmp_path_factory.mktemp("primary")) as primary,
        RegistryProcess(tmp_path_factory.mktemp("secondary")) as secondary,
    ):
        yield RegistryPair(primary, secondary, None)


@pytest.fixture(scope="session")
def token_registry_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryPair]:
    """Two token-auth registries trusting one key pair, as GitLab Geo shares gitlab-registry.key."""
    setup = make_token_auth_setup(tmp_path_factory.mktemp("token-keys"))
    with (
        RegistryProcess(tmp_path_factory.mktemp("token-primary"), token_auth=setup) as primary,
        RegistryProcess(tmp_path_factory.mktemp("token-secondary"), token_auth=setup) as secondary,
    ):
        yield RegistryPair(primary, secondary, setup)


@pytest.fixture
def repo_name(request: pytest.FixtureRequest) -> str:
    """A repository name unique to this test, valid under the distribution name grammar."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:30].strip("-") or "t"
    return f"test/{slug}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def prefect_api_url() -> Iterator[str]:
    """A real Prefect API server (a subprocess on a temporary SQLite database) for flow tests."""
    from prefect.settings import get_current_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(get_current_settings().api.url)


def jwt_auth(setup: TokenAuthSetup) -> dict[str, Any]:
    """The `auth:` block for a registry trusting `setup`'s key pair."""
    return {"type": "jwt", "key_file": str(setup.key_path), "issuer": setup.issuer, "service": setup.service}


WriteConfig = Callable[..., Path]


@pytest.fixture
def write_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> WriteConfig:
    """Write a georeg.yaml for the given registry URLs and point $GEOREG_CONFIG at it."""

    def write(
        primary_url: str,
        *secondary_urls: str,
        token_setup: TokenAuthSetup | None = None,
        replication: dict[str, Any] | None = None,
        **extra: Any,
    ) -> Path:
        auth = jwt_auth(token_setup) if token_setup else {"type": "none"}
        config: dict[str, Any] = {
            "primary": {"url": primary_url, "auth": auth},
            "secondaries": [
                {"name": f"secondary{index}" if index else "secondary", "url": url, "auth": auth}
                for index, url in enumerate(secondary_urls)
            ],
            "replication": {"retry_delay_seconds": 0.1, **(replication or {})},
            "state": {"url": f"sqlite:///{tmp_path / 'georeg.db'}"},
            **extra,
        }
        path = tmp_path / "georeg.yaml"
        path.write_text(yaml.safe_dump(config))
        monkeypatch.setenv("GEOREG_CONFIG", str(path))
        return path

    return write


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL cluster for the session (on 127.0.0.1, trust auth); tests get their own databases."""
    with PostgresServer() as server:
        yield server


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> str:
    """A fresh, empty PostgreSQL database for this test: `postgresql://postgres@127.0.0.1:PORT/NAME`."""
    return postgres.create_database(f"test_{uuid.uuid4().hex[:12]}")


# --- storage services, started once per session by the first test that asks ---


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with MotoServer(tmp_path_factory.mktemp("moto")) as server:
        server.require_credentials()
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsEmulator]:
    with GcsEmulator(tmp_path_factory.mktemp("gcs")) as emulator:
        emulator.create_bucket(BUCKET)
        yield emulator


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    with Azurite(tmp_path_factory.mktemp("azurite")) as server:
        server.create_container(BUCKET)
        yield server


@pytest.fixture(scope="session")
def swift_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwiftNode]:
    with SwiftNode(tmp_path_factory.mktemp("swift")) as node:
        node.create_container(BUCKET)
        yield node


@pytest.fixture(scope="session")
def oss_standin() -> Iterator[OssStandIn]:
    with OssStandIn() as server:
        server.buckets[BUCKET] = {}
        yield server


# The fast tier (`./scripts/test --fast`): pure logic and one open registry pair. A test that needs
# anything heavier (a Prefect server, PostgreSQL, a storage emulator, a second pair, a whole site,
# georeg's own processes) belongs to the full suite only, which CI runs.
_FULL_SUITE_FIXTURES = frozenset(
    {
        "prefect_api_url",
        "postgres",
        "postgres_url",
        "token_registry_pair",
        "moto_server",
        "gcs_emulator",
        "azurite",
        "swift_node",
        "oss_standin",
        "site",
        "cluster",
        "warm_site",
        "warm_engine",
        "prefect_on_postgres",
        "prefect_ui_server",
        "automation_site",
    }
)
_FULL_SUITE_PARAMETERS = frozenset({"postgresql", "s3", "gcs", "azure", "swift", "oss"})
# Modules whose tests start georeg's own processes (the CLI, serve, a warm engine), each of which
# starts Prefect's temporary server or a site of its own, or copy hundreds of images: a minute a test.
_FULL_SUITE_MODULES = frozenset(
    {
        "test_cli.py",
        "test_warm_engine.py",
        "test_serve_operations.py",
        "test_migrations.py",
        "test_deployment_dispatch.py",
        "test_scale_out.py",
        "test_repository_sync.py",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        # A backend parameter may carry a variant: "s3-no-root", "swift-no-prefix".
        parameters = {str(value).split("-")[0] for value in callspec.params.values()} if callspec else set()
        if (
            _FULL_SUITE_FIXTURES & set(getattr(item, "fixturenames", ()))
            or _FULL_SUITE_PARAMETERS & parameters
            or item.path.name in _FULL_SUITE_MODULES
        ):
            item.add_marker(pytest.mark.full)
