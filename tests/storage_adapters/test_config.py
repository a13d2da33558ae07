"""Adapter construction without a backend: location normalisation, config errors, env, registry_config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from georeg.errors import ConfigError
from georeg.storage_adapters import ADAPTERS, StorageError, StorageLocation, build_adapter
from tests.storage_adapters.backends import service_account_key
from tests.support.registry import free_port


def location(driver: str, **params: Any) -> StorageLocation:
    return build_adapter({driver: params}).location()


@pytest.fixture(autouse=True)
def _no_emulator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)


def test_every_registry_driver_has_an_adapter() -> None:
    assert set(ADAPTERS) == {"filesystem", "inmemory", "s3", "gcs", "azure", "swift", "oss"}


@pytest.mark.parametrize(
    "spelling",
    [
        {"region": "us-east-1"},
        {"region": "us-east-1", "regionendpoint": "https://s3.amazonaws.com"},
        {"region": "us-east-1", "regionendpoint": "https://s3.us-east-1.amazonaws.com/"},
        {"region": "us-east-1", "regionendpoint": "s3-external-1.amazonaws.com"},
        {"region": "eu-west-1", "regionendpoint": "https://s3.dualstack.us-east-1.amazonaws.com"},
        {"region": "us-east-1", "secure": False},
    ],
)
def test_s3_names_every_aws_spelling_of_a_region_alike(spelling: dict[str, Any]) -> None:
    assert location("s3", bucket="b", **spelling) == StorageLocation("s3", "s3.us-east-1.amazonaws.com", "b", "/")


def test_s3_endpoints_roots_and_regions_normalise() -> None:
    base = location("s3", bucket="b", region="us-east-1", regionendpoint="http://minio.local:9000", rootdirectory="r")
    assert base == location(
        "s3", bucket="b", region="eu-west-1", regionendpoint="HTTP://MinIO.local:9000/", rootdirectory="/r/"
    )
    assert base.root == "/r"
    assert location("s3", bucket="b", region="us-east-1", rootdirectory="/") == location(
        "s3", bucket="b", region="us-east-1", rootdirectory=""
    )
    assert location("s3", bucket="b", region="eu-west-1") != location("s3", bucket="b", region="us-east-1")
    assert location("s3", bucket="b", region="cn-north-1").endpoint == "s3.cn-north-1.amazonaws.com.cn"
    assert location("s3", bucket="b", region="x", regionendpoint="https://minio.local:443").endpoint == "minio.local"
    assert location("s3", bucket="b", region="x", regionendpoint="https://minio.local/path").endpoint == (
        "minio.local/path"
    )


def test_endpoint_credentials_and_queries_stay_out_of_locations() -> None:
    s3 = location("s3", bucket="b", region="x", regionendpoint="https://user:hunter2@minio.local/?token=abc")
    azure = location(
        "azure", accountname="a", accountkey="a2V5", container="c", serviceurl="https://a.blob.example?sig=hunter2"
    )
    assert "hunter2" not in repr(s3) + repr(azure)
    assert s3.endpoint == "minio.local"
    assert azure.endpoint == "a.blob.example"


def test_azure_default_endpoint_is_the_account_in_its_realm() -> None:
    params = {"accountname": "acct", "accountkey": "a2V5", "container": "c"}
    default = location("azure", **params)
    assert default == StorageLocation("azure", "acct.blob.core.windows.net", "c", "/")
    assert default == location("azure", **params, serviceurl="https://acct.blob.core.windows.net/")
    assert default != location("azure", **params, realm="core.chinacloudapi.cn")
    assert location("azure", **params, rootdirectory="/x/") == StorageLocation(
        "azure", "acct.blob.core.windows.net", "c", "/x"
    )


def test_azure_credentials_block() -> None:
    with pytest.raises(ConfigError, match=r"storage\.azure\.credentials\.type: expected one of"):
        location("azure", accountname="a", container="c", credentials={"type": "magic"})
    with pytest.raises(ConfigError, match=r"storage\.azure\.credentials\.secret: required"):
        location("azure", accountname="a", container="c", credentials={"type": "client_secret", "clientid": "i"})
    adapter = build_adapter(
        {
            "azure": {
                "accountname": "a",
                "container": "c",
                "credentials": {"type": "client_secret", "clientid": "i", "tenantid": "t", "secret": "hunter2"},
            }
        }
    )
    assert "hunter2" not in repr(adapter)


def test_oss_internal_and_public_endpoints_are_one_storage() -> None:
    params = {"accesskeyid": "id", "accesskeysecret": "secret", "bucket": "b", "region": "oss-cn-hangzhou"}
    public = location("oss", **params)
    assert public == StorageLocation("oss", "oss-cn-hangzhou.aliyuncs.com", "b", "/")
    assert public == location("oss", **params, internal=True)
    assert public == location("oss", **params, endpoint="oss-cn-hangzhou-internal.aliyuncs.com", secure=False)
    assert public != location("oss", **{**params, "region": "oss-cn-beijing"})


def test_gcs_without_an_emulator_is_google(tmp_path: Path) -> None:
    assert location("gcs", bucket="b", rootdirectory="/r/") == StorageLocation(
        "gcs", "storage.googleapis.com", "b", "/r"
    )


def test_gcs_service_account_from_keyfile_or_inline(tmp_path: Path) -> None:
    info = service_account_key()
    keyfile = tmp_path / "key.json"
    keyfile.write_text(json.dumps(info))
    secret_line = info["private_key"].splitlines()[1]
    for params in ({"keyfile": str(keyfile)}, {"credentials": info}):
        adapter = build_adapter({"gcs": {"bucket": "b", **params}})
        assert secret_line not in repr(adapter) + repr(adapter.location())
    with pytest.raises(ConfigError, match=r"storage\.gcs\.credentials: not a valid service account key") as bad:
        build_adapter({"gcs": {"bucket": "b", "credentials": {**info, "private_key": "not a key"}}})
    assert "not a key" not in str(bad.value)
    with pytest.raises(ConfigError, match=r"storage\.gcs\.keyfile: no such file"):
        build_adapter({"gcs": {"bucket": "b", "keyfile": str(tmp_path / "missing.json")}})


def test_swift_auth_version_is_guessed_from_the_url_like_the_registry_does() -> None:
    params = {"username": "u", "password": "p", "container": "c"}
    with pytest.raises(ConfigError, match=r"storage\.swift\.authversion"):
        build_adapter({"swift": {**params, "authurl": "https://keystone.example/identity"}})
    build_adapter({"swift": {**params, "authurl": "https://keystone.example/v3"}})
    with pytest.raises(ConfigError, match=r"storage\.swift\.trustid"):
        build_adapter({"swift": {**params, "authurl": "https://keystone.example/v3", "trustid": "t"}})


def test_swift_prefix_trailing_slash_is_a_different_place() -> None:
    """The driver names objects `<prefix>/files/...` trimming only the outer slashes: "p/" writes "p//files"."""
    from georeg.storage_adapters.swift import swift_key

    assert swift_key("", "docker/x") == "files/docker/x"
    assert swift_key("/p", "docker/x") == swift_key("p", "docker/x") == "p/files/docker/x"
    assert swift_key("p/", "docker/x") == "p//files/docker/x"


def test_inmemory_storage_is_never_shared() -> None:
    first, second = build_adapter({"inmemory": None}), build_adapter({"inmemory": {}})
    assert first.location() != second.location()
    assert first.location() == first.location()
    assert first.object_size("docker/registry/v2/x") is None
    assert first.read_small("docker/registry/v2/x") is None
    with pytest.raises(ConfigError, match=r"storage\.inmemory: unknown parameter"):
        build_adapter({"inmemory": {"size": 1}})


def test_driver_selection_errors() -> None:
    with pytest.raises(ConfigError, match="expected exactly one driver"):
        build_adapter({"s3": {}, "gcs": {}})
    with pytest.raises(ConfigError, match="expected exactly one driver, found none"):
        build_adapter({"delete": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"storage\.ceph: no adapter"):
        build_adapter({"ceph": {}})
    with pytest.raises(ConfigError, match=r"storage\.s3: expected a mapping"):
        build_adapter({"s3": "bucket"})


def test_values_of_the_wrong_kind_are_named_without_echoing_them() -> None:
    with pytest.raises(ConfigError, match=r"storage\.s3\.secretkey: expected a string") as failure:
        build_adapter({"s3": {"bucket": "b", "region": "r", "accesskey": "a", "secretkey": ["hunter2"]}})
    assert "hunter2" not in str(failure.value)
    with pytest.raises(ConfigError, match=r"storage\.s3\.secretkey: required when accesskey is set"):
        build_adapter({"s3": {"bucket": "b", "region": "r", "accesskey": "a"}})
    with pytest.raises(ConfigError, match=r"storage\.s3\.regionendpoint: expected an http"):
        build_adapter({"s3": {"bucket": "b", "region": "r", "regionendpoint": "ftp://x"}})


def test_registry_environment_fills_missing_parameters_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGISTRY_STORAGE_S3_BUCKET", "from-env")
    monkeypatch.setenv("REGISTRY_STORAGE_S3_REGION", "eu-west-1")
    assert location("s3").bucket == "from-env"
    assert location("s3", bucket="from-file").bucket == "from-file"


def test_references_inside_nested_blocks_are_expanded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEOREG_TEST_AZURE_SECRET", "hunter2")
    adapter = build_adapter(
        {
            "azure": {
                "accountname": "a",
                "container": "c",
                "credentials": {
                    "type": "client_secret",
                    "clientid": "i",
                    "tenantid": "t",
                    "secret": "${GEOREG_TEST_AZURE_SECRET}",
                },
            }
        }
    )
    assert adapter._client_secret.get_secret_value() == "hunter2"  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"storage\.azure\.credentials\.secret: environment variable GEOREG_TEST_X"):
        build_adapter(
            {
                "azure": {
                    "accountname": "a",
                    "container": "c",
                    "credentials": {
                        "type": "client_secret",
                        "clientid": "i",
                        "tenantid": "t",
                        "secret": "${GEOREG_TEST_X}",
                    },
                }
            }
        )


def test_registry_config_file(tmp_path: Path) -> None:
    config = {
        "version": 0.1,
        "storage": {"s3": {"bucket": "b", "region": "us-east-1", "rootdirectory": "/r"}, "delete": {"enabled": True}},
        "http": {"addr": ":5000", "secret": "hunter2"},
    }
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    expected = StorageLocation("s3", "s3.us-east-1.amazonaws.com", "b", "/r")

    assert build_adapter({"registry_config": str(tmp_path / "config.yml")}).location() == expected
    assert build_adapter({"registry_config": "config.yml"}, base_dir=tmp_path).location() == expected
    with pytest.raises(ConfigError, match=r"storage\.registry_config: cannot read .*missing\.yml"):
        build_adapter({"registry_config": str(tmp_path / "missing.yml")})
    with pytest.raises(ConfigError, match=r"storage\.registry_config: give either this or a driver block"):
        build_adapter({"registry_config": str(tmp_path / "config.yml"), "s3": {}})
    (tmp_path / "nostorage.yml").write_text(yaml.safe_dump({"version": 0.1}))
    with pytest.raises(ConfigError, match=r"storage\.registry_config: .* has no storage: block"):
        build_adapter({"registry_config": str(tmp_path / "nostorage.yml")})
    (tmp_path / "broken.yml").write_text("storage: [hunter2\n")
    with pytest.raises(ConfigError, match="not valid YAML") as failure:
        build_adapter({"registry_config": str(tmp_path / "broken.yml")})
    assert "hunter2" not in str(failure.value)


def test_an_unreachable_backend_is_a_transient_storage_error() -> None:
    port = free_port()  # nothing listens there
    adapter = build_adapter(
        {
            "s3": {
                "bucket": "b",
                "region": "us-east-1",
                "regionendpoint": f"http://127.0.0.1:{port}",
                "accesskey": "a",
                "secretkey": "hunter2",
            }
        }
    )
    with pytest.raises(StorageError) as failure:
        adapter.object_size("docker/registry/v2/x")
    assert failure.value.transient
    assert "hunter2" not in str(failure.value)
    assert f"127.0.0.1:{port}" in str(failure.value)
