"""Session-wide storage services (started only when a test asks for them) and the `backend` fixture
that runs each contract test once per storage driver."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.storage_adapters.backends import Backend, cloud_key, filesystem_backend, service_account_key, swift_key
from tests.support.emulators import BUCKET, Azurite, GcsEmulator, MotoServer, SwiftNode
from tests.support.oss_standin import OssStandIn

OSS_SECRET = "oss-secret-never-shown-91c2"
BACKENDS = ["filesystem", "s3", "gcs", "azure", "swift", "oss"]


def s3_backend(server: MotoServer) -> Backend:
    client = server.client()
    other_port = server.port + 1 if server.port < 65535 else server.port - 1
    return Backend(
        name="s3",
        params=lambda root: {
            "region": server.region,
            "regionendpoint": server.url,
            "bucket": BUCKET,
            "rootdirectory": root,
            "accesskey": server.access_key,
            "secretkey": server.secret_key,
        },
        put=lambda root, path, data: client.put_object(Bucket=BUCKET, Key=cloud_key(root, path), Body=data),
        variants={
            "endpoint": {"regionendpoint": f"http://127.0.0.1:{other_port}"},
            "bucket": {"bucket": "another-bucket"},
            "root": {"rootdirectory": "/another-root"},
        },
        required=["region", "bucket"],
        bad_values={"secure": "maybe"},
        env_param="secretkey",
        secrets=["accesskey", "secretkey"],
        credential_param="secretkey",
    )


def gcs_backend(emulator: GcsEmulator) -> Backend:
    bucket = emulator.client().bucket(BUCKET)
    return Backend(
        name="gcs",
        params=lambda root: {"bucket": BUCKET, "rootdirectory": root},
        put=lambda root, path, data: bucket.blob(cloud_key(root, path)).upload_from_string(data),
        variants={
            "endpoint": {},  # made with another STORAGE_EMULATOR_HOST, see `variant_env`
            "bucket": {"bucket": "another-bucket"},
            "root": {"rootdirectory": "/another-root"},
        },
        required=["bucket"],
        bad_values={"keyfile": "/nonexistent/key.json"},
        env_param="bucket",
        unchecked_secrets={"credentials": service_account_key()},
        env={"STORAGE_EMULATOR_HOST": emulator.url},
    )


def azure_backend(server: Azurite) -> Backend:
    container = server.client().get_container_client(BUCKET)
    other_port = server.port + 1 if server.port < 65535 else server.port - 1
    return Backend(
        name="azure",
        params=lambda root: {
            "accountname": server.account,
            "accountkey": server.account_key,
            "container": BUCKET,
            "serviceurl": server.service_url,
            "rootdirectory": root,
        },
        put=lambda root, path, data: container.upload_blob(cloud_key(root, path), data, overwrite=True),
        variants={
            "endpoint": {"serviceurl": f"http://127.0.0.1:{other_port}/{server.account}"},
            "bucket": {"container": "another-container"},
            "root": {"rootdirectory": "/another-root"},
        },
        required=["accountname", "container", "accountkey"],
        bad_values={"serviceurl": "ftp://127.0.0.1/x"},
        env_param="accountkey",
        secrets=["accountkey"],
        credential_param="accountkey",
    )


def swift_backend(node: SwiftNode) -> Backend:
    connection = node.connection()
    return Backend(
        name="swift",
        params=lambda root: {
            "authurl": node.auth_url,
            "username": "test:tester",
            "password": node.users["test:tester"],
            "container": BUCKET,
            "prefix": root,
            "authversion": 1,
        },
        put=lambda root, path, data: connection.put_object(BUCKET, swift_key(root, path), data),
        # another account (tempauth's `other`) has another storage URL
        variants={
            "endpoint": {"username": "other:tester"},
            "bucket": {"container": "another-container"},
            "root": {"prefix": "/another-root"},
        },
        required=["authurl", "username", "password", "container"],
        bad_values={"authversion": "7"},
        env_param="password",
        secrets=["password"],
        credential_param="password",
        # a trailing '/' on the prefix changes the object names (see SwiftAdapter)
        root_spellings=lambda root: [root, f"/{root}"],
    )


def oss_backend(server: OssStandIn) -> Backend:
    other_port = server.port + 1 if server.port < 65535 else server.port - 1

    def put(root: str, path: str, data: bytes) -> None:
        server.buckets[BUCKET][cloud_key(root, path)] = data

    return Backend(
        name="oss",
        params=lambda root: {
            "accesskeyid": "oss-access-key-id",
            "accesskeysecret": OSS_SECRET,
            "region": "oss-cn-hangzhou",
            "endpoint": server.endpoint,
            "secure": False,
            "bucket": BUCKET,
            "rootdirectory": root,
        },
        put=put,
        variants={
            "endpoint": {"endpoint": f"127.0.0.1:{other_port}"},
            "bucket": {"bucket": "another-bucket"},
            "root": {"rootdirectory": "/another-root"},
        },
        required=["region", "bucket", "accesskeyid", "accesskeysecret"],
        bad_values={"internal": "maybe"},
        env_param="accesskeysecret",
        secrets=["accesskeyid", "accesskeysecret"],
    )


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Backend:
    name = request.param
    if name == "filesystem":
        return filesystem_backend(Path(tmp_path_factory.getbasetemp()) / "filesystem-storage")
    if name == "s3":
        return s3_backend(request.getfixturevalue("moto_server"))
    if name == "gcs":
        return gcs_backend(request.getfixturevalue("gcs_emulator"))
    if name == "azure":
        return azure_backend(request.getfixturevalue("azurite"))
    if name == "swift":
        return swift_backend(request.getfixturevalue("swift_node"))
    return oss_backend(request.getfixturevalue("oss_standin"))


@pytest.fixture
def root() -> str:
    """A storage root of this test's own, so tests sharing one bucket never see each other's objects."""
    return f"reg-{uuid.uuid4().hex[:12]}"
