"""The dashboard artifact: its markdown from a real state database, its key per secondary and, in the
full suite, the page as a real Prefect UI renders it in headless Chromium after a real backfill."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from georeg.config import GeoregConfig, load_config
from georeg.dashboard import FAILURES_LISTED, dashboard_key, publish_dashboard, render_dashboard
from georeg.state import StateStore
from georeg.status import secondary_status
from tests.conftest import RegistryPair, WriteConfig
from tests.support.browser import screenshot, wait_for_text
from tests.support.images import Pusher, build_image
from tests.support.proxy import FaultProxy
from tests.support.services import PrefectServer, clean_environment


def status_entry(**changes: object) -> dict:
    """A status document's entry for one secondary, as `secondary_status` makes it."""
    entry = {
        "name": "east",
        "url": "http://127.0.0.1:5001",
        "mode": {"mode": "copy", "reason": "no storage: block for both registries"},
        "repositories": {"total": 3, "synced": 2, "failed": 1, "pending": 0},
        "synced_percent": 66.7,
        "verification": {"verified": 2, "failed": 0, "unverified": 1},
        "oldest_unsynced_event": "2026-12-02T13:00:00+00:00",
        "last_backfill": {
            "started_at": "2026-12-02T13:01:00+00:00",
            "finished_at": "2026-12-02T13:02:00+00:00",
            "outcome": "failed",
            "summary": {"repositories": 3, "synced": 2, "failed": 1, "tags_replicated": 5, "failures": ["x"]},
        },
        "last_verification": None,
        "failures": [
            {
                "repository": "group/broken",
                "retry_count": 2,
                "retry_at": "2026-12-02T13:04:00+00:00",
                "last_failure": "tag v1: PUT /v2/group/broken/manifests/v1 -> 400 MANIFEST_INVALID",
            }
        ],
    }
    return entry | changes


def test_the_dashboard_shows_counts_failures_and_runs():
    markdown = render_dashboard(status_entry(), "2026-12-02T13:05:00+00:00")

    assert markdown.startswith("# Secondary east: 66.7% synced\n")
    assert "| 2 | 1 | 0 | 3 | 66.7% |" in markdown  # synced, failed, pending, repositories, synced %
    assert "**Oldest unsynced event:** 2026-12-02T13:00:00+00:00" in markdown
    assert "**Last backfill:** finished 2026-12-02T13:02:00+00:00, failed: 3 repositories, 2 synced, 1 failed, " in (
        markdown
    )
    assert "5 tags replicated" in markdown
    assert "**Last verification:** never" in markdown
    failing = "- **group/broken**: failed 2x, next retry 2026-12-02T13:04:00+00:00: tag v1: PUT /v2/group/broken/"
    assert failing in markdown
    assert "more, not listed" not in markdown


def test_a_secondary_never_synced_says_so_instead_of_a_percentage():
    markdown = render_dashboard(
        status_entry(
            repositories={"total": 0, "synced": 0, "failed": 0, "pending": 0},
            synced_percent=None,
            oldest_unsynced_event=None,
            last_backfill=None,
            failures=[],
        ),
        "2026-12-02T13:05:00+00:00",
    )

    assert markdown.startswith("# Secondary east: - synced\n")
    assert "none, every event is replicated" in markdown and "**Last backfill:** never" in markdown
    assert markdown.endswith("## Failing repositories (0)\n\nNone.\n")


def test_text_from_registries_cannot_break_the_list_or_add_markup():
    failure = {
        "repository": "group/app",
        "retry_count": 1,
        "retry_at": None,
        "last_failure": "answer was <script>alert(1)</script> | [click](http://evil)\nsecond line",
    }
    markdown = render_dashboard(status_entry(failures=[failure]), "now")

    [item] = [line for line in markdown.splitlines() if line.startswith("- **group/app**")]
    assert "<script>" not in markdown and "](" not in markdown
    assert r"\<script\>" in item and r"\| \[click\]\(http://evil\) second line" in item  # one line
    assert "next retry at the next backfill: answer was" in item


def test_credentials_in_a_registry_url_stay_off_the_dashboard():
    markdown = render_dashboard(status_entry(url="https://bob:s3cret@registry.example.com:5000"), "now")

    assert "s3cret" not in markdown and "bob" not in markdown
    assert "https://registry.example.com:5000, copy mode" in markdown


@pytest.fixture
async def east(tmp_path: Path) -> AsyncIterator[tuple[GeoregConfig, StateStore]]:
    """A config with one secondary, `east`, and its state database (SQLite beside the config)."""
    config_path = tmp_path / "georeg.yaml"
    config_path.write_text(
        "primary: {url: http://127.0.0.1:5000}\nsecondaries: [{name: east, url: http://127.0.0.1:5001}]\n"
    )
    config = load_config(config_path)
    store = StateStore(config.state.url)
    await store.ensure_schema()
    yield config, store
    await store.close()


async def test_only_the_latest_failures_are_listed_and_the_rest_counted(east: tuple[GeoregConfig, StateStore]):
    """Against a real state database: counts in SQL, the most recent 20 failures by name."""
    config, store = east
    await store.sync.repositories_synced("east", [f"ok/{n}" for n in range(50)])
    for number in range(FAILURES_LISTED + 5):
        await store.sync.repository_failed("east", f"bad/{number:02d}", f"reason {number}", base=60, cap=3600)
    entry = await secondary_status(config, store, config.secondaries[0], failures_shown=FAILURES_LISTED)

    markdown = render_dashboard(entry, "now")

    assert "| 50 | 25 | 0 | 75 | 66.7% |" in markdown
    listed = re.findall(r"^- \*\*bad/(\d+)\*\*: failed 1x, ", markdown, re.MULTILINE)
    assert listed == [f"{number:02d}" for number in range(24, 4, -1)]  # newest first
    assert "And 5 more, not listed" in markdown


async def test_a_prefect_api_out_of_reach_costs_a_warning_not_the_run(east: tuple[GeoregConfig, StateStore], caplog):
    """The backfill or verification did its work; the dashboard is a view of it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    config, store = east
    # Port 9 (discard) has nothing listening on loopback: the connection is refused.
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        await publish_dashboard(config, store, "east")

    assert "the dashboard of east was not published: ConnectError" in caplog.text


@pytest.mark.parametrize(
    ("name", "key"),
    [("east", "dashboard-east"), ("eu-west-1", "dashboard-eu-west-1"), ("9x", "dashboard-9x")],
)
def test_a_plain_name_is_its_own_key(name: str, key: str):
    assert dashboard_key(name) == key


def test_names_that_lowercase_alike_get_keys_of_their_own():
    names = ["East", "east", "a_b", "a.b", "a-b", "A.B"]
    keys = [dashboard_key(name) for name in names]

    assert len(set(keys)) == len(names)
    assert all(re.fullmatch(r"[a-z0-9-]+", key) for key in keys)
    assert dashboard_key("East") == dashboard_key("East")  # stable: the UI's history follows one key


# --- in the Prefect UI (full suite) ----------------------------------------------------------------


@pytest.fixture
def prefect_ui_server(tmp_path: Path) -> Iterator[PrefectServer]:
    """A real `prefect server start` that serves its UI, for this test alone."""
    with PrefectServer(tmp_path / "prefect-home", ui=True) as server:
        yield server


def georeg_cli(config: Path, api_url: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "georeg.cli", "--config", str(config), *arguments],
        capture_output=True,
        text=True,
        env=clean_environment(PREFECT_API_URL=api_url),
        timeout=300,
    )


async def dashboard_versions(api_url: str, key: str) -> list[tuple[str, str]]:
    """(artifact id, markdown) of every version of the artifact `key`, newest first."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async with PrefectClient(api_url) as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC
        )
    return [(str(artifact.id), str(artifact.data)) for artifact in artifacts]


async def test_verify_and_backfill_publish_the_dashboard_the_ui_renders(
    registry_pair: RegistryPair, prefect_ui_server: PrefectServer, write_config: WriteConfig, repo_name: str, tmp_path
):
    repositories = [f"{repo_name}/{name}" for name in ("alpha", "beta", "gamma")]
    victim = repositories[1]
    with Pusher(registry_pair.primary.url) as pusher:
        for repository in repositories:
            pusher.push_image(repository, build_image("oci", layer_sizes=[256]), "v1")
    with FaultProxy(registry_pair.secondary.url) as secondary_proxy:
        secondary_proxy.refuse_manifest(victim, "v1")
        config = write_config(
            registry_pair.primary.url,
            secondary_proxy.url,
            replication={"repositories": {"include": [f"{repo_name}/*"]}, "task_retries": 0},
        )
        api_url = prefect_ui_server.api_url
        # Verify first (the secondary has nothing: every repository differs), then backfill: the latest
        # dashboard shows both runs, and the backfill's failure.
        verified = georeg_cli(config, api_url, "verify")
        assert verified.returncode == 1 and "3 of 3 repositories differ" in verified.stderr, verified.stderr
        backfilled = georeg_cli(config, api_url, "backfill")
        assert backfilled.returncode == 1 and f"1 of 3 repositories failed: {victim}" in backfilled.stderr

    key = dashboard_key("secondary")
    versions = await dashboard_versions(api_url, key)
    assert len(versions) == 2  # one per run, under one key
    (latest, markdown), (first, first_markdown) = versions
    assert "**Last backfill:** never" in first_markdown and "# Secondary secondary: 0.0% synced" in first_markdown
    assert "# Secondary secondary: 66.7% synced" in markdown

    # The key's page is the history: one entry per version, named by the first 8 digits of its id.
    wait_for_text(f"{prefect_ui_server.ui_url}/artifacts/key/{key}", latest[:8], first[:8])
    # A version's page shows the dashboard itself.
    page = f"{prefect_ui_server.ui_url}/artifacts/artifact/{latest}"
    text = wait_for_text(page, "Secondary secondary: 66.7% synced", f"{victim} : failed 1x, next retry 20")
    assert "synced failed pending repositories synced % 2 1 0 3 66.7%" in text
    assert "MANIFEST_INVALID" in text and "Last verification: finished" in text and "3 differing" in text
    for healthy in (repositories[0], repositories[2]):
        assert healthy not in text  # only failing repositories are listed
    picture = screenshot(page, tmp_path / "dashboard.png")
    assert picture.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and picture.stat().st_size > 20_000
