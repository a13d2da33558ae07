"""The config file: what a valid one yields, and that every mistake names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from georeg.config import ConcurrencyConfig, GeoregConfig, JwtAuth, load_config
from georeg.errors import ConfigError

VALID = """
primary:
  url: http://127.0.0.1:5000/
  auth: {type: jwt, key_file: registry.key, issuer: georeg, service: container_registry}
  storage: {filesystem: {rootdirectory: /var/lib/registry}}
secondaries:
  - name: secondary
    url: http://127.0.0.1:5001
    auth: {type: basic, username: georeg, password: hunter2}
notifications: {secret: change-me}
state: {url: sqlite:///georeg.db}
replication: {concurrency: 8}
"""


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    (tmp_path / "registry.key").write_text("not read until a token is minted")
    return tmp_path


def load(config_dir: Path, text: str) -> GeoregConfig:
    path = config_dir / "georeg.yaml"
    path.write_text(text)
    return load_config(path)


def test_the_documented_example_loads(config_dir):
    config = load(config_dir, VALID)

    assert config.primary.url == "http://127.0.0.1:5000"  # trailing slash dropped
    assert isinstance(config.primary.auth, JwtAuth)
    assert config.primary.auth.key_file == config_dir / "registry.key"  # relative to the file, not the cwd
    assert [s.name for s in config.secondaries] == ["secondary"]
    # One number still sets every level, as it did when it was the only setting; the cap stays.
    levels = config.replication.concurrency
    assert (levels.blobs_per_image, levels.tags_per_repository, levels.repositories) == (8, 8, 8)
    assert levels.requests_per_registry == ConcurrencyConfig().requests_per_registry


def test_concurrency_levels_are_set_one_by_one(config_dir):
    config = load(
        config_dir, VALID.replace("{concurrency: 8}", "{concurrency: {repositories: 16, blobs_per_image: 2}}")
    )

    levels = config.replication.concurrency
    assert (levels.blobs_per_image, levels.tags_per_repository, levels.repositories) == (2, 4, 16)


def test_secrets_do_not_show_in_the_config_repr(config_dir):
    config = load(
        config_dir, VALID.replace("{secret: change-me}", "{secret: change-me, status_token: tok-0123456789abcdef}")
    )
    assert "hunter2" not in repr(config) and "change-me" not in repr(config)
    assert "tok-0123456789abcdef" not in repr(config)
    assert config.notifications.status_token is not None
    assert config.dispatch.shutdown_grace_seconds == 30


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ("concurrency: 8", "concurrency: 0"),
            r"replication\.concurrency\.blobs_per_image: Input should be greater than or equal to 1",
        ),
        (
            ("concurrency: 8", "concurrency: {tags_per_repo: 2}"),
            r"replication\.concurrency\.tags_per_repo: Extra inputs are not permitted",
        ),
        (("concurrency: 8", "concurency: 8"), r"replication\.concurency: Extra inputs are not permitted"),
        (("type: basic", "type: kerberos"), r"secondaries\[0\]\.auth: Input tag 'kerberos' found"),
        (("username: georeg, ", ""), r"secondaries\[0\]\.auth\.username: Field required"),
        (("url: http://127.0.0.1:5001", "url: 127.0.0.1:5001"), r"secondaries\[0\]\.url: Value error, must start"),
        (("key_file: registry.key", "key_file: missing.key"), r"primary\.auth\.key_file: file .*missing\.key does not"),
        (("  - name: secondary", "  - name: 'bad name!'"), r"secondaries\[0\]\.name: String should match"),
        (("{secret: change-me}", "{secret: change-me, status_token: short}"), r"notifications\.status_token: .*16"),
        (
            ("{secret: change-me}", "{secret: change-me-0123456789, status_token: change-me-0123456789}"),
            r"notifications: Value error, status_token must differ from notifications\.secret",
        ),
        (("replication:", "dispatch: {shutdown_grace_seconds: -1}\nreplication:"), r"dispatch\.shutdown_grace_seconds"),
    ],
)
def test_a_bad_value_names_its_key(config_dir, change, message):
    old, new = change
    assert old in VALID
    with pytest.raises(ConfigError, match=message):
        load(config_dir, VALID.replace(old, new))


def test_duplicate_secondary_names_are_refused(config_dir):
    text = VALID.replace("notifications:", "  - {name: secondary, url: 'http://127.0.0.1:5002'}\nnotifications:")
    with pytest.raises(ConfigError, match="secondary names must be unique, repeated: secondary"):
        load(config_dir, text)


def test_missing_file_and_bad_yaml_say_what_to_do(config_dir, monkeypatch):
    monkeypatch.chdir(config_dir)
    monkeypatch.delenv("GEOREG_CONFIG", raising=False)
    with pytest.raises(ConfigError, match=r"georeg\.yaml not found: pass --config, set \$GEOREG_CONFIG"):
        load_config()
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(config_dir, "primary: [unclosed")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load(config_dir, "- just a list")


def test_selecting_an_unknown_secondary_lists_the_known_ones(config_dir):
    config = load(config_dir, VALID)
    with pytest.raises(ConfigError, match=r"no secondary named 'elsewhere' in the config \(known: secondary\)"):
        config.select_secondaries("elsewhere")
