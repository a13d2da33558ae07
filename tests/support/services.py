"""Long-running processes the end-to-end tests start: `georeg serve`, a Prefect server, a Prefect worker."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import httpx

from georeg.warm_engine import SOCKET_ENV
from tests.support.registry import free_port

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]


def wait_until(condition: Callable[[], bool], *, deadline: float, what: str, interval: float = 0.1) -> None:
    """Poll `condition` until it holds; fail naming `what` after `deadline` seconds."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {deadline:.0f}s waiting for {what}")


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # "pid (command) state ppid ...": the command may hold spaces, so split after its ")".
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    found, waiting = [], list(children.get(pid, []))
    while waiting:
        child = waiting.pop()
        found.append(child)
        waiting += children.get(child, [])
    return found


def answers(url: str, *statuses: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code in (statuses or (200,))
        except httpx.HTTPError:
            return False

    return check


class BackgroundProcess:
    """A command run in the background with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, command: list[str], log_path: Path, env: dict[str, str], cwd: Path = REPOSITORY_ROOT) -> None:
        self.command, self.log_path, self.env, self.cwd = command, log_path, env, cwd
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> BackgroundProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        return self

    def stop(self, timeout: float = 15) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as when a machine dies."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def kill_with_descendants(self) -> None:
        """SIGKILL to the process, then at once to everything it started: its whole machine going down.
        The process goes first, so that it cannot see its children die and report it."""
        if self.process is None or self.process.poll() is not None:
            return
        below = descendants(self.process.pid)
        self.process.kill()
        for pid in below:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()

    def descendant_environments(self) -> list[dict[str, str]]:
        """The environment of each process this one started (and they started), read from /proc."""
        if self.process is None or self.process.poll() is not None:
            return []
        found = []
        for pid in descendants(self.process.pid):
            with contextlib.suppress(OSError):
                raw = Path(f"/proc/{pid}/environ").read_bytes()
                found.append(
                    dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
                )
        return found

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> BackgroundProcess:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def clean_environment(**overrides: str) -> dict[str, str]:
    """This process's environment without any PREFECT_ settings, plus `overrides`."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    environment.update(overrides)
    return environment


class GeoregServe(BackgroundProcess):
    """`georeg serve` on a fixed port (kept across restarts, as a registry's endpoint URL is)."""

    def __init__(
        self, config: Path, log_path: Path, env: dict[str, str], port: int | None = None, ready_deadline: float = 60
    ) -> None:
        self.port = port or free_port()
        # Without PREFECT_API_URL, start-up includes Prefect's temporary server (and its database's
        # migrations on a fresh PREFECT_HOME): give that more time.
        self.ready_deadline = ready_deadline
        command = [sys.executable, "-m", "georeg.cli", "--config", str(config), "serve", "--port", str(self.port)]
        super().__init__(command, log_path, env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GeoregServe:
        super().start()
        try:
            wait_until(answers(f"{self.url}/healthz"), deadline=self.ready_deadline, what="georeg serve to answer")
        except AssertionError:
            self.kill_with_descendants()  # a `with` block that failed to enter never reaches __exit__
            raise AssertionError(f"georeg serve did not start:\n{self.log_tail()}") from None
        return self


class PrefectServer(BackgroundProcess):
    """A real `prefect server start` with its own PREFECT_HOME (SQLite there unless a database URL is given)."""

    def __init__(
        self,
        home: Path,
        port: int | None = None,
        database_url: str | None = None,
        *,
        access_log: bool = False,
        ui: bool = False,
    ) -> None:
        self.port = port or free_port()
        self.home = home
        env = clean_environment(
            PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED=str(ui).lower()
        )
        if database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
        if ui:  # the UI's scripts ask the API at this address (else at the default port, 4200)
            env["PREFECT_UI_API_URL"] = self.api_url
        if access_log:  # uvicorn's access log, one line per API request (benchmarks count them)
            env["PREFECT_SERVER_LOGGING_LEVEL"] = "INFO"
        command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
        super().__init__(command, home / f"server-{self.port}.log", env)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def ui_url(self) -> str:
        """The Prefect UI's root, served when the server was started with `ui=True`."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        super().start()
        try:
            # About 15 s on a quiet machine; on a 2-core machine shared with other test runs, minutes.
            wait_until(answers(f"{self.api_url}/health"), deadline=300, what="the Prefect server", interval=0.5)
        except AssertionError:
            self.kill_with_descendants()  # a `with` block that failed to enter never reaches __exit__
            raise AssertionError(f"prefect server did not start:\n{self.log_tail()}") from None
        return self


def prefect_cli(environment: dict[str, str], *arguments: str) -> str:
    """`prefect --no-prompt ARGUMENTS` from the repository root (where prefect.yaml is); fails loudly."""
    return _run_module(environment, "prefect", "--no-prompt", *arguments)


def georeg_cli(environment: dict[str, str], *arguments: str) -> str:
    """`georeg ARGUMENTS` as an operator runs it (the config from $GEOREG_CONFIG); fails loudly."""
    return _run_module(environment, "georeg.cli", *arguments)


def _run_module(environment: dict[str, str], module: str, *arguments: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", module, *arguments],
        cwd=REPOSITORY_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise AssertionError(f"{module} {' '.join(arguments)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def deploy_georeg(environment: dict[str, str]) -> None:
    """The `georeg` process work pool and every deployment in prefect.yaml, as the README's setup does."""
    prefect_cli(environment, "work-pool", "create", "georeg", "--type", "process")
    prefect_cli(environment, "deploy", "--all")


class WarmEngine(BackgroundProcess):
    """`georeg warm-engine`: the flow runs of a worker given it start as forks of this process."""

    def __init__(self, root: Path, environment: dict[str, str], *arguments: str) -> None:
        self.socket_path = root / "warm-engine.sock"
        command = [sys.executable, "-m", "georeg.cli", "warm-engine", "--socket", str(self.socket_path), *arguments]
        super().__init__(command, root / "warm-engine.log", environment)

    def start(self) -> WarmEngine:
        ready_before = self.ready_count()
        super().start()
        try:
            wait_until(lambda: self.ready_count() > ready_before, deadline=60, what="the warm engine", interval=0.1)
        except AssertionError:
            raise AssertionError(f"georeg warm-engine did not start:\n{self.log_tail()}") from None
        return self

    def ready_count(self) -> int:
        """How many warm engines have said they listen, in this log (a restarted one writes there too)."""
        return self.log_path.read_text().count("warm engine ready at") if self.log_path.exists() else 0


class PrefectWorker(BackgroundProcess):
    """A `georeg worker` (Prefect's process worker, as the README starts it) on the `georeg` pool that
    asks for work twice a second (the default is every 10 s); `query_seconds` sets another interval (the
    latency benchmark uses the README's 0.25 s)."""

    SETTINGS = {"PREFECT_WORKER_QUERY_SECONDS": "0.5", "PREFECT_WORKER_PREFETCH_SECONDS": "1"}

    def __init__(
        self,
        log_path: Path,
        environment: dict[str, str],
        *,
        name: str = "georeg-worker",
        pool: str = "georeg",
        limit: int = 4,
        warm_engine: WarmEngine | None = None,
        query_seconds: float | None = None,
    ):
        command = [sys.executable, "-m", "georeg.cli", "worker", "--pool", pool, "--name", name, "--limit", str(limit)]
        settings = {**self.SETTINGS}
        if query_seconds is not None:
            settings["PREFECT_WORKER_QUERY_SECONDS"] = str(query_seconds)
        warm = {SOCKET_ENV: str(warm_engine.socket_path)} if warm_engine else {}
        super().__init__(command, log_path, {**environment, **settings, **warm})

    def running_flow_runs(self) -> set[str]:
        """The ids of the flow runs this worker's processes run right now."""
        return {env["PREFECT__FLOW_RUN_ID"] for env in self.descendant_environments() if "PREFECT__FLOW_RUN_ID" in env}


def prefect_events(api_url: str, resource_id: str, names: list[str] | None = None) -> list[dict[str, object]]:
    """The events a real Prefect server holds about `resource_id` (newest first), optionally only these names."""
    event_filter: dict[str, object] = {"resource": {"id": [resource_id]}}
    if names:
        event_filter["event"] = {"name": names}
    response = httpx.post(f"{api_url}/events/filter", json={"filter": event_filter, "limit": 50}, timeout=10)
    response.raise_for_status()
    return list(response.json()["events"])
