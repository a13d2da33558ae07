"""Burst benchmark: many images pushed at once by several clients, through real registry notifications.

    python -m benchmarks.burst [--images 60] [--repositories 20] [--clients 4] [--moves 8] [--singles 10]
                               [--cases inline,deployment-1,deployment-2] [--prefect-database postgres|sqlite]

Each case starts a whole site on 127.0.0.1, as `benchmarks.event_latency` does: a primary registry
whose notifications go to `georeg serve`, a secondary, a Prefect server (with its access log on, to
count API requests) and, in deployment mode, one or two workers with warm engines. A case named
`...-unbatched` runs the same with `dispatch.batch_size: 1` and no wait for pushes by digest: every
item a flow run of its own, as georeg did before bursts were shared.

In each case, one push first warms the site up. Then --singles pushes, one at a time, measure the
latency of a lone push (manifest PUT answered -> secondary serves the digest). Then the burst:
--images images over --repositories repositories (every fourth one a multi-arch index, whose
children are pushed by digest), pushed by --clients clients at once, while one more tag is moved
--moves times. The burst is done when the secondary serves every tag with the primary's digest, the
moved tag with its last one (polled every 50 ms).

For reference, `skopeo copy --all` then copies the same tags from the primary into a fresh registry,
--clients at a time, in the same run.

Reported per case: seconds from the last push to the last image on the secondary; images per second
over the whole burst (first push started -> all on the secondary); Prefect API requests, flow runs
and task runs per image during the burst; lone-push latency p50 and p95; and, in the JSON, each of the
burst's flow runs with its items and when it was created, started and ended, from the last push.
A table goes to stdout; the figures to benchmarks/results/burst.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import add_prefect_database_argument, machine
from benchmarks.event_latency import BenchmarkError, Site, push_and_wait, running_site
from benchmarks.replicate import SKOPEO
from tests.support.images import Image, Pusher, build_image, build_index
from tests.support.registry import RegistryProcess

CASES = ("inline", "deployment-1", "deployment-2", "inline-unbatched", "deployment-2-unbatched")
POLL_S = 0.05
TIMEOUT_S = 300.0
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "burst.json"
UNBATCHED = {"batch_size": 1, "digest_push_delay_seconds": 0}


def parse_case(case: str) -> tuple[str, int, dict[str, Any]]:
    """'deployment-2-unbatched' -> ('deployment', 2 workers, the unbatched dispatch settings)."""
    words = case.split("-")
    mode, workers = words[0], int(words[1]) if len(words) > 1 and words[1].isdigit() else 1
    return mode, workers, UNBATCHED if words[-1] == "unbatched" else {}


def burst_images(images: int, repositories: int, prefix: str) -> list[tuple[str, str, Image]]:
    """(repository, tag, image) for the burst: small images, every fourth repository's first an index."""
    work = []
    for number in range(images):
        repository = f"{prefix}/app{number % repositories}"
        tag = f"t{number // repositories}"
        if number % repositories % 4 == 0 and number < repositories:
            image = build_index([build_image("oci", platform=("linux", arch)) for arch in ("amd64", "arm64")])
        else:
            image = build_image("oci", layer_sizes=[1024, 2048])
        work.append((repository, tag, image))
    return work


def push_all(url: str, work: list[tuple[str, str, Image]], clients: int, moving: list[Image]) -> tuple[float, float]:
    """Push `work` with `clients` threads at once, and move one tag through `moving` meanwhile; returns
    when the first push started and when the last one was answered (wall clock)."""
    started, errors = time.time(), []

    def push(share: list[tuple[str, str, Image]]) -> None:
        try:
            with Pusher(url) as pusher:
                for repository, tag, image in share:
                    pusher.push_image(repository, image, tag)
        except Exception as error:  # reported below, not lost in a thread
            errors.append(error)

    def move() -> None:
        try:
            with Pusher(url) as pusher:
                for image in moving:
                    pusher.push_image("burst/moving", image, "hot")
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=push, args=(work[index::clients],)) for index in range(clients)]
    threads.append(threading.Thread(target=move))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise BenchmarkError(f"a push failed: {errors[0]}")
    return started, time.time()


def wait_converged(site: Site, expected: dict[tuple[str, str], str]) -> float:
    """When the secondary first served every (repository, tag) with its expected digest."""
    missing = dict(expected)
    deadline = time.monotonic() + TIMEOUT_S
    with Pusher(site.secondary.url) as secondary:
        while missing:
            for key in list(missing):
                if _serves(secondary, key) == missing[key]:
                    del missing[key]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise BenchmarkError(f"{len(missing)} images not on the secondary after {TIMEOUT_S:g} s\n{site.logs()}")
            time.sleep(POLL_S)
    return time.time()


def _serves(secondary: Pusher, key: tuple[str, str]) -> str | None:
    """The digest the secondary serves for (repository, tag); None while it answers 500, as registry 2.8
    on filesystem storage does to a read that meets a tag link being rewritten (registry-facts)."""
    try:
        return secondary.head_manifest(*key)
    except httpx.HTTPStatusError as error:
        if error.response.status_code != httpx.codes.INTERNAL_SERVER_ERROR:
            raise
        return None


def api_requests(site: Site) -> int:
    """Requests the Prefect server has answered so far (its access log, one line each)."""
    return sum(1 for line in site.server_log.read_text(errors="replace").splitlines() if 'HTTP/1.1" ' in line)


def runs_so_far(site: Site) -> tuple[int, int]:
    with httpx.Client(base_url=site.api_url, timeout=30) as api:
        return int(api.post("/flow_runs/count", json={}).json()), int(api.post("/task_runs/count", json={}).json())


def run_timeline(site: Site, since: float, last_push: float) -> list[dict[str, Any]]:
    """The flow runs created since `since` (wall clock), in order: their items and when each was created,
    started and ended, in seconds from the last push. Where the time after the last push went."""
    after = datetime.fromtimestamp(since, timezone.utc).isoformat()
    body = {"flow_runs": {"expected_start_time": {"after_": after}}, "sort": "EXPECTED_START_TIME_ASC", "limit": 200}
    with httpx.Client(base_url=site.api_url, timeout=30) as api:
        runs = api.post("/flow_runs/filter", json=body).json()

    def offset(stamp: str | None) -> float | None:
        return None if stamp is None else round(datetime.fromisoformat(stamp).timestamp() - last_push, 2)

    created_since = [run for run in runs if datetime.fromisoformat(run["created"]).timestamp() >= since]
    return [
        {
            "name": run["name"],
            "items": len(run["parameters"].get("items", [])) or 1,
            "created": offset(run["created"]),
            "started": offset(run["start_time"]),
            "ended": offset(run["end_time"]),
            "state": run["state_type"],
        }
        for run in created_since
    ]


def measure_case(case: str, arguments: argparse.Namespace, root: Path) -> dict[str, Any]:
    mode, workers, dispatch = parse_case(case)
    print(f"{case}: starting the site", flush=True)
    with (
        running_site(
            mode, root, arguments.prefect_database, True, workers=workers, dispatch=dispatch, access_log=True
        ) as site,
        Pusher(site.primary.url) as pusher,
        Pusher(site.secondary.url) as secondary,
    ):
        push_and_wait(site, pusher, secondary, "warm-up")
        singles = [push_and_wait(site, pusher, secondary, f"single-{n}").latency_s for n in range(arguments.singles)]
        print(f"  {case}: lone pushes p50 {statistics.median(singles):.3f} s", flush=True)

        work = burst_images(arguments.images, arguments.repositories, "burst")
        moving = [build_image("oci", layer_sizes=[512]) for _ in range(arguments.moves)]
        expected = {(repository, tag): image.digest for repository, tag, image in work}
        expected[("burst/moving", "hot")] = moving[-1].digest
        requests_before, (flow_runs_before, task_runs_before) = api_requests(site), runs_so_far(site)
        first_push, last_push = push_all(site.primary.url, work, arguments.clients, moving)
        converged = wait_converged(site, expected)
        time.sleep(1.0)  # the last runs' final state changes reach the server just after the copy
        flow_runs_after, task_runs_after = runs_so_far(site)
        timeline = run_timeline(site, first_push, last_push)
        requests = api_requests(site) - requests_before
        load = os.getloadavg()[0]
        reference = skopeo_reference(site, root, expected, arguments.clients) if arguments.skopeo else None
    images = arguments.images + arguments.moves
    result = {
        "pushing_s": round(last_push - first_push, 3),
        "last_push_to_all_s": round(converged - last_push, 3),
        "images_per_s": round(images / (converged - first_push), 2),
        "api_requests_per_image": round(requests / images, 1),
        "flow_runs_per_image": round((flow_runs_after - flow_runs_before) / images, 3),
        "task_runs_per_image": round((task_runs_after - task_runs_before) / images, 3),
        "single_p50_s": round(statistics.median(singles), 3),
        "single_p95_s": round(statistics.quantiles(singles, n=20, method="inclusive")[18], 3),
        "flow_runs": flow_runs_after - flow_runs_before,
        "failed_runs_log": site.failed_runs()[:3],
        "load_1m_at_end": round(load, 2),
        "runs_from_last_push_s": timeline,
    }
    if reference is not None:
        result["skopeo_s"] = round(reference, 3)
        result["skopeo_tags"] = len(expected)
        result["skopeo_images_per_s"] = round(len(expected) / reference, 2)
    print(f"  {case}: all on the secondary {result['last_push_to_all_s']} s after the last push", flush=True)
    return result


def skopeo_reference(site: Site, root: Path, expected: dict[tuple[str, str], str], clients: int) -> float:
    """The reference tool on the same images: `skopeo copy --all` of each, `clients` at a time, from the
    primary into a fresh registry. No notification or scheduling: what the copies alone cost."""
    with RegistryProcess(root / "skopeo-target") as target:

        def copy(key: tuple[str, str]) -> None:
            repository, tag = key
            subprocess.run(
                [
                    str(SKOPEO),
                    "copy",
                    "--all",
                    "--src-tls-verify=false",
                    "--dest-tls-verify=false",
                    f"docker://{site.primary.url.removeprefix('http://')}/{repository}:{tag}",
                    f"docker://{target.url.removeprefix('http://')}/{repository}:{tag}",
                ],
                check=True,
                capture_output=True,
                timeout=300,
            )

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            list(pool.map(copy, expected))
        return time.monotonic() - started


def format_table(results: dict[str, Any]) -> str:
    parameters = results["parameters"]
    lines = [
        f"Burst: {parameters['images']} images in {parameters['repositories']} repositories by "
        f"{parameters['clients']} clients at once, plus one tag moved {parameters['moves']} times; Prefect server on "
        f"{parameters['prefect_database']}",
        f"{'case':<24} {'push s':>7} {'last->all s':>11} {'img/s':>6} {'API/img':>8} {'flows/img':>9} "
        f"{'tasks/img':>9} {'lone p50':>8} {'lone p95':>8} {'load':>5}",
    ]
    for case, figures in results["cases"].items():
        if "error" in figures:
            lines.append(f"{case:<24} FAILED: {figures['error'].splitlines()[0]}")
            continue
        lines.append(
            f"{case:<24} {figures['pushing_s']:>7.2f} {figures['last_push_to_all_s']:>11.2f} "
            f"{figures['images_per_s']:>6.1f} {figures['api_requests_per_image']:>8.1f} "
            f"{figures['flow_runs_per_image']:>9.2f} {figures['task_runs_per_image']:>9.2f} "
            f"{figures['single_p50_s']:>8.3f} {figures['single_p95_s']:>8.3f} {figures['load_1m_at_end']:>5.1f}"
        )
        if "skopeo_s" in figures:
            lines.append(
                f"  the same {figures['skopeo_tags']} tags by `skopeo copy --all`, {results['parameters']['clients']} "
                f"at a time: {figures['skopeo_s']:.2f} s, {figures['skopeo_images_per_s']:.1f} img/s"
            )
        if figures["failed_runs_log"]:
            lines.append(f"  failed runs: {figures['failed_runs_log'][0]}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.burst", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=60, help="images in the burst (default 60)")
    parser.add_argument("--repositories", type=int, default=20, help="repositories they go to (default 20)")
    parser.add_argument("--clients", type=int, default=4, help="clients pushing at once (default 4)")
    parser.add_argument("--moves", type=int, default=8, help="pushes of one more tag during the burst (default 8)")
    parser.add_argument("--singles", type=int, default=10, help="lone pushes measured before it (default 10)")
    parser.add_argument("--cases", default="inline,deployment-1,deployment-2", help=f"any of {', '.join(CASES)}")
    parser.add_argument(
        "--skopeo",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after each case, copy the same tags with skopeo for reference (default: yes)",
    )
    parser.add_argument("--keep", metavar="DIR", help="keep each case's logs and data under DIR (default: removed)")
    add_prefect_database_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    cases = [case.strip() for case in arguments.cases.split(",") if case.strip()]
    if set(cases) - set(CASES) or arguments.images < arguments.repositories or arguments.singles < 2:
        raise SystemExit(f"--cases: any of {', '.join(CASES)}; --images >= --repositories; --singles >= 2")
    results: dict[str, Any] = {
        "benchmark": "burst",
        "machine": machine(),
        "parameters": {
            key: getattr(arguments, key)
            for key in ("images", "repositories", "clients", "moves", "singles", "prefect_database")
        },
        "cases": {},
    }
    for case in cases:
        with contextlib.ExitStack() as stack:
            if arguments.keep:
                scratch = Path(arguments.keep) / case
                scratch.mkdir(parents=True, exist_ok=False)
            else:
                scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"georeg-burst-{case}-")))
            try:
                results["cases"][case] = measure_case(case, arguments, scratch)
            except (BenchmarkError, AssertionError) as error:
                print(f"{case} failed: {error}", file=sys.stderr, flush=True)
                results["cases"][case] = {"error": str(error)}
    results["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        RESULTS_PATH.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(format_table(results))
    print(f"\nwritten to {RESULTS_PATH}")
    return 1 if any("error" in figures for figures in results["cases"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
