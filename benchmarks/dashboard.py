"""Dashboard benchmark: what building a secondary's dashboard costs at 10^4 and 10^5 repositories.

    python -m benchmarks.dashboard [--sizes 10000,100000] [--runs 5] [--database sqlite|postgresql|both]

For each size, a fresh state database (SQLite in a temporary directory; PostgreSQL on a server of its
own, started as the tests start it) gets that many repositories of one secondary: 1% failed, 1%
pending, the rest synced, half of them verified. Then, --runs times each, the median of:

- `secondary_status` with the dashboard's 20 failures (the counts by `GROUP BY`, the latest failures,
  the oldest owed event, the last runs) and `render_dashboard`: what a backfill's end now pays;
- loading every row of the secondary, as `georeg status` did before it counted in SQL, for comparison.

Nothing here talks to Prefect: creating the artifact is one API request whatever the size (the
markdown's size is reported). A table goes to stdout; the figures to benchmarks/results/dashboard.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks.common import machine, run_and_report
from georeg.config import GeoregConfig, load_config
from georeg.dashboard import FAILURES_LISTED, render_dashboard
from georeg.state import StateStore
from georeg.state.sync import FAILED, PENDING, SYNCED, VERIFIED
from georeg.status import secondary_status
from tests.support.postgres import PostgresServer

SECONDARY = "east"
_ROWS_PER_CALL = 5_000  # one transaction each while filling


async def _fill(store: StateStore, size: int) -> None:
    names = [f"group{number % 100}/app{number}" for number in range(size)]
    failed, pending, synced = names[: size // 100], names[size // 100 : size // 50], names[size // 50 :]
    now = time.time()
    failure = {"retry_count": 3, "retry_at": now + 600, "last_failure": "tag v1: 400 MANIFEST_INVALID " * 4}
    for part, values in (
        (synced[: len(synced) // 2], {"state": SYNCED, "verification": VERIFIED, "last_synced_at": now}),
        (synced[len(synced) // 2 :], {"state": SYNCED, "last_synced_at": now}),
        (pending, {"state": PENDING}),
        (failed, {"state": FAILED, **failure}),
    ):
        for start in range(0, len(part), _ROWS_PER_CALL):
            await store.sync.set_repository_states(SECONDARY, part[start : start + _ROWS_PER_CALL], **values)


async def _median(runs: int, step: Callable[[], Awaitable[Any]]) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        await step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def _measure_one(config: GeoregConfig, size: int, runs: int) -> dict[str, Any]:
    store = StateStore(config.state.url)
    try:
        await store.ensure_schema()
        filled = time.perf_counter()
        await _fill(store, size)
        fill_s = time.perf_counter() - filled
        markdown = ""

        async def dashboard() -> None:
            nonlocal markdown
            entry = await secondary_status(config, store, config.secondaries[0], failures_shown=FAILURES_LISTED)
            markdown = render_dashboard(entry, "now")

        async def every_row() -> None:
            states = await store.sync.repository_states(SECONDARY)
            Counter(state.state for state in states.values())

        dashboard_s = await _median(runs, dashboard)
        every_row_s = await _median(runs, every_row)
    finally:
        await store.close()
    return {
        "repositories": size,
        "fill_s": round(fill_s, 2),
        "dashboard_s": round(dashboard_s, 4),
        "every_row_s": round(every_row_s, 4),
        "markdown_bytes": len(markdown.encode()),
    }


def _config(directory: Path, state_url: str) -> GeoregConfig:
    path = directory / "georeg.yaml"
    path.write_text(
        f"primary: {{url: http://127.0.0.1:5000}}\nsecondaries: [{{name: {SECONDARY}, url: http://127.0.0.1:5001}}]\n"
        f"state: {{url: '{state_url}'}}\n"
    )
    return load_config(path)


def measure(sizes: list[int], runs: int, databases: list[str]) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    with ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="georeg-dashboard-bench-")))
        postgres = stack.enter_context(PostgresServer()) if "postgresql" in databases else None
        for database in databases:
            for size in sizes:
                if postgres is not None and database == "postgresql":
                    url = postgres.create_database(f"dashboard_{size}")
                else:
                    url = f"sqlite:///{directory / f'state-{size}.db'}"
                figures = asyncio.run(_measure_one(_config(directory, url), size, runs))
                results.append({"database": database, **figures})
                print(f"{database} {size}: {figures}", flush=True)
    return {"machine": machine(), "runs": runs, "results": results}


def format_table(results: dict[str, Any]) -> str:
    lines = [
        f"median of {results['runs']} runs",
        f"{'database':<11} {'repositories':>12} {'dashboard s':>12} {'every row s':>12} {'markdown B':>11}",
    ]
    for row in results["results"]:
        lines.append(
            f"{row['database']:<11} {row['repositories']:>12} {row['dashboard_s']:>12.4f} "
            f"{row['every_row_s']:>12.4f} {row['markdown_bytes']:>11}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="repositories per run, comma-separated")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per size; the median is reported")
    parser.add_argument("--database", choices=["sqlite", "postgresql", "both"], default="both")
    arguments = parser.parse_args()
    sizes = [int(size) for size in arguments.sizes.split(",")]
    databases = ["sqlite", "postgresql"] if arguments.database == "both" else [arguments.database]
    return run_and_report("dashboard", lambda: measure(sizes, arguments.runs, databases), format_table)


if __name__ == "__main__":
    raise SystemExit(main())
