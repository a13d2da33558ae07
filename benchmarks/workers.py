"""Scale-out benchmark: one backfill shared by 1 and by 2 workers, beside `skopeo sync`.

The production topology on one machine: PostgreSQL under the Prefect server and under georeg's state,
the deployments of prefect.yaml on the `georeg` process pool, and `prefect worker` processes. The same
primary (`--repositories` repositories, one image each) is backfilled into a fresh, empty secondary:

- with 1 worker, then with 2 workers (the order alternates between `--runs`), the backfill deployment
  splitting the work into `backfill-batch` flow runs of `--batch-size` repositories;
- by `skopeo sync` of every repository in one process, as the reference for what the registries allow.

Each is timed from `prefect deployment run backfill/backfill` (or skopeo's start) until it has finished,
and each secondary must then list every tag with the primary's digest. This machine has 2 cores: both
registries, PostgreSQL, the Prefect server and every worker share them, which is what the ratio shows.

    .venv/bin/python -m benchmarks.workers [--repositories 40] [--batch-size 10] [--runs 1]
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks.backfill import SKOPEO_SYNC, gzip_layer
from benchmarks.common import (
    BenchmarkError,
    check_listing,
    listing,
    machine,
    quiet_tls_probes,
    run_and_report,
    run_processes,
)
from benchmarks.replicate import BIN, SKOPEO
from tests.support.images import Pusher, build_image
from tests.support.postgres import PostgresServer
from tests.support.registry import RegistryProcess
from tests.support.services import PrefectServer, PrefectWorker, clean_environment, deploy_georeg

NAMESPACE = "fleet"
LAYER_BYTES = (400_000, 100_000, 20_000)  # three layers per image, in stored gzip framing
WORKER_LIMIT = 4  # flow runs at once per worker: the backfill itself takes one
# `prefect deployment run ... --watch` prints "Created flow run 'witty-cat'."
CREATED = re.compile(r"Created flow run '(?P<name>[^']+)'")


@dataclass(frozen=True)
class Sample:
    label: str  # "1 worker", "2 workers" or "skopeo sync x1"
    wall_s: float
    flow_s: float | None  # the backfill flow run's time in Running, from the Prefect server
    batches: int | None  # backfill-batch flow runs the backfill started
    load_1m: float


def push_images(primary: RegistryProcess, repositories: int) -> list[str]:
    names = [f"{NAMESPACE}/app-{index:03d}" for index in range(repositories)]
    with Pusher(primary.url) as pusher:
        for name in names:
            pusher.push_image(name, build_image("docker", layers=[gzip_layer(size) for size in LAYER_BYTES]), "v1")
    return names


class Bench:
    """PostgreSQL, the Prefect server with georeg's deployments, the primary, and the scratch directory."""

    def __init__(self, workdir: Path, postgres: PostgresServer, server: PrefectServer, primary: RegistryProcess):
        self.workdir, self.postgres, self.server, self.primary = workdir, postgres, server, primary
        self.logs = workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.expected = listing(primary.url)
        # The deployments carry GEOREG_CONFIG as deployed: every case rewrites this one file.
        self.config_path = workdir / "georeg.yaml"
        self.environment = clean_environment(
            PREFECT_API_URL=server.api_url, PREFECT_HOME=str(workdir / "prefect"), GEOREG_CONFIG=str(self.config_path)
        )

    def georeg(self, workers: int, batch_size: int, dry_run: bool = False) -> Sample:
        """The backfill deployment into a fresh secondary, on `workers` fresh workers."""
        label = f"{workers} worker{'s' if workers > 1 else ''}{' (warm-up dry run)' if dry_run else ''}"
        with contextlib.ExitStack() as stack:
            secondary = stack.enter_context(RegistryProcess(self.workdir / f"secondary-{uuid.uuid4().hex[:8]}"))
            case = self.configure(secondary, batch_size)
            for number in range(workers):
                worker = PrefectWorker(
                    self.logs / f"worker-{case}-{number}.log",
                    self.environment,
                    name=f"{case}-{number}",
                    limit=WORKER_LIMIT,
                )
                stack.enter_context(worker)
            command = [str(BIN / "prefect"), "--no-prompt", "deployment", "run", "backfill/backfill", "--watch"]
            if dry_run:
                command += ["--param", "dry_run=true"]
            finished = run_processes([command], env=self.environment, log_dir=self.logs, name=case)
            name = _created_flow_run(finished.outputs[0])
            if not dry_run:
                check_listing(self.expected, secondary.url, label)
            flow_s, batches = self.flow_run(name)
        return Sample(label, finished.wall_s, flow_s, batches, finished.load_1m)

    def skopeo(self) -> Sample:
        with RegistryProcess(self.workdir / f"secondary-{uuid.uuid4().hex[:8]}") as secondary:
            source = self.logs / "skopeo-source.yaml"
            source.write_text(
                yaml.safe_dump(
                    {
                        f"127.0.0.1:{self.primary.port}": {
                            "tls-verify": False,
                            "images": {name: [] for name in self.expected},
                        }
                    }
                )
            )
            destination = f"127.0.0.1:{secondary.port}/{NAMESPACE}"
            command = [*SKOPEO_SYNC, "--src", "yaml", str(source), destination]
            finished = run_processes([command], env=self.environment, log_dir=self.logs, name="skopeo")
            check_listing(self.expected, secondary.url, "skopeo sync")
        return Sample("skopeo sync x1", finished.wall_s, None, None, finished.load_1m)

    def configure(self, secondary: RegistryProcess, batch_size: int) -> str:
        """Point georeg.yaml at `secondary` with a fresh state database; returns a name for the case."""
        case = f"case-{uuid.uuid4().hex[:8]}"
        database = self.postgres.create_database(case.replace("-", "_"))
        document = {
            "primary": {"url": self.primary.url},
            "secondaries": [{"name": "bench", "url": secondary.url}],
            "state": {"url": database},
            "backfill": {"batch_size": batch_size},
        }
        self.config_path.write_text(yaml.safe_dump(document, sort_keys=False))
        return case

    def flow_run(self, name: str) -> tuple[float, int]:
        """The backfill run's time in Running, and how many batch flow runs started while it ran."""
        api = self.server.api_url
        response = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"name": {"any_": [name]}}}, timeout=30)
        response.raise_for_status()
        [run] = response.json()
        if run["state_type"] != "COMPLETED":
            raise BenchmarkError(f"backfill flow run {name} ended {run['state_type']}")
        batches = httpx.post(
            f"{api}/flow_runs/filter",
            json={
                "flows": {"name": {"any_": ["backfill-batch"]}},
                "flow_runs": {"start_time": {"after_": run["start_time"], "before_": run["end_time"]}},
            },
            timeout=30,
        )
        batches.raise_for_status()
        return float(run["total_run_time"]), len(batches.json())


def _created_flow_run(output: str) -> str:
    found = CREATED.search(output)
    if found is None:
        raise BenchmarkError(f"no flow run in the output of `prefect deployment run`:\n{output[-2000:]}")
    return found["name"]


def measure(arguments: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        postgres = stack.enter_context(PostgresServer())
        prefect_database = postgres.create_database(f"prefect_{uuid.uuid4().hex[:8]}").rsplit("/", 1)[1]
        server = stack.enter_context(
            PrefectServer(workdir / "prefect", database_url=postgres.url(prefect_database, "asyncpg"))
        )
        primary = stack.enter_context(RegistryProcess(workdir / "primary"))
        started = time.monotonic()
        push_images(primary, arguments.repositories)
        push_s = time.monotonic() - started
        bench = Bench(workdir, postgres, server, primary)
        deploy_georeg(bench.environment)
        warm_up = bench.georeg(1, arguments.batch_size, dry_run=True)  # first imports, server caches
        samples: list[Sample] = []
        for run in range(arguments.runs):
            order = (1, 2) if run % 2 == 0 else (2, 1)
            samples += [bench.georeg(workers, arguments.batch_size) for workers in order]
            samples.append(bench.skopeo())
    return {
        "parameters": {**vars(arguments), "layer_bytes": LAYER_BYTES, "worker_limit": WORKER_LIMIT},
        "machine": machine(),
        "push_s": push_s,
        "warm_up_s": warm_up.wall_s,
        "samples": [asdict(sample) for sample in samples],
    }


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def format_table(results: dict[str, Any]) -> str:
    parameters = results["parameters"]
    by_label: dict[str, list[dict[str, Any]]] = {}
    for sample in results["samples"]:
        by_label.setdefault(sample["label"], []).append(sample)
    one = median([s["wall_s"] for s in by_label["1 worker"]])
    lines = [
        f"Backfill of {parameters['repositories']} repositories (one image of 3 layers each) into an empty secondary, "
        f"batches of {parameters['batch_size']}, median of {parameters['runs']} run(s)",
        f"{'':16} {'wall s':>8} {'flow s':>8} {'batches':>8} {'vs 1 worker':>12} {'load 1m':>8}",
    ]
    for label, samples in by_label.items():
        wall = median([s["wall_s"] for s in samples])
        flows = [s["flow_s"] for s in samples if s["flow_s"] is not None]
        flow = f"{median(flows):8.1f}" if flows else f"{'-':>8}"
        batches = samples[0]["batches"]
        lines.append(
            f"{label:16} {wall:8.1f} {flow} {batches if batches is not None else '-':>8} "
            f"{one / wall:11.2f}x {median([s['load_1m'] for s in samples]):8.1f}"
        )
    lines.append(
        "wall: from `prefect deployment run backfill/backfill --watch` to its end (worker pick-up included); "
        "flow: the backfill flow run in Running"
    )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repositories", type=int, default=40, help="repositories, one image each (default 40)")
    parser.add_argument("--batch-size", type=int, default=10, help="repositories per batch flow run (default 10)")
    parser.add_argument("--runs", type=int, default=1, help="runs of each case, order alternating (default 1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    if min(arguments.repositories, arguments.batch_size, arguments.runs) < 1:
        raise SystemExit("every count must be at least 1")
    for tool in (SKOPEO, BIN / "prefect"):
        if not tool.is_file():
            raise SystemExit(f"{tool} is missing")
    quiet_tls_probes()

    def run() -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="georeg-bench-") as scratch:
            return measure(arguments, Path(scratch))

    return run_and_report("workers", run, format_table)


if __name__ == "__main__":
    sys.exit(main())
