"""What the backfill and storage benchmarks share: timed processes, flow-run times from the Prefect API,
tag -> digest listings of a registry, bytes uploaded through a recording proxy, georeg configs, results."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

# One error for every benchmark sharing this module: run_timed (replicate.py) raises it too.
from benchmarks.replicate import BIN, MB, SKOPEO, BenchmarkError
from tests.support.images import Pusher
from tests.support.postgres import PostgresServer
from tests.support.proxy import FaultProxy
from tests.support.services import BackgroundProcess, PrefectServer

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COMMAND_TIMEOUT_S = 1800.0
# Prefect's flow engine logs "Beginning flow run 'witty-cat' for flow 'backfill'" when a run starts.
FLOW_RUN_STARTED = re.compile(r"Beginning flow run '(?P<name>[^']+)' for flow '(?P<flow>[^']+)'")
RepositoryListing = dict[str, dict[str, str]]  # repository -> tag -> manifest digest


# --- processes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finished:
    """Processes started together: the wall time until the last one exited, what each printed, and the
    machine's 1-minute load average when they were done (other work on the machine shows there)."""

    wall_s: float
    cpu_s: float  # user + system time of the processes (and of the children they waited for)
    outputs: list[str]
    load_1m: float


def run_processes(commands: Sequence[Sequence[str]], *, env: dict[str, str], log_dir: Path, name: str) -> Finished:
    """Start `commands` at once (each in its own session, output to a log), wait for all, fail if one fails."""
    jobs = [
        BackgroundProcess(list(command), log_dir / f"{name}-{i}.log", env, log_dir)
        for i, command in enumerate(commands)
    ]
    cpu_before = _children_cpu_s()
    started = time.monotonic()
    try:
        for job in jobs:
            job.start()
        statuses = [_wait(job, started + COMMAND_TIMEOUT_S) for job in jobs]
        wall_s = time.monotonic() - started
        cpu_s = _children_cpu_s() - cpu_before
    finally:
        for job in jobs:
            _kill_if_running(job)
    for job, status in zip(jobs, statuses, strict=True):
        if status != 0:
            raise BenchmarkError(f"{' '.join(job.command)[:300]} exited with {status}:\n{job.log_tail(25)}")
    outputs = [job.log_path.read_text(errors="replace") for job in jobs]
    return Finished(wall_s, cpu_s, outputs, os.getloadavg()[0])


def _children_cpu_s() -> float:
    """CPU time of this process's children that have been waited for (registries count when they stop)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _wait(job: BackgroundProcess, deadline: float) -> int:
    assert job.process is not None
    try:
        return job.process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"{job.command[0]} still running after {COMMAND_TIMEOUT_S:.0f} s: stopped") from None


def _kill_if_running(job: BackgroundProcess) -> None:
    """Timed out or interrupted: stop the process and whatever it started."""
    if job.process is not None and job.process.poll() is None:
        os.killpg(job.process.pid, signal.SIGKILL)
        job.process.wait()


def quiet_tls_probes() -> None:
    """skopeo tries HTTPS first on a registry it may reach insecurely; a recording proxy's uvicorn warns
    "Invalid HTTP request received." at every such try. Those lines say nothing about the benchmark."""
    logging.getLogger("uvicorn.error").addFilter(lambda record: "Invalid HTTP request" not in record.getMessage())


# --- Prefect -------------------------------------------------------------------------------------


def flow_run_seconds(api_url: str, output: str, flow: str) -> float:
    """The Prefect server's record of how long the run of `flow` that `output` announces was Running."""
    names = [found["name"] for found in FLOW_RUN_STARTED.finditer(output) if found["flow"] == flow]
    if len(names) != 1:
        raise BenchmarkError(f"expected one '{flow}' flow run in the output, found {names}:\n{output[-2000:]}")
    response = httpx.post(f"{api_url}/flow_runs/filter", json={"flow_runs": {"name": {"any_": names}}}, timeout=30)
    response.raise_for_status()
    [run] = response.json()
    if run["state_type"] != "COMPLETED":
        raise BenchmarkError(f"flow run {names[0]} of {flow} ended {run['state_type']}")
    return float(run["total_run_time"])


# --- registries ----------------------------------------------------------------------------------


def catalog(url: str) -> list[str]:
    """Every repository of the registry, following the catalog's `Link` pages."""
    names: list[str] = []
    with httpx.Client(base_url=url, timeout=30) as client:
        response = client.get("/v2/_catalog", params={"n": 1000})
        while True:
            response.raise_for_status()
            names += response.json().get("repositories") or []
            if "next" not in response.links:
                return names
            response = client.get(response.links["next"]["url"])


def listing(url: str) -> RepositoryListing:
    """repository -> tag -> digest, read with the registry API (HEAD with every manifest media type)."""
    with Pusher(url) as client:
        return {
            repository: {tag: client.head_manifest(repository, tag) or "missing" for tag in client.tags(repository)}
            for repository in catalog(url)
        }


def check_listing(expected: RepositoryListing, url: str, what: str) -> None:
    """Fail loudly unless the registry at `url` lists exactly the tags and digests of `expected`."""
    found = listing(url)
    if found == expected:
        return
    tags = sum(len(tags) for tags in found.values())
    wrong = sorted(
        f"{repository}:{tag}"
        for repository, tags_expected in expected.items()
        for tag, digest in tags_expected.items()
        if found.get(repository, {}).get(tag) != digest
    )
    extra = sorted(set(found) - set(expected))
    raise BenchmarkError(
        f"{what}: the secondary lists {len(found)} repositories / {tags} tags, not the primary's "
        f"{len(expected)} / {sum(len(t) for t in expected.values())}; "
        f"{len(wrong)} tags missing or different (first: {wrong[:3]}), extra repositories: {extra[:3]}"
    )


@dataclass(frozen=True)
class Uploads:
    """What a recording proxy in front of a secondary saw of blob uploads."""

    bytes: int  # bodies of PATCH and PUT requests under /blobs/uploads/
    upload_requests: int  # POST, PATCH and PUT requests under /blobs/uploads/, mounts included
    mounts: int  # cross-repository mounts the registry accepted (POST ...?mount=, 201)


def uploads(proxy: FaultProxy) -> Uploads:
    requests = [r for r in proxy.requests if "/blobs/uploads/" in r.path]
    return Uploads(
        bytes=sum(r.request_bytes for r in requests if r.method in ("PATCH", "PUT")),
        upload_requests=len(requests),
        mounts=sum(1 for r in requests if r.method == "POST" and "mount=" in r.query and r.status == 201),
    )


# --- georeg --------------------------------------------------------------------------------------


def write_georeg_config(
    path: Path, primary: dict[str, Any], secondary: dict[str, Any], state_database: Path | None = None
) -> Path:
    """A georeg.yaml with one secondary named `bench` and a state database (default: next to it); default
    replication."""
    config = {
        "primary": primary,
        "secondaries": [{"name": "bench", **secondary}],
        "state": {"url": f"sqlite:///{state_database or path.with_suffix('.db')}"},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def georeg_command(config: Path, *arguments: str) -> list[str]:
    return [str(BIN / "georeg"), "--config", str(config), *arguments]


# --- Prefect ---------------------------------------------------------------------------------------

PREFECT_DATABASES = ("postgres", "sqlite")


def add_prefect_database_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prefect-database",
        choices=PREFECT_DATABASES,
        default="postgres",
        help="what the Prefect server stores its runs in (default postgres, as in production)",
    )


def start_prefect_server(stack: ExitStack, home: Path, database: str, *, access_log: bool = False) -> PrefectServer:
    """A Prefect server on SQLite, or on a PostgreSQL server of its own as in production (docs/scaling.md).

    On SQLite, a write that meets another (the server recording the previous run's task runs) is
    answered 503, and Prefect's client waits 2 s or more before it tries again."""
    if database == "sqlite":
        return stack.enter_context(PrefectServer(home, access_log=access_log))
    postgres = stack.enter_context(PostgresServer())
    name = f"prefect_{uuid.uuid4().hex[:8]}"
    postgres.create_database(name)
    return stack.enter_context(PrefectServer(home, database_url=postgres.url(name, "asyncpg"), access_log=access_log))


# --- results -------------------------------------------------------------------------------------


def tool_version(command: Sequence[str]) -> str:
    done = subprocess.run(list(command), capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).strip().splitlines()[0] if done.returncode == 0 else "unknown"


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "prefect": tool_version([str(BIN / "prefect"), "--version"]),
        "skopeo": tool_version([str(SKOPEO), "--version"]),
        "registry": tool_version(["/usr/bin/docker-registry", "--version"]),
    }


def run_and_report(
    name: str, measure: Callable[[], dict[str, Any]], format_table: Callable[[dict[str, Any]], str]
) -> int:
    """Run a benchmark, print its table and write its figures to results/<name>.json; the exit status."""
    try:
        results = measure()
    except (BenchmarkError, AssertionError) as error:  # AssertionError: a test-support process did not start
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    path = write_results(name, results)
    print()
    print(format_table(results))
    print(f"\nwritten to {path}")
    return 0


def write_results(name: str, results: dict[str, Any]) -> Path:
    path = RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def megabytes(count: int) -> str:
    return f"{count / MB:.2f}"
