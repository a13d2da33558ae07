"""A throwaway PostgreSQL cluster for tests: initdb in a temporary directory, 127.0.0.1 only, trust auth."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from tests.support.registry import free_port
from tests.support.services import wait_until

START_DEADLINE_S = 60
NOT_INSTALLED = (
    "PostgreSQL is not installed (no initdb under /usr/lib/postgresql/*/bin or on PATH): "
    "run ./scripts/setup, which installs Debian's `postgresql` package"
)


def postgres_bin_dir() -> Path:
    """The newest PostgreSQL server binaries: Debian keeps them in /usr/lib/postgresql/<version>/bin."""
    candidates = [path.parent for path in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    if candidates:
        return max(candidates, key=lambda bin_dir: [int(part) for part in re.findall(r"\d+", bin_dir.parent.name)])
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError(NOT_INSTALLED)
    return Path(initdb).resolve().parent


class PostgresServer:
    """One PostgreSQL cluster on 127.0.0.1:`port`, created on start() and deleted on stop().

    initdb and postgres refuse to run as root, so as root they run as the `postgres` OS user, in a
    temporary directory that user owns. Clients connect over TCP as the `postgres` role without a password.
    """

    def __init__(self, port: int | None = None) -> None:
        self.bin_dir = postgres_bin_dir()
        self.port = port or free_port()
        self.root: Path | None = None

    # --- paths and commands ------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        assert self.root is not None, "the server is not started"
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        assert self.root is not None, "the server is not started"
        return self.root / "postgres.log"

    def _as_owner(self, command: list[str]) -> list[str]:
        """Run server-side commands as the `postgres` OS user when we are root."""
        return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command

    def _run(self, command: list[str], what: str, timeout: float = 120) -> str:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"{what} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n{self.log_tail()}")
        return done.stdout

    def _client(self, program: str, *arguments: str) -> list[str]:
        return [str(self.bin_dir / program), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", *arguments]

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> PostgresServer:
        self.root = Path(tempfile.mkdtemp(prefix="georeg-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.root, user="postgres", group="postgres")
        try:
            self._run(
                self._as_owner(
                    [
                        str(self.bin_dir / "initdb"),
                        "--pgdata",
                        str(self.data_dir),
                        "--username",
                        "postgres",
                        "--auth",
                        "trust",
                        "--encoding",
                        "UTF8",
                        "--locale",
                        "C",
                        "--no-sync",
                    ]
                ),
                "initdb",
            )
            # Durability settings off: the cluster lives as long as the test session.
            options = (
                f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
            )
            self._run(
                self._as_owner(
                    [
                        str(self.bin_dir / "pg_ctl"),
                        "start",
                        "--pgdata",
                        str(self.data_dir),
                        "--log",
                        str(self.log_path),
                        "--options",
                        options,
                        "--wait",
                        "--timeout",
                        str(START_DEADLINE_S),
                    ]
                ),
                "pg_ctl start",
                timeout=START_DEADLINE_S + 10,
            )
            wait_until(self.is_ready, deadline=START_DEADLINE_S, what=f"PostgreSQL on 127.0.0.1:{self.port}")
        except BaseException:
            self.stop()
            raise
        return self

    def is_ready(self) -> bool:
        command = [str(self.bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]
        return subprocess.run(command, capture_output=True, timeout=10, stdin=subprocess.DEVNULL).returncode == 0

    def stop(self) -> None:
        """Stop the server (fast shutdown: roll back open transactions) and delete the cluster."""
        root, self.root = self.root, None
        if root is None:
            return
        try:
            if (root / "data" / "postmaster.pid").exists():
                subprocess.run(
                    self._as_owner(
                        [str(self.bin_dir / "pg_ctl"), "stop", "--pgdata", str(root / "data"), "-m", "fast"]
                    ),
                    capture_output=True,
                    timeout=60,
                    stdin=subprocess.DEVNULL,
                    check=True,
                )
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # --- databases ---------------------------------------------------------------------------

    def create_database(self, name: str) -> str:
        """Create database `name` and return its URL."""
        self._run(self._client("createdb", name), f"createdb {name}")
        return self.url(name)

    def psql(self, database: str, sql: str) -> str:
        """Run `sql` in `database`; rows come back unaligned, one a line, columns separated by |."""
        return self._run(
            self._client("psql", "-d", database, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql), "psql"
        )

    def url(self, database: str, driver: str = "") -> str:
        """`postgresql://postgres@127.0.0.1:PORT/database`, or with a driver: `postgresql+asyncpg://...`."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://postgres@127.0.0.1:{self.port}/{database}"

    def log_tail(self, lines: int = 40) -> str:
        if self.root is None or not self.log_path.exists():
            return "(no server log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
