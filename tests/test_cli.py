"""The `georeg` command as a person runs it: a real process, real registries, a real Prefect API."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import jwt
import pytest
import yaml

from georeg.state import StateStore
from tests.conftest import RegistryPair, WriteConfig
from tests.support.images import MANIFEST_ACCEPT, Pusher, build_image


def georeg(*arguments: str, api_url: str | None = None) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    environment.pop("COLUMNS", None)  # piped output is formatted for 80 columns unless told otherwise
    if api_url:
        environment["PREFECT_API_URL"] = api_url
    return subprocess.run(
        [sys.executable, "-m", "georeg.cli", *arguments], capture_output=True, text=True, env=environment, timeout=120
    )


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_replicate_copies_and_reports_the_digest(
    token_registry_pair: RegistryPair, write_config: WriteConfig, prefect_api_url: str, repo_name: str
):
    pair = token_registry_pair
    image = build_image("oci")
    with Pusher(pair.primary.url, pair.token_setup) as pusher:
        pusher.push_image(repo_name, image, "v1")
    config = write_config(pair.primary.url, pair.secondary.url, token_setup=pair.token_setup)

    done = georeg("--config", str(config), "replicate", f"{repo_name}:v1", api_url=prefect_api_url)

    assert done.returncode == 0, done.stderr
    assert last_line(done.stdout).startswith(f"secondary (copy): {repo_name}:v1 = {image.digest} (3 blobs copied")
    assert " sent in " in last_line(done.stdout)
    with Pusher(pair.secondary.url, pair.token_setup) as secondary:
        assert secondary.head_manifest(repo_name, "v1") == image.digest


def test_a_failed_replication_exits_1_with_one_clear_line(
    token_registry_pair: RegistryPair, write_config: WriteConfig, prefect_api_url: str, repo_name: str
):
    pair = token_registry_pair
    config = write_config(pair.primary.url, pair.secondary.url, token_setup=pair.token_setup)

    done = georeg("--config", str(config), "replicate", f"{repo_name}:missing", api_url=prefect_api_url)

    assert done.returncode == 1
    assert last_line(done.stderr) == (
        f"georeg: replicate failed: primary: GET /v2/{repo_name}/manifests/missing -> 404 MANIFEST_UNKNOWN: "
        "manifest unknown"
    )


def test_a_bad_config_exits_2_naming_the_key(tmp_path: Path):
    config = tmp_path / "georeg.yaml"
    config.write_text("primary: {url: 'http://127.0.0.1:1'}\nsecondaries: [{name: s, url: 'ftp://x'}]\n")

    done = georeg("--config", str(config), "replicate", "app:1")

    assert done.returncode == 2
    assert (
        done.stderr.strip() == f"georeg: {config}: secondaries[0].url: Value error, must start with http:// or https://"
    )


def test_bad_arguments_exit_2_before_any_work(tmp_path: Path):
    assert georeg("delete", "app").returncode == 2  # a delete needs an explicit tag or digest
    assert "names no tag or digest" in georeg("delete", "app").stderr
    assert georeg("replicate", "Bad/Name:1").returncode == 2
    no_runs = georeg("worker", "--limit", "0")  # before it asks Prefect anything
    assert no_runs.returncode == 2 and "--limit" in no_runs.stderr


def test_token_prints_a_jwt_the_registry_accepts_for_exactly_those_actions(
    token_registry_pair: RegistryPair, write_config: WriteConfig, repo_name: str
):
    pair = token_registry_pair
    image = build_image("docker")
    with Pusher(pair.primary.url, pair.token_setup) as pusher:
        pusher.push_image(repo_name, image, "v1")
    config = write_config(pair.primary.url, pair.secondary.url, token_setup=pair.token_setup)

    done = georeg("--config", str(config), "token", repo_name, "--actions", "pull")

    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["access"] == [{"type": "repository", "name": repo_name, "actions": ["pull"]}]
    headers = {"Authorization": f"Bearer {token}", "Accept": MANIFEST_ACCEPT}
    manifest_url = f"{pair.primary.url}/v2/{repo_name}/manifests/v1"
    assert httpx.get(manifest_url, headers=headers).status_code == 200
    refused = httpx.put(
        f"{pair.primary.url}/v2/{repo_name}/manifests/other",
        headers={**headers, "Content-Type": image.media_type},
        content=image.manifest,
    )
    assert refused.status_code == 401 and "insufficient_scope" in refused.headers["WWW-Authenticate"]


def test_keygen_writes_a_private_key_and_never_overwrites_it(tmp_path: Path):
    key, certificate = tmp_path / "registry.key", tmp_path / "registry.crt"

    done = georeg("keygen", str(key), str(certificate), "--type", "ec")

    assert done.returncode == 0, done.stderr
    assert key.stat().st_mode & 0o077 == 0  # readable by its owner only
    assert certificate.read_text().startswith("-----BEGIN CERTIFICATE-----")
    again = georeg("keygen", str(key), str(certificate))
    assert again.returncode == 2 and "never overwrites a key" in again.stderr


@pytest.mark.parametrize("command", [["--help"], ["replicate", "--help"], ["token", "--help"], ["worker", "--help"]])
def test_help_is_available(command: list[str]):
    done = georeg(*command)
    assert done.returncode == 0 and "usage: georeg" in done.stdout


LONG_FAILURE = (
    "secondary: PUT /v2/group/very-long-repository-name/manifests/sha256:" + "e" * 64 + " -> 400 "
    "MANIFEST_BLOB_UNKNOWN: blob unknown to registry; check that the blobs were copied before the manifest"
)


def status_site(tmp_path: Path) -> Path:
    """A config whose state database holds a synced, a failed (with a long reason) and a pending repository."""
    config = tmp_path / "status.yaml"
    state_url = f"sqlite:///{tmp_path / 'status.db'}"
    config.write_text(
        yaml.safe_dump(
            {
                "primary": {"url": "http://127.0.0.1:1"},
                "secondaries": [{"name": "far-away-secondary", "url": "http://registry.far-away.example.com:5000"}],
                "state": {"url": state_url},
            }
        )
    )

    async def record() -> None:
        store = StateStore(state_url)
        try:
            await store.ensure_schema()
            await store.sync.repositories_synced("far-away-secondary", ["group/app"])
            await store.sync.repository_failed("far-away-secondary", "group/broken", LONG_FAILURE, base=60, cap=3600)
            await store.sync.set_repository_state("far-away-secondary", "group/new")
        finally:
            await store.close()

    asyncio.run(record())
    return config


def test_status_reads_in_a_pipe_at_80_columns_and_cuts_nothing(tmp_path: Path):
    config = status_site(tmp_path)

    done = georeg("status", "--config", str(config))

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # Only a word longer than a line (a request path here) may run past 80 columns: it is kept whole.
    assert all(len(line) <= 80 or len(line.split()) == 1 for line in lines), max(lines, key=len)
    assert "…" not in done.stdout
    assert "secondary: far-away-secondary" in lines
    for expected in (
        "  repositories: 3",
        "  synced: 1 (33.3%)",
        "  failed: 1",
        "  pending: 1",
        "  last backfill: never",
    ):
        assert expected in lines
    # The failure, wrapped over several lines, is there whole: joined up again it reads as recorded.
    failure_lines = lines[lines.index("  failing repositories:") + 1 :]
    assert len(failure_lines) > 1
    joined = " ".join(line.strip() for line in failure_lines)
    assert joined.startswith("group/broken: failed 1x, next try ")
    assert joined.endswith(textwrap.shorten(LONG_FAILURE, width=10_000))


def test_status_json_is_unchanged_by_where_config_is_given(tmp_path: Path):
    config = status_site(tmp_path)

    before = json.loads(georeg("--config", str(config), "status", "--json").stdout)
    after = json.loads(georeg("status", "--json", "--config", str(config)).stdout)

    before.pop("generated_at"), after.pop("generated_at")
    assert before == after
    assert before["version"] == 1
    [entry] = before["secondaries"]
    assert set(entry) == {
        "name",
        "url",
        "mode",
        "repositories",
        "synced_percent",
        "verification",
        "oldest_unsynced_event",
        "last_backfill",
        "last_verification",
        "failures",
    }
    assert entry["repositories"] == {"total": 3, "synced": 1, "failed": 1, "pending": 1}
    assert entry["failures"][0]["last_failure"] == LONG_FAILURE


def test_config_after_the_command_is_the_config_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("primary: {url: 'http://127.0.0.1:1'}\nsecondaries: [{name: s, url: 'ftp://x'}]\n")
    good = status_site(tmp_path)
    monkeypatch.setenv("GEOREG_CONFIG", str(good))  # the option must win over the environment

    after = georeg("replicate", "--config", str(bad), "app:1")
    before = georeg("--config", str(bad), "replicate", "app:1")

    assert after.returncode == before.returncode == 2
    assert after.stderr == before.stderr
    assert "secondaries[0].url: Value error, must start with http:// or https://" in after.stderr
    # Given both before and after the command, the one after it counts.
    assert georeg("--config", str(bad), "status", "--config", str(good)).returncode == 0
