"""Event latency benchmark: from a push to the primary to the image on the secondary, through `georeg serve`.

    python -m benchmarks.event_latency [--images 50] [--modes inline,deployment,events]

For each dispatch mode, a whole site is started on 127.0.0.1: a primary registry whose
notifications (the endpoint of deployments/registry-primary.yml) go to `georeg serve`, a secondary,
and a Prefect server that records the runs. In `deployment` and `events` mode the `georeg` process
work pool is created, `prefect deploy --all` run from the repository root, and one `prefect worker`
started; in `events` mode `georeg automations apply` also creates the trigger that turns the
receiver's `georeg.registry.manifest.pushed` event into a `replicate-image` run (the journal's
fallback is set beyond the benchmark, so every run measured is one the trigger started).

Then --images small images are pushed one after another under distinct tags. Each latency runs from
the moment the manifest PUT returns to the moment the secondary answers HEAD for that tag with the
image's digest (polled every 20 ms, for at most 120 s); the next push starts after that.

A table goes to stdout; the figures and every sample to benchmarks/results/event_latency.json.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks.common import add_prefect_database_argument, start_prefect_server
from georeg.config import DispatchConfig
from tests.support.images import Pusher, build_image
from tests.support.registry import RegistryProcess, free_port
from tests.support.services import (
    REPOSITORY_ROOT,
    BackgroundProcess,
    GeoregServe,
    PrefectWorker,
    WarmEngine,
    clean_environment,
    deploy_georeg,
    georeg_cli,
    wait_until,
)

MODES = ("inline", "deployment", "events")
WORKER_MODES = ("deployment", "events")
REPOSITORY = "bench/latency"
POLL_S = 0.02
TIMEOUT_S = 120.0
SECRET = "benchmark-notification-secret"
POOL = "georeg"
WORKER_COMMAND = ["georeg", "worker", "--pool", POOL]  # as the README starts it (tests.support.services.PrefectWorker)
QUERY_SECONDS = 0.25  # the worker's polling interval, as the README's production setup sets it
WORKER_SETTINGS = {**PrefectWorker.SETTINGS, "PREFECT_WORKER_QUERY_SECONDS": str(QUERY_SECONDS)}
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "event_latency.json"
FLOW_RUNS_METRIC = re.compile(r'^georeg_flow_runs_total\{outcome="(\w+)"\} (\S+)$', re.MULTILINE)


class BenchmarkError(RuntimeError):
    """A site that did not come up, or an image that did not reach the secondary in time."""


# --- the site ------------------------------------------------------------------------------------


@dataclass
class Site:
    primary: RegistryProcess
    secondary: RegistryProcess
    receiver: GeoregServe
    worker: BackgroundProcess | None
    api_url: str
    state_db: Path
    server_log: Path

    def logs(self) -> str:
        worker = f"\n--- worker log ---\n{self.worker.log_tail(20)}" if self.worker else ""
        return f"--- georeg serve log ---\n{self.receiver.log_tail(20)}{worker}"

    def failed_runs(self) -> list[str]:
        """The receiver's log lines about failed runs, which its dispatcher retries with backoff."""
        lines = self.receiver.log_path.read_text(errors="replace").splitlines()
        return [line for line in lines if "failed (attempt" in line]

    def flow_runs(self) -> dict[str, float]:
        """The receiver's count of finished flow runs by outcome (from its /metrics)."""
        text = httpx.get(f"{self.receiver.url}/metrics", timeout=5).text
        return {outcome: float(count) for outcome, count in FLOW_RUNS_METRIC.findall(text)}


def notification_endpoint(receiver_url: str) -> dict[str, Any]:
    """deployments/registry-primary.yml's notification endpoint, pointed at this receiver and secret."""
    config = yaml.safe_load((REPOSITORY_ROOT / "deployments" / "registry-primary.yml").read_text())
    [endpoint] = config["notifications"]["endpoints"]
    endpoint["url"] = f"{receiver_url}/api/v4/container_registry_event/events"
    endpoint["headers"]["Authorization"] = [SECRET]
    return endpoint


def write_georeg_config(
    root: Path, primary: str, secondary: str, mode: str, dispatch: dict[str, Any] | None = None
) -> Path:
    """georeg's defaults throughout, except the dispatch mode (and what `dispatch` sets)."""
    config = {
        "primary": {"url": primary},
        "secondaries": [{"name": "secondary", "url": secondary}],
        "notifications": {"secret": SECRET},
        "state": {"url": f"sqlite:///{root / 'georeg.db'}"},
        "dispatch": {"mode": mode, **(dispatch or {})},
    }
    path = root / "georeg.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def worker_count(api_url: str) -> int:
    try:
        response = httpx.post(f"{api_url}/work_pools/{POOL}/workers/filter", json={}, timeout=5)
    except httpx.HTTPError:
        return 0
    return len(response.json()) if response.status_code == 200 else 0


def start_workers(
    stack: contextlib.ExitStack, root: Path, env: dict[str, str], api_url: str, warm: bool, count: int = 1
) -> BackgroundProcess:
    """The work pool, the deployments of prefect.yaml, and `count` workers polling the pool (each with a
    warm engine of its own, as on separate machines); returns the first."""
    deploy_georeg(env)
    workers = []
    for number in range(count):
        home = root / f"worker-{number}"
        home.mkdir(parents=True, exist_ok=True)
        engine = stack.enter_context(WarmEngine(home, env)) if warm else None
        workers.append(
            stack.enter_context(
                PrefectWorker(
                    home / "worker.log",
                    env,
                    name=f"georeg-worker-{number}",
                    warm_engine=engine,
                    query_seconds=QUERY_SECONDS,
                )
            )
        )
    try:
        wait_until(lambda: worker_count(api_url) >= count, deadline=120, what="the workers to register", interval=0.5)
    except AssertionError as error:
        raise BenchmarkError(f"{error}:\n{workers[0].log_tail(20)}") from None
    return workers[0]


@contextlib.contextmanager
def running_site(
    mode: str,
    root: Path,
    prefect_database: str,
    warm: bool,
    *,
    workers: int = 1,
    dispatch: dict[str, Any] | None = None,
    access_log: bool = False,
) -> Iterator[Site]:
    """Every process of one site, stopped in reverse order when the block ends."""
    receiver_port = free_port()
    endpoint = notification_endpoint(f"http://127.0.0.1:{receiver_port}")
    with contextlib.ExitStack() as stack:
        primary = stack.enter_context(RegistryProcess(root / "primary", notifications=[endpoint]))
        secondary = stack.enter_context(RegistryProcess(root / "secondary"))
        server = start_prefect_server(stack, root / "prefect-server", prefect_database, access_log=access_log)
        if mode == "events":  # the trigger starts every run; the dispatcher's fallback must not
            dispatch = {"events_fallback_seconds": 3600, **(dispatch or {})}
        config = write_georeg_config(root, primary.url, secondary.url, mode, dispatch)
        env = clean_environment(
            PREFECT_API_URL=server.api_url,
            PREFECT_HOME=str(root / "prefect-client"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            GEOREG_CONFIG=str(config),
            PWD=str(REPOSITORY_ROOT),
        )
        worker = start_workers(stack, root, env, server.api_url, warm, workers) if mode in WORKER_MODES else None
        if mode == "events":
            georeg_cli(env, "automations", "apply")
        receiver = stack.enter_context(GeoregServe(config, root / "serve.log", env, port=receiver_port))
        yield Site(primary, secondary, receiver, worker, server.api_url, root / "georeg.db", server.log_path)


# --- the measurement -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Push:
    tag: str
    latency_s: float  # manifest PUT answered -> the secondary serves the digest (monotonic clock)
    pushed_at: float  # the same two moments on the wall clock, to line up with the journal and Prefect
    available_at: float


def push_and_wait(site: Site, pusher: Pusher, secondary: Pusher, tag: str) -> Push:
    """From the manifest PUT's answer to the secondary serving the image under `tag`."""
    image = build_image("docker")
    pusher.push_image(REPOSITORY, image, tag)
    pushed, pushed_at = time.monotonic(), time.time()
    try:
        wait_until(
            lambda: secondary.head_manifest(REPOSITORY, tag) == image.digest,
            deadline=TIMEOUT_S,
            what=f"{REPOSITORY}:{tag} on the secondary",
            interval=POLL_S,
        )
    except AssertionError as error:
        raise BenchmarkError(f"{error}\n{site.logs()}") from None
    return Push(tag, time.monotonic() - pushed, pushed_at, time.time())


def measure_mode(mode: str, images: int, root: Path, prefect_database: str, warm: bool) -> dict[str, Any]:
    print(f"{mode}: starting the site", flush=True)
    with (
        running_site(mode, root, prefect_database, warm) as site,
        Pusher(site.primary.url) as pusher,
        Pusher(site.secondary.url) as secondary,
    ):
        pushes = []
        for index in range(1, images + 1):
            pushes.append(push_and_wait(site, pusher, secondary, f"{mode}-{index:03d}"))
            if index % 10 == 0 or index == images:
                print(f"  {mode}: {index}/{images}, last {pushes[-1].latency_s:.3f} s", flush=True)
        load_1m = os.getloadavg()[0]
        # In events mode the receiver starts no runs (Prefect's trigger does): nothing to wait for.
        flow_runs = finished_flow_runs(site, images) if mode != "events" else site.flow_runs()
        failed = site.failed_runs()
        stages = stage_breakdown(site, pushes)
    samples = [push.latency_s for push in pushes]
    samples_s = [round(sample, 4) for sample in samples]
    return {
        **summarise(samples),
        "load_1m_at_end": round(load_1m, 2),
        "stages_median_s": {name: statistics.median(values) for name, values in stages.items() if values},
        "flow_runs": flow_runs,
        "failed_runs_log": failed,
        "samples_s": samples_s,
        "stages_s": stages,
    }


def finished_flow_runs(site: Site, expected: int) -> dict[str, float]:
    """The receiver's flow-run outcomes once `expected` runs have ended (the last may still be verifying)."""
    with contextlib.suppress(AssertionError):
        wait_until(lambda: sum(site.flow_runs().values()) >= expected, deadline=30, what="the last flow runs to end")
    return site.flow_runs()


STAGES = ("delivery", "dispatch", "pickup", "start", "setup", "copy", "seen")


def stage_breakdown(site: Site, pushes: list[Push]) -> dict[str, list[float]]:
    """Where each push's latency went, from timestamps: the journal's (when the receiver wrote the event)
    and the Prefect server's (the flow run's creation and states, its task runs' start and end).

    delivery: PUT answered -> event journaled (the registry's notification, the receiver, the journal write);
    dispatch: journaled -> flow run created (the dispatcher's pick-up and the Prefect API call);
    pickup:   created -> Pending, the worker took it (deployment mode only);
    start:    -> Running: the flow-run process started, imported Prefect and georeg, loaded the flow
              (deployment), or the in-process run was set up (inline);
    setup:    Running -> the first task started (config, clients, the flow's own start);
    copy:     first task start -> the copy-image task ended (resolve, blobs, manifests: the image is there);
    seen:     copy-image ended -> the benchmark's HEAD saw it (polling granularity, 20 ms).
    """
    with sqlite3.connect(site.state_db) as database:
        journaled = dict(database.execute("SELECT reference, received_at FROM georeg_events"))
    names = [f"replicate {REPOSITORY}:{push.tag}" for push in pushes]
    with httpx.Client(base_url=site.api_url, timeout=30) as api:
        runs = api.post("/flow_runs/filter", json={"flow_runs": {"name": {"any_": names}}}).json()
        by_name: dict[str, dict[str, Any]] = {}
        for run in sorted(runs, key=lambda run: run["created"]):
            by_name.setdefault(run["name"], run)  # the first run of an image is the one its latency waited for
        stages: dict[str, list[float]] = {stage: [] for stage in STAGES}
        for push in pushes:
            run = by_name.get(f"replicate {REPOSITORY}:{push.tag}")
            if run is None or push.tag not in journaled:
                continue
            states = api.get("/flow_run_states/", params={"flow_run_id": run["id"]}).json()
            entered: dict[str, float] = {}
            for moment, kind in sorted((_epoch(state["timestamp"]), state["type"]) for state in states):
                entered.setdefault(kind, moment)  # the first time the run entered each state
            task_runs = api.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [run["id"]]}}}).json()
            starts = [_epoch(task["start_time"]) for task in task_runs if task.get("start_time")]
            manifests_put = [
                _epoch(task["end_time"])
                for task in task_runs
                if task["name"].startswith("copy ") and task.get("end_time")
            ]
            if "RUNNING" not in entered or not starts or not manifests_put:
                continue
            created = _epoch(run["created"])
            moments = [push.pushed_at, journaled[push.tag], created]
            moments += [entered.get("PENDING", created), entered["RUNNING"], min(starts), max(manifests_put)]
            moments.append(push.available_at)
            for stage, (start, end) in zip(STAGES, itertools.pairwise(moments), strict=True):
                stages[stage].append(round(end - start, 4))
    return stages


def _epoch(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def summarise(samples: list[float]) -> dict[str, Any]:
    p95 = statistics.quantiles(samples, n=20, method="inclusive")[18] if len(samples) > 1 else samples[0]
    return {
        "images": len(samples),
        "min_s": min(samples),
        "p50_s": statistics.median(samples),
        "p95_s": p95,
        "max_s": max(samples),
        "mean_s": statistics.fmean(samples),
        "first_s": samples[0],
    }


def settings(modes: list[str]) -> dict[str, Any]:
    dispatch = DispatchConfig()
    used: dict[str, Any] = {
        "poll_interval_s": POLL_S,
        "timeout_s": TIMEOUT_S,
        "dispatch": {"poll_seconds": dispatch.poll_seconds, "concurrency": dispatch.concurrency},
        "notification_endpoint": {k: v for k, v in notification_endpoint("").items() if k in ("timeout", "backoff")},
    }
    if set(modes) & set(WORKER_MODES):
        used["worker"] = {"command": " ".join(WORKER_COMMAND), "pool_type": "process", "env": WORKER_SETTINGS}
    return used


def benchmark(images: int, modes: list[str], prefect_database: str, warm: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for mode in modes:
        with tempfile.TemporaryDirectory(prefix=f"georeg-latency-{mode}-") as scratch:
            try:
                results[mode] = measure_mode(mode, images, Path(scratch), prefect_database, warm)
            except (BenchmarkError, AssertionError) as error:  # AssertionError: a service did not start
                print(f"{mode} failed: {error}", file=sys.stderr, flush=True)
                results[mode] = {"error": str(error)}
    return {
        "benchmark": "event_latency",
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "parameters": {"images": images, "modes": modes, "prefect_database": prefect_database, "warm_engine": warm},
        "settings": settings(modes),
        "modes": results,
    }


# --- reporting -----------------------------------------------------------------------------------


def format_table(results: dict[str, Any]) -> str:
    lines = [
        "Push -> secondary latency, seconds (manifest PUT answered -> secondary HEAD serves the digest;"
        f" polled every {POLL_S * 1000:.0f} ms)",
        f"{'mode':<11} {'images':>6} {'min':>7} {'p50':>7} {'p95':>7} {'max':>7} {'first':>7}  flow runs",
    ]
    for mode, figures in results["modes"].items():
        if "error" in figures:
            lines.append(f"{mode:<11} FAILED: {figures['error'].splitlines()[0]}")
            continue
        runs = ", ".join(f"{outcome} {count:.0f}" for outcome, count in figures["flow_runs"].items()) or "-"
        values = " ".join(f"{figures[key]:>7.3f}" for key in ("min_s", "p50_s", "p95_s", "max_s", "first_s"))
        lines.append(f"{mode:<11} {figures['images']:>6} {values}  {runs}")
    lines.append("")
    header = "  ".join(f"{stage:>8}" for stage in STAGES)
    lines.append(f"{'median per stage, seconds (see stage_breakdown)':<48}{header}  load")
    for mode, figures in results["modes"].items():
        if "stages_median_s" in figures:
            medians = figures["stages_median_s"]
            values = "  ".join(f"{medians[stage]:>8.3f}" if stage in medians else f"{'-':>8}" for stage in STAGES)
            lines.append(f"{mode:<48}{values}  {figures['load_1m_at_end']:.2f}")
    for mode, figures in results["modes"].items():
        if figures.get("failed_runs_log"):
            lines.append(
                f"{mode}: {len(figures['failed_runs_log'])} failed run(s), first: {figures['failed_runs_log'][0]}"
            )
    used = results["settings"]
    lines.append(
        f"dispatch: poll_seconds {used['dispatch']['poll_seconds']}, concurrency {used['dispatch']['concurrency']}; "
        f"Prefect server on {results['parameters']['prefect_database']}"
    )
    if "worker" in used:
        worker = used["worker"]
        env = " ".join(f"{key}={value}" for key, value in worker["env"].items())
        warm = "with `georeg warm-engine`" if results["parameters"].get("warm_engine") else "no warm engine"
        lines.append(f"worker: `{worker['command']}` ({worker['pool_type']} pool, {warm}), {env}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.event_latency", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=50, help="images pushed per mode (default 50)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated dispatch modes (default: all three)")
    add_prefect_database_argument(parser)
    parser.add_argument(
        "--warm-engine",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="deployment mode: the worker's flow runs start from `georeg warm-engine` (default: yes)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    modes = [mode.strip() for mode in arguments.modes.split(",") if mode.strip()]
    if arguments.images < 1 or not modes or set(modes) - set(MODES):
        raise SystemExit(f"--images must be at least 1 and --modes a list of {', '.join(MODES)}")
    results = benchmark(arguments.images, modes, arguments.prefect_database, arguments.warm_engine)
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(format_table(results))
    print(f"\nwritten to {RESULTS_PATH}")
    return 1 if any("error" in figures for figures in results["modes"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
