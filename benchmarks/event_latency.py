"""Event latency benchmark: from a push to the primary to the image on the secondary, through `georeg serve`.

    python -m benchmarks.event_latency [--images 50] [--modes inline,deployment]

For each dispatch mode, a whole site is started on 127.0.0.1: a primary registry whose
notifications (the endpoint of deployments/registry-primary.yml) go to `georeg serve`, a secondary,
and a Prefect server that records the runs. In `deployment` mode the `georeg` process work pool is
created, `prefect deploy --all` run from the repository root, and one `prefect worker` started.

Then --images small images are pushed one after another under distinct tags. Each latency runs from
the moment the manifest PUT returns to the moment the secondary answers HEAD for that tag with the
image's digest (polled every 20 ms, for at most 120 s); the next push starts after that.

A table goes to stdout; the figures and every sample to benchmarks/results/event_latency.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
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

from georeg.config import DispatchConfig
from tests.support.images import Pusher, build_image
from tests.support.registry import RegistryProcess, free_port
from tests.support.services import (
    REPOSITORY_ROOT,
    BackgroundProcess,
    GeoregServe,
    PrefectServer,
    PrefectWorker,
    clean_environment,
    deploy_georeg,
    wait_until,
)

MODES = ("inline", "deployment")
REPOSITORY = "bench/latency"
POLL_S = 0.02
TIMEOUT_S = 120.0
SECRET = "benchmark-notification-secret"
POOL = "georeg"
WORKER_COMMAND = [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL]
WORKER_SETTINGS = {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
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


def write_georeg_config(root: Path, primary: str, secondary: str, mode: str) -> Path:
    """georeg's defaults throughout, except the dispatch mode."""
    config = {
        "primary": {"url": primary},
        "secondaries": [{"name": "secondary", "url": secondary}],
        "notifications": {"secret": SECRET},
        "state": {"url": f"sqlite:///{root / 'georeg.db'}"},
        "dispatch": {"mode": mode},
    }
    path = root / "georeg.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def worker_registered(api_url: str) -> bool:
    try:
        response = httpx.post(f"{api_url}/work_pools/{POOL}/workers/filter", json={}, timeout=5)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and bool(response.json())


def start_worker(stack: contextlib.ExitStack, root: Path, env: dict[str, str], api_url: str) -> BackgroundProcess:
    """The work pool, the deployments of prefect.yaml, and one worker polling the pool."""
    deploy_georeg(env)
    worker = stack.enter_context(PrefectWorker(root / "worker.log", env))
    try:
        wait_until(lambda: worker_registered(api_url), deadline=120, what="the worker to register", interval=0.5)
    except AssertionError as error:
        raise BenchmarkError(f"{error}:\n{worker.log_tail(20)}") from None
    return worker


@contextlib.contextmanager
def running_site(mode: str, root: Path) -> Iterator[Site]:
    """Every process of one site, stopped in reverse order when the block ends."""
    receiver_port = free_port()
    endpoint = notification_endpoint(f"http://127.0.0.1:{receiver_port}")
    with contextlib.ExitStack() as stack:
        primary = stack.enter_context(RegistryProcess(root / "primary", notifications=[endpoint]))
        secondary = stack.enter_context(RegistryProcess(root / "secondary"))
        server = stack.enter_context(PrefectServer(root / "prefect-server"))
        config = write_georeg_config(root, primary.url, secondary.url, mode)
        env = clean_environment(
            PREFECT_API_URL=server.api_url,
            PREFECT_HOME=str(root / "prefect-client"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            GEOREG_CONFIG=str(config),
            PWD=str(REPOSITORY_ROOT),
        )
        worker = start_worker(stack, root, env, server.api_url) if mode == "deployment" else None
        receiver = stack.enter_context(GeoregServe(config, root / "serve.log", env, port=receiver_port))
        yield Site(primary, secondary, receiver, worker)


# --- the measurement -----------------------------------------------------------------------------


def push_and_wait(site: Site, pusher: Pusher, secondary: Pusher, tag: str) -> float:
    """Seconds from the manifest PUT's answer to the secondary serving the image under `tag`."""
    image = build_image("docker")
    pusher.push_image(REPOSITORY, image, tag)
    pushed = time.monotonic()
    try:
        wait_until(
            lambda: secondary.head_manifest(REPOSITORY, tag) == image.digest,
            deadline=TIMEOUT_S,
            what=f"{REPOSITORY}:{tag} on the secondary",
            interval=POLL_S,
        )
    except AssertionError as error:
        raise BenchmarkError(f"{error}\n{site.logs()}") from None
    return time.monotonic() - pushed


def measure_mode(mode: str, images: int, root: Path) -> dict[str, Any]:
    print(f"{mode}: starting the site", flush=True)
    with (
        running_site(mode, root) as site,
        Pusher(site.primary.url) as pusher,
        Pusher(site.secondary.url) as secondary,
    ):
        samples = []
        for index in range(1, images + 1):
            samples.append(push_and_wait(site, pusher, secondary, f"{mode}-{index:03d}"))
            if index % 10 == 0 or index == images:
                print(f"  {mode}: {index}/{images}, last {samples[-1]:.3f} s", flush=True)
        flow_runs, failed = finished_flow_runs(site, images), site.failed_runs()
    samples_s = [round(sample, 4) for sample in samples]
    return {**summarise(samples), "flow_runs": flow_runs, "failed_runs_log": failed, "samples_s": samples_s}


def finished_flow_runs(site: Site, expected: int) -> dict[str, float]:
    """The receiver's flow-run outcomes once `expected` runs have ended (the last may still be verifying)."""
    with contextlib.suppress(AssertionError):
        wait_until(lambda: sum(site.flow_runs().values()) >= expected, deadline=30, what="the last flow runs to end")
    return site.flow_runs()


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
    if "deployment" in modes:
        used["worker"] = {"command": " ".join(WORKER_COMMAND[2:]), "pool_type": "process", "env": WORKER_SETTINGS}
    return used


def benchmark(images: int, modes: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for mode in modes:
        with tempfile.TemporaryDirectory(prefix=f"georeg-latency-{mode}-") as scratch:
            try:
                results[mode] = measure_mode(mode, images, Path(scratch))
            except (BenchmarkError, AssertionError) as error:  # AssertionError: a service did not start
                print(f"{mode} failed: {error}", file=sys.stderr, flush=True)
                results[mode] = {"error": str(error)}
    return {
        "benchmark": "event_latency",
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "parameters": {"images": images, "modes": modes},
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
    for mode, figures in results["modes"].items():
        if figures.get("failed_runs_log"):
            lines.append(
                f"{mode}: {len(figures['failed_runs_log'])} failed run(s), first: {figures['failed_runs_log'][0]}"
            )
    used = results["settings"]
    lines.append(
        f"dispatch: poll_seconds {used['dispatch']['poll_seconds']}, concurrency {used['dispatch']['concurrency']}"
    )
    if "worker" in used:
        worker = used["worker"]
        env = " ".join(f"{key}={value}" for key, value in worker["env"].items())
        lines.append(f"worker: `{worker['command']}` ({worker['pool_type']} pool), {env}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.event_latency", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=50, help="images pushed per mode (default 50)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated dispatch modes (default: both)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    modes = [mode.strip() for mode in arguments.modes.split(",") if mode.strip()]
    if arguments.images < 1 or not modes or set(modes) - set(MODES):
        raise SystemExit(f"--images must be at least 1 and --modes a list of {', '.join(MODES)}")
    results = benchmark(arguments.images, modes)
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(format_table(results))
    print(f"\nwritten to {RESULTS_PATH}")
    return 1 if any("error" in figures for figures in results["modes"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
