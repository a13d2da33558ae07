"""Storage services for the storage adapter tests, each on a free port on 127.0.0.1.

moto's S3 server, gcp-storage-emulator and Azurite are the emulators the community tests against;
Swift is the real thing (a single-node cluster from Debian's packages). Each `start()` polls until
the service answers (it never sleeps a guessed time) and fails with the tail of its log; `stop()`
terminates what was started, also when the start failed. OSS has no emulator: see oss_standin.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tests.support.registry import free_port
from tests.support.services import REPOSITORY_ROOT, BackgroundProcess

VENV_BIN = Path(sys.executable).parent
AZURITE_BLOB = REPOSITORY_ROOT / ".tools" / "node_modules" / ".bin" / "azurite-blob"
SYSTEM_PYTHON = Path("/usr/bin/python3")  # Debian's swift modules import only here
START_DEADLINE_S = 60.0


BUCKET = "georeg-storage-tests"  # the bucket/container the session fixtures create


def _require(path: Path, what: str) -> None:
    if not path.exists():
        raise RuntimeError(f"{path} is missing ({what}): run ./scripts/setup")


def _http_answers(url: str) -> Callable[[], bool]:
    """Ready once anything answers over HTTP, whatever the status (auth errors included)."""

    def check() -> bool:
        try:
            httpx.get(url, timeout=2)
            return True
        except httpx.HTTPError:
            return False

    return check


def _tcp_answers(port: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    return check


def _wait_ready(
    processes: list[BackgroundProcess], ready: Callable[[], bool], what: str, deadline: float = START_DEADLINE_S
) -> None:
    """Poll `ready` until it holds; fail at once with the log if one of `processes` exits."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        for process in processes:
            assert process.process is not None
            if process.process.poll() is not None:
                raise RuntimeError(
                    f"{what}: {process.command[0]} exited with {process.process.returncode}:\n{process.log_tail()}"
                )
        if ready():
            return
        time.sleep(0.05)  # poll interval, not synchronisation
    tails = "\n".join(process.log_tail() for process in processes)
    raise RuntimeError(f"{what} not ready after {deadline:.0f}s:\n{tails}")


class Service:
    """A service made of background processes; a context manager that starts and stops them."""

    name = "service"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.processes: list[BackgroundProcess] = []

    def _spawn(self, command: list[str], log_name: str, env: dict[str, str] | None = None) -> BackgroundProcess:
        process = BackgroundProcess(command, self.workdir / log_name, env or dict(os.environ), cwd=self.workdir)
        self.processes.append(process.start())
        return process

    def start(self) -> Service:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


class MotoServer(Service):
    """moto's standalone S3 server. It accepts any keys until `require_credentials()`; from then on
    only the keys that call returns, with valid signatures (as S3 does)."""

    name = "moto"
    region = "us-east-1"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.access_key, self.secret_key = "any-access-key", "any-secret-key"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _start(self) -> None:
        _require(VENV_BIN / "moto_server", "moto[server]")
        command = [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)]
        process = self._spawn(command, "moto.log")
        _wait_ready([process], _http_answers(f"{self.url}/moto-api/"), "moto server")

    def require_credentials(self) -> None:
        """An IAM user allowed s3:*, then moto's authentication switched on (its reset-auth API)."""
        import json

        iam = self._client("iam")
        iam.create_user(UserName="georeg-tests")
        key = iam.create_access_key(UserName="georeg-tests")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="georeg-tests", PolicyName="s3", PolicyDocument=json.dumps(policy))
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        httpx.post(f"{self.url}/moto-api/reset-auth", content=b"0", timeout=10).raise_for_status()

    def _client(self, service: str) -> Any:
        import boto3

        return boto3.session.Session().client(
            service,
            region_name=self.region,
            endpoint_url=self.url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    def client(self) -> Any:
        return self._client("s3")

    def registry_storage(self, root: str, *, bucket: str = BUCKET, redirect: bool = False) -> dict[str, Any]:
        """A registry's `storage:` block on this server; blob redirects to presigned URLs off unless asked."""
        block: dict[str, Any] = {
            "s3": {
                "region": self.region,
                "regionendpoint": self.url,
                "bucket": bucket,
                "rootdirectory": root,
                "accesskey": self.access_key,
                "secretkey": self.secret_key,
            }
        }
        if not redirect:
            block["redirect"] = {"disable": True}
        return block

    def create_bucket(self, bucket: str) -> None:
        self.client().create_bucket(Bucket=bucket)


class GcsEmulator(Service):
    """gcp-storage-emulator, in memory (its disk mode breaks on some object names)."""

    name = "gcs"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _start(self) -> None:
        binary = VENV_BIN / "gcp-storage-emulator"
        _require(binary, "gcp-storage-emulator")
        command = [str(binary), "start", "--host", "127.0.0.1", "--port", str(self.port), "--in-memory", "-q"]
        process = self._spawn(command, "gcs.log")
        _wait_ready([process], _http_answers(f"{self.url}/storage/v1/b"), "gcp-storage-emulator")

    @contextmanager
    def environment(self) -> Iterator[None]:
        """STORAGE_EMULATOR_HOST pointing here, for as long as the block runs (adapters read it when made)."""
        previous = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = self.url
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("STORAGE_EMULATOR_HOST", None)
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = previous

    def client(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": self.url}
        )

    def create_bucket(self, bucket: str) -> None:
        self.client().create_bucket(bucket)


class Azurite(Service):
    """Azurite's blob service from npm (installed by scripts/setup under .tools/), started directly:
    killing an `npx` wrapper would leave the server holding the port."""

    name = "azure"
    account = "devstoreaccount1"
    # Azurite's published development key: the same on every installation.
    account_key = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.port = free_port()

    @property
    def service_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{self.account}"

    def _start(self) -> None:
        _require(AZURITE_BLOB, "npm azurite")
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        command = [
            str(AZURITE_BLOB),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(self.port),
            "--location",
            str(data),
            "--skipApiVersionCheck",  # the current azure-storage-blob speaks a newer API version
            "--disableTelemetry",
            "--silent",
        ]
        process = self._spawn(command, "azurite.log")
        _wait_ready([process], _http_answers(f"{self.service_url}?comp=list"), "azurite")

    def client(self) -> Any:
        from azure.core.credentials import AzureNamedKeyCredential
        from azure.storage.blob import BlobServiceClient

        credential = AzureNamedKeyCredential(self.account, self.account_key)
        return BlobServiceClient(account_url=self.service_url, credential=credential)

    def create_container(self, container: str) -> None:
        self.client().create_container(container)


_RING_SCRIPT = """
import sys
from swift.common.ring import RingBuilder
directory, ports = sys.argv[1], dict(zip(("account", "container", "object"), map(int, sys.argv[2:5])))
for kind, port in ports.items():
    builder = RingBuilder(10, 1, 1)
    builder.add_dev({"id": 0, "region": 1, "zone": 1, "ip": "127.0.0.1", "port": port, "device": "d1", "weight": 100})
    builder.rebalance()
    builder.get_ring().save(f"{directory}/{kind}.ring.gz")
"""

_BACKEND_CONF = """[DEFAULT]
bind_ip = 127.0.0.1
bind_port = {port}
workers = 0
user = root
devices = {devices}
mount_check = false
swift_dir = {swift_dir}
log_name = {kind}-server

[pipeline:main]
pipeline = {kind}-server

[app:{kind}-server]
use = egg:swift#{kind}
"""

_PROXY_CONF = """[DEFAULT]
bind_ip = 127.0.0.1
bind_port = {port}
workers = 0
user = root
swift_dir = {swift_dir}
log_name = proxy-server

[pipeline:main]
pipeline = catch_errors proxy-logging cache tempauth proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true

[filter:catch_errors]
use = egg:swift#catch_errors

[filter:proxy-logging]
use = egg:swift#proxy_logging

[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:{memcache_port}

[filter:tempauth]
use = egg:swift#tempauth
{users}
"""


class SwiftNode(Service):
    """A single-node OpenStack Swift: memcached, account, container and object servers and a proxy with
    tempauth, all as /usr/bin/python3 processes on private ports. Accounts `test` and `other`, each
    with a user `tester` whose password is `testing`."""

    name = "swift"
    users = {"test:tester": "testing", "other:tester": "testing"}

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.ports = {kind: free_port() for kind in ("memcache", "account", "container", "object", "proxy")}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['proxy']}"

    def registry_storage(self, container: str, prefix: str = "") -> dict[str, Any]:
        """A registry's `storage:` block on this node (the driver creates the container)."""
        return {
            "swift": {
                "authurl": self.auth_url,
                "username": "test:tester",
                "password": self.users["test:tester"],
                "container": container,
                "prefix": prefix,
                "authversion": 1,
            }
        }

    @property
    def auth_url(self) -> str:
        return f"{self.url}/auth/v1.0"

    def _start(self) -> None:
        for tool in ("swift-proxy-server", "swift-account-server", "swift-container-server", "swift-object-server"):
            _require(Path("/usr/bin") / tool, "Debian swift packages")
        memcached = shutil.which("memcached")
        if memcached is None:
            raise RuntimeError("memcached is missing: run ./scripts/setup")
        swift_dir = self.workdir / "etc"
        devices = self.workdir / "devices"
        (devices / "d1").mkdir(parents=True, exist_ok=True)
        swift_dir.mkdir(exist_ok=True)
        ports = [str(self.ports[kind]) for kind in ("account", "container", "object")]
        subprocess.run([str(SYSTEM_PYTHON), "-c", _RING_SCRIPT, str(swift_dir), *ports], check=True, timeout=60)
        users = "\n".join(f"user_{name.replace(':', '_')} = {password} .admin" for name, password in self.users.items())
        memcache = self._spawn(
            [memcached, "-l", "127.0.0.1", "-p", str(self.ports["memcache"]), "-U", "0", "-u", "root", "-m", "16"],
            "memcached.log",
        )
        _wait_ready([memcache], _tcp_answers(self.ports["memcache"]), "memcached")
        configs = {
            kind: _BACKEND_CONF.format(port=self.ports[kind], devices=devices, swift_dir=swift_dir, kind=kind)
            for kind in ("account", "container", "object")
        }
        configs["proxy"] = _PROXY_CONF.format(
            port=self.ports["proxy"], swift_dir=swift_dir, memcache_port=self.ports["memcache"], users=users
        )
        servers = [memcache]
        for kind, text in configs.items():
            conf = swift_dir / f"{kind}-server.conf"
            conf.write_text(text)
            # -v: log to stdout (our log file) as well as to syslog.
            command = [str(SYSTEM_PYTHON), f"/usr/bin/swift-{kind}-server", str(conf), "-v"]
            servers.append(self._spawn(command, f"{kind}.log", env=_without_venv(os.environ)))
        _wait_ready(servers, self._serves_objects, "swift", deadline=START_DEADLINE_S)

    def _serves_objects(self) -> bool:
        """The whole path works: tempauth (needs memcached), account, container and object servers."""
        try:
            with httpx.Client(timeout=5) as client:
                auth = client.get(self.auth_url, headers={"X-Auth-User": "test:tester", "X-Auth-Key": "testing"})
                if auth.status_code != 200:
                    return False
                storage, token = auth.headers["X-Storage-Url"], auth.headers["X-Auth-Token"]
                headers = {"X-Auth-Token": token}
                if client.put(f"{storage}/ready-probe", headers=headers).status_code not in (201, 202):
                    return False
                return client.put(f"{storage}/ready-probe/probe", headers=headers, content=b"ok").status_code == 201
        except httpx.HTTPError:
            return False

    def connection(self, user: str = "test:tester") -> Any:
        from swiftclient.client import Connection

        return Connection(authurl=self.auth_url, user=user, key=self.users[user], auth_version="1")

    def create_container(self, container: str, user: str = "test:tester") -> None:
        self.connection(user).put_container(container)


def _without_venv(environment: os._Environ[str] | dict[str, str]) -> dict[str, str]:
    """The environment for Debian's Python: no virtualenv variables leaking into it."""
    return {key: value for key, value in environment.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
