"""Scale benchmark: georeg against a primary the size of a real one, written straight into its storage.

    python -m benchmarks.scale [--repos 2000] [--tags 10] [--wide 2] [--wide-tags 3000] [--index-every 20]
                               [--change-percent 1] [--skopeo-tags 200] [--seed 0] [--prefilled] [--skip PHASES]
                               [--prefect-database postgres|sqlite] [--workdir DIR] [--keep]

The primary is written into a filesystem root in distribution's layout (tests/support/registry_layout.py:
tags sharing layers within a repository, bases shared across repositories, multi-arch indexes, nested
names, --wide repositories of --wide-tags tags), and a real registry serves it. Against an empty
secondary registry on filesystem storage and a Prefect server, in one run, the real `georeg` CLI:

  cold     `georeg backfill` into the empty secondary
  noop     `georeg backfill` again, nothing changed, georeg given the primary's `storage:` block
  noop-heads  the same without the storage block: the primary's tags are HEADed
  resync   `georeg backfill` (storage given) after --change-percent of the tags were moved, added or deleted
  verify   `georeg verify`

With --prefilled the secondary's root is written with the same content as the primary's before its
registry starts, and the first phase is `first` instead of `cold`: a pass that finds every tag already
there and writes georeg's records. That measures the no-op at 10,000 x 10 without the hours a cold
copy of 100,000 tags takes on 2 cores.

For each: wall time, milliseconds per tag, peak RSS of the georeg process, requests each registry
answered (their access logs) and the CPU seconds each registry process spent, Prefect flow and task
runs created, the state database's size, failed repositories (`georeg status --json`) and tags that
differ between the two storages afterwards.
Then, for reference, `skopeo sync` copies a sample of the same tags into another empty registry.
A table goes to stdout, every figure to benchmarks/results/scale.json. The full size to measure is
`--repos 10000 --tags 10`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks.backfill import SKOPEO_SYNC
from benchmarks.common import (
    BenchmarkError,
    add_prefect_database_argument,
    georeg_command,
    machine,
    run_and_report,
    start_prefect_server,
    write_georeg_config,
)
from benchmarks.replicate import BIN, MB, SKOPEO, prefect_env, run_timed
from tests.support.images import Pusher
from tests.support.registry import RegistryProcess
from tests.support.registry_layout import Listing, Shape, mutate, read_tags, write_primary

PHASES = ("cold", "first", "noop", "noop-heads", "resync", "verify")
SKIPPABLE = PHASES[2:]
# One line per request in the registry's access log: `... "HEAD /v2/app1/blobs/sha256:... HTTP/1.1" 200 ...`.
ACCESS_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3}) ')
# The registries' own log at warnings only: the access log stays, the per-request info lines go.
QUIET_REGISTRY = {"log": {"level": "warn"}}
RUNS_SETTLED_S = 30.0
PHASE_TIMEOUT_S = 6 * 3600.0  # a cold backfill of 100,000 tags on a busy machine


class RequestLog:
    """Requests a registry answered, read from its access log: counted without a proxy in the way."""

    def __init__(self, registry: RegistryProcess) -> None:
        self.path = registry.log_path
        self.offset = 0

    def mark(self) -> None:
        self.offset = self.path.stat().st_size

    def since_mark(self) -> dict[str, Any]:
        kinds: Counter[str] = Counter()
        statuses: Counter[str] = Counter()
        with self.path.open("r", errors="replace") as log:  # line by line: a million requests make a big log
            log.seek(self.offset)
            for line in log:
                found = ACCESS_LINE.search(line)
                if found is not None:
                    kinds[f"{found['method']} {_kind(found['path'])}"] += 1
                    statuses[found["status"][0] + "xx"] += 1
        return {"total": sum(kinds.values()), "by_kind": dict(sorted(kinds.items())), "by_status": dict(statuses)}


def _kind(path: str) -> str:
    for marker, kind in (("/blobs/uploads/", "uploads"), ("/blobs/", "blobs"), ("/manifests/", "manifests")):
        if marker in path:
            return kind
    return "tags" if path.split("?")[0].endswith("/tags/list") else "catalog" if "_catalog" in path else "other"


def run_counts(api_url: str) -> tuple[int, int]:
    """Flow runs and task runs the Prefect server holds, once the count stops moving (task-run records
    arrive over Prefect's events websocket, a little after the process that ran them exited)."""
    deadline, last = time.monotonic() + RUNS_SETTLED_S, (-1, -1)
    with httpx.Client(base_url=api_url, timeout=30) as api:
        while True:
            counts = (
                int(api.post("/flow_runs/count", json={}).json()),
                int(api.post("/task_runs/count", json={}).json()),
            )
            if counts == last or time.monotonic() > deadline:
                return counts
            last = counts
            time.sleep(1.0)  # a poll interval: the count is read again until it stands still


def differences(expected: Listing, found: Listing) -> dict[str, Any]:
    """Tags missing, different or extra on the secondary, and repositories only one side has."""
    keys = {(r, t) for r, tags in expected.items() for t in tags} | {(r, t) for r, tags in found.items() for t in tags}
    wrong = sorted(f"{r}:{t}" for r, t in keys if expected.get(r, {}).get(t) != found.get(r, {}).get(t))
    repositories = sorted(set(expected) ^ {r for r, tags in found.items() if tags})
    return {"tags": len(wrong), "first": wrong[:3], "repositories": len(repositories)}


def state_bytes(database: Path) -> int:
    """The SQLite state database with its write-ahead log."""
    files = [database, database.with_name(database.name + "-wal"), database.with_name(database.name + "-shm")]
    return sum(path.stat().st_size for path in files if path.exists())


def storage_root(registry: RegistryProcess) -> Path:
    return Path(registry.config["storage"]["filesystem"]["rootdirectory"])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU a process has used, from /proc (fields 14 and 15 of its stat line)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def disk_kib(path: Path) -> int:
    done = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[0])


class Scale:
    """One run: the primary's root, both registries, the Prefect server, georeg's config and its logs."""

    def __init__(self, arguments: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack) -> None:
        self.arguments, self.workdir = arguments, workdir
        self.logs = workdir / "logs"
        self.logs.mkdir()
        self.shape = Shape(
            arguments.repos,
            arguments.tags,
            wide_repositories=arguments.wide,
            wide_tags=arguments.wide_tags,
            index_every=arguments.index_every,
            seed=arguments.seed,
        )
        started = time.monotonic()
        self.layout = write_primary(workdir / "primary-root", self.shape)
        self.written_s, self.written_files = time.monotonic() - started, self.layout.files
        print(
            f"wrote {self.layout.tag_count} tags in {len(self.layout.tags)} repositories ({self.layout.indexes} "
            f"indexes, {self.layout.files} files) in {self.written_s:.1f} s",
            flush=True,
        )
        secondary_storage = {"filesystem": {"rootdirectory": str(workdir / "secondary-root")}}
        if arguments.prefilled:
            write_primary(workdir / "secondary-root", self.shape)
            print(f"wrote the same into the secondary's root in {time.monotonic() - started:.1f} s", flush=True)
        server = start_prefect_server(stack, workdir / "prefect-server", arguments.prefect_database)
        self.api_url = server.api_url
        storage = {"filesystem": {"rootdirectory": str(self.layout.root)}}
        self.primary = stack.enter_context(
            RegistryProcess(workdir / "primary", storage=storage, extra_config=QUIET_REGISTRY)
        )
        self.secondary = stack.enter_context(
            RegistryProcess(workdir / "secondary", storage=secondary_storage, extra_config=QUIET_REGISTRY)
        )
        self.registries = {"primary": self.primary, "secondary": self.secondary}
        self.requests = {side: RequestLog(registry) for side, registry in self.registries.items()}
        # Both configs share one state database: `heads` only lacks the primary's storage block, so
        # its tags are HEADed instead of read from the storage.
        self.configs = {
            "storage": write_georeg_config(
                workdir / "georeg.yaml", {"url": self.primary.url, "storage": storage}, {"url": self.secondary.url}
            ),
            "heads": write_georeg_config(
                workdir / "georeg-heads.yaml",
                {"url": self.primary.url},
                {"url": self.secondary.url},
                state_database=workdir / "georeg.db",
            ),
        }
        self.config = self.configs["storage"]
        self.env = prefect_env(workdir / "prefect-client", self.api_url)

    def phase(self, name: str, *georeg_arguments: str, primary_storage: bool = True) -> dict[str, Any]:
        """Run one georeg command and gather everything the table shows about it."""
        for log in self.requests.values():
            log.mark()
        flows_before, tasks_before = run_counts(self.api_url)
        cpu_before = {side: cpu_seconds(registry.pid) for side, registry in self.registries.items()}
        command = georeg_command(self.configs["storage" if primary_storage else "heads"], *georeg_arguments)
        timed = run_timed(
            command,
            env=self.env,
            cwd=self.workdir,
            log_path=self.logs / f"{name}.log",
            check=False,
            timeout_s=PHASE_TIMEOUT_S,
        )
        requests = {side: log.since_mark() for side, log in self.requests.items()}
        registry_cpu = {
            side: round(cpu_seconds(registry.pid) - cpu_before[side], 1) for side, registry in self.registries.items()
        }
        flows_after, tasks_after = run_counts(self.api_url)
        if requests["primary"]["total"] == 0:
            raise BenchmarkError(f"{name}: the primary's access log counted no request:\n{self.primary.log_tail()}")
        status = self.status()
        result = {
            "exit_status": timed.status,
            "wall_s": round(timed.wall_s, 2),
            "ms_per_tag": round(1000 * timed.wall_s / self.layout.tag_count, 2),
            "peak_rss_mb": round(timed.peak_rss_mb, 1),
            "requests": requests,
            "registry_cpu_s": registry_cpu,
            "flow_runs": flows_after - flows_before,
            "task_runs": tasks_after - tasks_before,
            "state_db_bytes": state_bytes(self.config.with_suffix(".db")),
            "repositories_failed": status["repositories"]["failed"],
            "failures": [f"{f['repository']}: {f['last_failure']}"[:300] for f in status["failures"][:3]],
            "differences": differences(self.layout.tags, read_tags(storage_root(self.secondary))),
            "output_tail": timed.output.strip().splitlines()[-1:] if timed.output.strip() else [],
        }
        print(
            f"  {name}: exit {timed.status}, {timed.wall_s:.1f} s, {result['ms_per_tag']} ms/tag, "
            f"{result['repositories_failed']} repositories failed, {result['differences']['tags']} tags differ",
            flush=True,
        )
        return result

    def status(self) -> dict[str, Any]:
        done = subprocess.run(
            georeg_command(self.config, "status", "--json"), env=self.env, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise BenchmarkError(f"georeg status failed:\n{done.stderr[-2000:]}")
        [secondary] = json.loads(done.stdout)["secondaries"]
        return secondary

    def skopeo_reference(self) -> dict[str, Any]:
        """`skopeo sync --all` of an even sample of the primary's tags into an empty registry: one process,
        one image after another, as skopeo copies."""
        every = sorted((repository, tag) for repository, tags in self.layout.tags.items() for tag in tags)
        sample = every[:: max(1, len(every) // self.arguments.skopeo_tags)][: self.arguments.skopeo_tags]
        images: dict[str, list[str]] = {}
        for repository, tag in sample:
            images.setdefault(repository, []).append(tag)
        source = self.logs / "skopeo-source.yaml"
        source.write_text(yaml.safe_dump({f"127.0.0.1:{self.primary.port}": {"tls-verify": False, "images": images}}))
        with RegistryProcess(self.workdir / "skopeo-target", extra_config=QUIET_REGISTRY) as target:
            command = [*SKOPEO_SYNC, "--all", "--src", "yaml", str(source), f"127.0.0.1:{target.port}/reference"]
            timed = run_timed(command, env={"PATH": "/usr/bin:/bin"}, cwd=self.workdir, log_path=self.logs / "skopeo")
            with Pusher(target.url) as copied:
                # skopeo puts each repository under the prefix by its last name component (all distinct here).
                wrong = [
                    (r, t)
                    for r, t in sample
                    if copied.head_manifest(f"reference/{r.rsplit('/', 1)[-1]}", t) != self.layout.tags[r][t]
                ]
        if wrong:
            raise BenchmarkError(f"skopeo did not copy {len(wrong)} of {len(sample)} sampled tags, first {wrong[:3]}")
        return {
            "tags": len(sample),
            "wall_s": round(timed.wall_s, 2),
            "ms_per_tag": round(1000 * timed.wall_s / len(sample), 2),
            "peak_rss_mb": round(timed.peak_rss_mb, 1),
        }


def measure(arguments: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        scale = Scale(arguments, workdir, stack)
        first = "first" if arguments.prefilled else "cold"
        phases = {first: scale.phase(first, "backfill", primary_storage=False)}  # every later phase needs it
        if "noop" not in arguments.skip:
            phases["noop"] = scale.phase("noop", "backfill")
        if "noop-heads" not in arguments.skip:
            phases["noop-heads"] = scale.phase("noop-heads", "backfill", primary_storage=False)
        changes = mutate(scale.layout, scale.shape, arguments.change_percent / 100)
        print(f"  changed {len(changes.moved)} tags, added {len(changes.added)}, deleted {len(changes.deleted)}")
        if "resync" not in arguments.skip:
            phases["resync"] = scale.phase("resync", "backfill")
        if "verify" not in arguments.skip:
            phases["verify"] = scale.phase("verify", "verify")
        reference = scale.skopeo_reference()
        sizes = {"primary_kib": disk_kib(scale.layout.root), "secondary_kib": disk_kib(storage_root(scale.secondary))}
    layout = scale.layout
    return {
        "primary": {
            "repositories": len(layout.tags),
            "tags": layout.tag_count,
            "indexes": layout.indexes,
            "blobs": layout.blobs,
            "blob_bytes": layout.blob_bytes,
            "files": scale.written_files,
            "written_s": round(scale.written_s, 1),
            **sizes,
        },
        "changes": {"moved": len(changes.moved), "added": len(changes.added), "deleted": len(changes.deleted)},
        "phases": phases,
        "skopeo": reference,
    }


def benchmark(arguments: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if arguments.keep:
            workdir = Path(tempfile.mkdtemp(prefix="georeg-scale-", dir=arguments.workdir))
            print(f"keeping everything in {workdir}", flush=True)
        else:
            workdir = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="georeg-scale-", dir=arguments.workdir))
            )
        figures = measure(arguments, workdir)
    return {
        "benchmark": "scale",
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - started, 1),
        "machine": machine(),
        "parameters": {key: value for key, value in vars(arguments).items() if key not in ("workdir", "keep")},
        **figures,
    }


def format_table(results: dict[str, Any]) -> str:
    primary, parameters = results["primary"], results["parameters"]
    lines = [
        f"Scale: {primary['repositories']} repositories ({parameters['wide']} of {parameters['wide_tags']} tags, the "
        f"rest of {parameters['tags']}), {primary['tags']} tags, {primary['indexes']} indexes; primary written in "
        f"{primary['written_s']:.0f} s ({primary['files']} files, {primary['primary_kib'] / 1024:.0f} MiB on disk)",
        f"{'phase':<10} {'exit':>4} {'wall s':>8} {'ms/tag':>7} {'RSS MB':>7} {'flows':>5} {'tasks':>6} "
        f"{'primary req':>11} {'5xx':>4} {'secondary req':>13} {'5xx':>4} {'registry CPU s':>14} {'state MB':>8} "
        f"{'failed':>6} {'tags off':>8}",
    ]
    for name, phase in results["phases"].items():
        primary_requests, secondary_requests = phase["requests"]["primary"], phase["requests"]["secondary"]
        cpu = phase["registry_cpu_s"]
        lines.append(
            f"{name:<10} {phase['exit_status']:>4} {phase['wall_s']:>8.1f} {phase['ms_per_tag']:>7.2f} "
            f"{phase['peak_rss_mb']:>7.0f} {phase['flow_runs']:>5} {phase['task_runs']:>6} "
            f"{primary_requests['total']:>11} {primary_requests['by_status'].get('5xx', 0):>4} "
            f"{secondary_requests['total']:>13} {secondary_requests['by_status'].get('5xx', 0):>4} "
            f"{cpu['primary']:>6.1f} / {cpu['secondary']:<5.1f} {phase['state_db_bytes'] / MB:>8.2f} "
            f"{phase['repositories_failed']:>6} {phase['differences']['tags']:>8}"
        )
        lines += [f"        failed: {failure}" for failure in phase["failures"][:2]]
    changes, skopeo = results["changes"], results["skopeo"]
    lines += [
        f"resync after {changes['moved']} tags moved, {changes['added']} added, {changes['deleted']} deleted; "
        "ms/tag is over all the primary's tags",
        f"reference: `skopeo sync --all` of {skopeo['tags']} sampled tags into an empty registry: "
        f"{skopeo['wall_s']:.1f} s, {skopeo['ms_per_tag']:.1f} ms/tag (georeg cold: "
        f"{results['phases'].get('cold', {}).get('ms_per_tag', float('nan')):.1f} ms/tag)",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n")[0])
    parser.add_argument("--repos", type=int, default=2000, help="repositories (default 2000)")
    parser.add_argument("--tags", type=int, default=10, help="tags in each repository but the wide ones (default 10)")
    parser.add_argument("--wide", type=int, default=2, help="repositories with --wide-tags tags (default 2)")
    parser.add_argument("--wide-tags", type=int, default=3000, help="tags in each wide repository (default 3000)")
    parser.add_argument("--index-every", type=int, default=20, help="every n-th image a multi-arch index (default 20)")
    parser.add_argument("--change-percent", type=float, default=1.0, help="tags changed before the resync (default 1)")
    parser.add_argument("--skopeo-tags", type=int, default=200, help="tags skopeo copies for reference (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="the primary's content (default 0)")
    parser.add_argument("--workdir", help="where the scratch directory goes (default: the temporary directory)")
    parser.add_argument(
        "--prefilled",
        action="store_true",
        help="write the secondary with the primary's content first: a `first` pass instead of a cold copy",
    )
    parser.add_argument(
        "--skip",
        type=lambda value: [phase for phase in value.split(",") if phase],
        default=[],
        help=f"phases left out, comma-separated, of {', '.join(SKIPPABLE)} (the first pass always runs)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, roots, state)")
    add_prefect_database_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    if min(arguments.repos, arguments.tags, arguments.skopeo_tags) < 1 or arguments.wide > arguments.repos:
        raise SystemExit("--repos, --tags and --skopeo-tags must be at least 1, and --wide at most --repos")
    if not 0 < arguments.change_percent <= 100:
        raise SystemExit("--change-percent must be above 0 and at most 100")
    if unknown := set(arguments.skip) - set(SKIPPABLE):
        raise SystemExit(f"--skip: no phase {', '.join(sorted(unknown))}; phases: {', '.join(SKIPPABLE)}")
    for tool in (SKOPEO, BIN / "georeg"):
        if not tool.is_file():
            raise SystemExit(f"{tool} is missing")
    return run_and_report("scale", lambda: benchmark(arguments), format_table)


if __name__ == "__main__":
    sys.exit(main())
