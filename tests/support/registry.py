"""Start real `docker-registry` processes so tests exercise the actual distribution server, not a fake."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import httpx
import yaml

from tests.support.certificates import write_self_signed

REGISTRY_BINARY = Path("/usr/bin/docker-registry")
START_DEADLINE_S = 15.0


def free_port() -> int:
    """Ask the kernel for an unused port on 127.0.0.1 (tests never bind other interfaces)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class TokenAuthSetup:
    """Key material and names shared by a token-auth registry and whoever mints its tokens."""

    key_path: Path
    cert_path: Path
    issuer: str = "georeg-test"
    service: str = "container_registry"
    realm: str = "http://127.0.0.1:1/unused-realm"


def make_token_auth_setup(directory: Path, key_type: Literal["rsa", "ec"] = "rsa") -> TokenAuthSetup:
    """Generate a key and a self-signed cert; the registry trusts tokens signed by that key."""
    setup = TokenAuthSetup(key_path=directory / "token-signer.key", cert_path=directory / "token-signer.crt")
    write_self_signed(
        setup.cert_path, setup.key_path, common_name="georeg-test-token-signer", key_type=key_type, valid_days=365
    )
    return setup


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Merge nested dicts so extra_config can override single keys without restating whole sections."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class RegistryProcess:
    """One real registry on 127.0.0.1; started on construction, stopped by stop() or the context manager."""

    def __init__(
        self,
        workdir: Path,
        storage: dict[str, Any] | None = None,
        token_auth: TokenAuthSetup | None = None,
        notifications: list[dict[str, Any]] | None = None,
        http_secret: str = "georeg-test-secret",
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        if not REGISTRY_BINARY.exists():
            raise RuntimeError(
                f"{REGISTRY_BINARY} is missing: run `apt-get install -y docker-registry` "
                "(the project's setup script installs it)"
            )
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._port = free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self.config = self._build_config(storage, token_auth, notifications, http_secret, extra_config or {})
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.start()

    def _build_config(
        self,
        storage: dict[str, Any] | None,
        token_auth: TokenAuthSetup | None,
        notifications: list[dict[str, Any]] | None,
        http_secret: str,
        extra_config: dict[str, Any],
    ) -> dict[str, Any]:
        """Build the registry config; delete enabled and upload purging off so tests are deterministic."""
        base_storage = storage or {"filesystem": {"rootdirectory": str(self.workdir / "storage")}}
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": deep_merge(
                base_storage,
                {"delete": {"enabled": True}, "maintenance": {"uploadpurging": {"enabled": False}}},
            ),
            "http": {"addr": f"127.0.0.1:{self._port}", "secret": http_secret},
        }
        if token_auth is not None:
            config["auth"] = {
                "token": {
                    "realm": token_auth.realm,
                    "service": token_auth.service,
                    "issuer": token_auth.issuer,
                    "rootcertbundle": str(token_auth.cert_path),
                }
            }
        if notifications:
            config["notifications"] = {"endpoints": copy.deepcopy(notifications)}
        return deep_merge(config, extra_config)

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        scheme = "https" if self.config.get("http", {}).get("tls") else "http"
        return f"{scheme}://127.0.0.1:{self._port}"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("the registry is not running")
        return self._process.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / "registry.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.yml"

    def start(self) -> None:
        """Launch the process and block until /v2/ answers, so tests never race the startup."""
        if self._process is not None and self._process.poll() is None:
            return
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}  # s3 driver panics with it
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [str(REGISTRY_BINARY), "serve", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        """Poll GET /v2/ until 200 (open) or 401 (token auth) with a deadline."""
        deadline = time.monotonic() + START_DEADLINE_S
        assert self._process is not None
        with httpx.Client(timeout=1.0, verify=False) as client:  # readiness only; tests check TLS themselves
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise RuntimeError(f"registry exited with {self._process.returncode}:\n{self.log_tail()}")
                try:
                    if client.get(f"{self.url}/v2/").status_code in (200, 401):
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.05)  # poll interval, not synchronisation
        raise RuntimeError(f"registry not ready after {START_DEADLINE_S} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of the registry log, for error messages."""
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Terminate the process, killing it if it does not exit in time."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def restart(self) -> None:
        """Stop and start on the same port and storage (e.g. to test lost notifications)."""
        self.stop()
        self.start()

    def __enter__(self) -> RegistryProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
