"""No-op backfill benchmark: what a pass costs per tag when nothing (or 1% of the tags) changed.

    python -m benchmarks.noop [--repositories 300] [--tags 10] [--runs 2]

The primary and the secondary get the same images pushed to both (--repositories x --tags, one small
layer per repository, an image per tag), so no copy is needed to start. Then `georeg backfill` runs,
each case --runs times, in this process against Prefect's test server (SQLite; no process start-up
in the figures), the table showing the median time of the flow call per tag:

- `HEADs, no record`: georeg's records are cleared before each run, so every tag is HEADed on both
  sides, as every pass did before georeg kept them (the run also writes the records);
- `record, primary by HEAD`: the secondary's tags come from the record; the primary's config has no
  `storage:` block, so its tags are listed and HEADed;
- `record, primary storage`: the same with the primary's `storage:` block (its file system);
- `1% resync, ...`: 1% of the tags retagged on the primary to new images before each run, copied.

After every run the secondary's tag -> digest listing must equal the primary's, or the benchmark fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import BenchmarkError, check_listing, listing, machine, run_and_report
from tests.support.images import DOCKER_LAYER, Pusher, build_image, random_blob
from tests.support.registry import RegistryProcess

NAMESPACE = "noop"
LAYER_BYTES = 512
RESYNC_SHARE = 0.01
PUSH_THREADS = 4
# georeg's targets at 10,000 x 10 (a reference, not asserted): ms per tag, and a 1% resync's extra s.
TARGET_STORAGE_MS, TARGET_HEADS_MS, TARGET_RESYNC_EXTRA_S = 0.5, 3.0, 20.0
CASES = (
    ("HEADs, no record", "heads", False),
    ("record, primary by HEAD", "heads", True),
    ("record, primary storage", "storage", True),
    ("1% resync, primary by HEAD", "heads", True),
    ("1% resync, primary storage", "storage", True),
)


def push_everywhere(registries: list[RegistryProcess], repositories: int, tags: int) -> list[str]:
    """The same images to every registry: one small layer per repository, a unique image per tag."""
    names = [f"{NAMESPACE}/repo-{index:04d}" for index in range(repositories)]

    def push(name: str) -> None:
        layer = random_blob(LAYER_BYTES, DOCKER_LAYER)
        images = [build_image("docker", layers=[layer]) for _ in range(tags)]
        for registry in registries:
            with Pusher(registry.url) as pusher:
                for number, image in enumerate(images):
                    pusher.push_image(name, image, f"v{number}")

    with ThreadPoolExecutor(PUSH_THREADS) as threads:
        list(threads.map(push, names))
    return names


def retag(primary: RegistryProcess, names: list[str], tags: int, share: float, round_: int) -> int:
    """Move `share` of the tags (spread over the repositories) to new images on the primary."""
    count = max(1, round(len(names) * tags * share))
    with Pusher(primary.url) as pusher:
        for index in range(count):
            name = names[(index * 7 + round_) % len(names)]
            pusher.push_image(name, build_image("docker", layer_sizes=[LAYER_BYTES]), f"v{(index + round_) % tags}")
    return count


def write_config(path: Path, primary: RegistryProcess, secondary: RegistryProcess, state: Path, storage: bool) -> Path:
    block: dict[str, Any] = {"url": primary.url}
    if storage:
        block["storage"] = primary.config["storage"]
    config = {
        "primary": block,
        "secondaries": [{"name": "bench", "url": secondary.url}],
        "state": {"url": f"sqlite:///{state}"},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def forget_records(state: Path) -> None:
    with contextlib.closing(sqlite3.connect(state)) as database, database:
        database.execute("UPDATE georeg_repositories SET written_tags = NULL, checked_at = NULL")


def run_backfill(config: Path) -> float:
    """One `backfill` flow run in this process; its wall time. A failed run fails the benchmark."""
    from georeg.flows.backfill import backfill

    os.environ["GEOREG_CONFIG"] = str(config)
    started = time.monotonic()
    [summary] = asyncio.run(backfill())
    seconds = time.monotonic() - started
    if summary["failed"]:
        raise BenchmarkError(f"the backfill failed: {summary['failures']}")
    return seconds


def measure(arguments: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from prefect.testing.utilities import prefect_test_harness

    with contextlib.ExitStack() as stack:
        stack.enter_context(prefect_test_harness(server_startup_timeout=600))
        primary = stack.enter_context(RegistryProcess(workdir / "primary"))
        secondary = stack.enter_context(RegistryProcess(workdir / "secondary"))
        started = time.monotonic()
        names = push_everywhere([primary, secondary], arguments.repositories, arguments.tags)
        print(f"pushed {len(names)} x {arguments.tags} to both registries in {time.monotonic() - started:.0f} s")
        state = workdir / "georeg.db"
        configs = {
            kind: write_config(workdir / f"georeg-{kind}.yaml", primary, secondary, state, kind == "storage")
            for kind in ("heads", "storage")
        }
        tags = len(names) * arguments.tags
        run_backfill(configs["heads"])  # the Prefect server learns the flow; the records are written
        cases: list[dict[str, Any]] = []
        for label, kind, keep_records in CASES:
            seconds, retagged = [], 0
            for run in range(arguments.runs):
                if not keep_records:
                    forget_records(state)
                if label.startswith("1%"):
                    retagged = retag(primary, names, arguments.tags, RESYNC_SHARE, len(cases) * 10 + run)
                seconds.append(run_backfill(configs[kind]))
                check_listing(listing(primary.url), secondary.url, label)
            flow_s = statistics.median(seconds)
            cases.append(
                {"case": label, "flow_s": round(flow_s, 2), "ms_per_tag": round(flow_s / tags * 1000, 3)}
                | ({"tags_retagged": retagged} if retagged else {})
            )
            print(f"  {label}: {flow_s:.2f} s ({flow_s / tags * 1000:.3f} ms per tag); runs {seconds}", flush=True)
    return {"tags": tags, "cases": cases}


def benchmark(arguments: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="georeg-noop-") as scratch:
        figures = measure(arguments, Path(scratch))
    return {
        "benchmark": "noop",
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - started, 1),
        "machine": machine(),
        "parameters": vars(arguments),
        **figures,
    }


def format_table(results: dict[str, Any]) -> str:
    parameters = results["parameters"]
    lines = [
        f"no-op backfill of {parameters['repositories']} repositories x {parameters['tags']} tags "
        f"({results['tags']} tags), median of {parameters['runs']} runs of the flow call",
        "",
        f"{'case':<30} {'flow s':>8} {'ms per tag':>11}",
    ]
    lines += [f"{case['case']:<30} {case['flow_s']:>8.2f} {case['ms_per_tag']:>11.3f}" for case in results["cases"]]
    lines.append(
        f"\nasked at 10,000 x 10: <= {TARGET_STORAGE_MS} ms per tag with the primary's storage, "
        f"<= {TARGET_HEADS_MS} ms without; a 1% resync at most {TARGET_RESYNC_EXTRA_S:g} s over the no-op"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.noop", description=__doc__.split("\n")[0])
    parser.add_argument("--repositories", type=int, default=300, help="repositories (default 300)")
    parser.add_argument("--tags", type=int, default=10, help="tags per repository (default 10)")
    parser.add_argument("--runs", type=int, default=2, help="runs per case; the table shows medians (default 2)")
    arguments = parser.parse_args(argv)
    if min(arguments.repositories, arguments.tags, arguments.runs) < 1:
        raise SystemExit("every count must be at least 1")
    return run_and_report("noop", lambda: benchmark(arguments), format_table)


if __name__ == "__main__":
    sys.exit(main())
