"""Backfill benchmark: `georeg backfill` against `skopeo sync`, each into a fresh, empty secondary registry.

    python -m benchmarks.backfill [--scenario a,b,c] [--repositories 50] [--tags 10]
                                  [--shared-repositories 40] [--base-mib 100]

Scenarios, all in one run so that a noisy machine weighs on every figure alike:

(a) many small images: --repositories x --tags images of 4 layers of 1-4 KiB. georeg (one process,
    Prefect server already running) against skopeo sync of all repositories in one process (a YAML
    source), split into 2 and 4 parallel processes, and one process per repository in a shell loop.
(b) one large shared base: --shared-repositories repositories, each one image of a --base-mib MiB
    base layer they all share plus a small layer of its own. georeg against one skopeo process.
(c) the no-op resync of (a): every tool of (a) again, into the secondaries it has just filled.

Every run is made twice, into two empty secondaries of its own: straight to the first, timed, and
through a recording proxy to the second, which counts the bytes uploaded (the proxy's extra hop costs
a serial tool such as skopeo more than a concurrent one, so it is kept out of the timed run). After
every run the secondary's tag -> digest listing must equal the primary's, or the benchmark fails.
A table goes to stdout; every figure to benchmarks/results/backfill.json. MB means 10^6 bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks.common import (
    BenchmarkError,
    RepositoryListing,
    add_prefect_database_argument,
    check_listing,
    flow_run_seconds,
    georeg_command,
    listing,
    machine,
    megabytes,
    quiet_tls_probes,
    run_and_report,
    run_processes,
    start_prefect_server,
    uploads,
    write_georeg_config,
)
from benchmarks.replicate import BIN, MIB, SKOPEO, prefect_env
from tests.support.images import DOCKER_LAYER, Blob, Pusher, build_image
from tests.support.proxy import FaultProxy
from tests.support.registry import RegistryProcess
from tests.support.services import clean_environment

SCENARIOS = ("a", "b", "c")
NAMESPACE = "bench"  # every repository is bench/<name>; skopeo's destination prefix is <secondary>/bench
SMALL_LAYER_BYTES = (1024, 2048, 3072, 4096)
UNIQUE_LAYER_BYTES = 4096
SKOPEO_SYNC = [str(SKOPEO), "sync", "--dest", "docker", "--dest-tls-verify=false", "--preserve-digests"]
# What is asked of georeg; the benchmark reports a miss, it does not fail on one.
TARGET_SPEEDUP_A = 2.0  # (a): at least this many times faster than one skopeo process
TARGET_FLOW_SPEEDUP_C = 3.0  # (c): the flow's own time this many times below skopeo's no-op


@dataclass(frozen=True)
class Variant:
    """One way of running a tool: georeg, or skopeo in `shards` parallel processes, or one per repository."""

    label: str
    tool: str
    shards: int = 1
    per_repository: bool = False


GEOREG = Variant("georeg", "georeg")
SKOPEO_SERIAL = Variant("skopeo x1", "skopeo")
VARIANTS_A = (
    GEOREG,
    SKOPEO_SERIAL,
    Variant("skopeo x2", "skopeo", shards=2),
    Variant("skopeo x4", "skopeo", shards=4),
    Variant("skopeo loop", "skopeo", per_repository=True),
)
VARIANTS_B = (GEOREG, SKOPEO_SERIAL)


@dataclass(frozen=True)
class Primary:
    registry: RegistryProcess
    repositories: list[str]
    listing: RepositoryListing


@dataclass(frozen=True)
class Secondary:
    """An empty secondary registry as a tool reaches it: directly, or through a recording proxy."""

    registry: RegistryProcess
    port: int  # where the tool sends its requests
    georeg_config: Path
    proxy: FaultProxy | None = None


@dataclass(frozen=True)
class Target:
    """One tool's two secondaries: `timed`, reached directly, and `counted`, behind a recording proxy."""

    timed: Secondary
    counted: Secondary


@dataclass(frozen=True)
class Execution:
    """One run of a tool into one secondary."""

    wall_s: float  # from starting the first process to the exit of the last
    cpu_s: float  # user + system time of the tool's processes
    load_1m: float  # the machine's 1-minute load average at the end
    flow_s: float | None  # georeg only: the backfill flow run's time in Running, from the Prefect server
    georeg_summary: str | None  # georeg only: the line `georeg backfill` prints per secondary


@dataclass(frozen=True)
class Sample:
    """A tool in a scenario: timed without a proxy, its bytes counted in a second run through one."""

    scenario: str
    variant: str
    processes: int
    wall_s: float
    flow_s: float | None
    cpu_s: float
    load_1m: float
    proxied_wall_s: float
    proxied_flow_s: float | None
    uploaded_bytes: int
    upload_requests: int
    mounts: int
    georeg_summary: str | None


# --- the images ----------------------------------------------------------------------------------


def gzip_layer(size: int) -> Blob:
    """`size` random bytes in stored (level 0) gzip framing: skopeo sees a compressed layer and copies
    it unchanged (an uncompressed one it would compress, changing the digests)."""
    compressor = zlib.compressobj(level=0, wbits=31)
    return Blob.of(compressor.compress(os.urandom(size)) + compressor.flush(), DOCKER_LAYER)


def push_small_images(primary: RegistryProcess, repositories: int, tags: int) -> list[str]:
    names = [f"{NAMESPACE}/small-{index:02d}" for index in range(repositories)]
    with Pusher(primary.url) as pusher:
        for name in names:
            for tag in range(tags):
                layers = [gzip_layer(size) for size in SMALL_LAYER_BYTES]
                pusher.push_image(name, build_image("docker", layers=layers), f"v{tag}")
    return names


def mount_blob(registry: RegistryProcess, repository: str, digest: str, source: str) -> None:
    response = httpx.post(
        f"{registry.url}/v2/{repository}/blobs/uploads/", params={"mount": digest, "from": source}, timeout=30
    )
    if response.status_code != 201:
        raise BenchmarkError(f"mount of {digest} into {repository}: {response.status_code} {response.text}")


def push_shared_base_images(primary: RegistryProcess, repositories: int, base_mib: int) -> list[str]:
    """One image per repository: the shared base (uploaded once, mounted into the rest) and a layer of its own."""
    names = [f"{NAMESPACE}/shared-{index:02d}" for index in range(repositories)]
    base = gzip_layer(base_mib * MIB)
    with Pusher(primary.url) as pusher:
        pusher.push_blob(names[0], base)
        for name in names:
            if name != names[0]:
                mount_blob(primary, name, base.digest, names[0])
            pusher.push_image(name, build_image("docker", layers=[base, gzip_layer(UNIQUE_LAYER_BYTES)]), "v1")
    return names


# --- the runs ------------------------------------------------------------------------------------


class Bench:
    """What every run shares: the scratch directory, the Prefect server, the georeg warm-up."""

    def __init__(self, workdir: Path, prefect_api_url: str) -> None:
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir()
        self.prefect_api_url = prefect_api_url
        self.georeg_env = prefect_env(workdir / "prefect-client", prefect_api_url)
        self.warmup_s: float | None = None

    def start_primary(self, stack: contextlib.ExitStack, name: str, push: Any, *arguments: int) -> Primary:
        registry = stack.enter_context(RegistryProcess(self.workdir / name))
        started = time.monotonic()
        repositories = push(registry, *arguments)
        print(f"  pushed {len(repositories)} repositories to {name} in {time.monotonic() - started:.1f} s", flush=True)
        return Primary(registry, repositories, listing(registry.url))

    def start_secondary(self, stack: contextlib.ExitStack, name: str, primary: Primary, proxied: bool) -> Secondary:
        registry = stack.enter_context(RegistryProcess(self.workdir / name))
        proxy = stack.enter_context(FaultProxy(registry.url)) if proxied else None
        url = proxy.url if proxy else registry.url
        config = write_georeg_config(self.workdir / f"georeg-{name}.yaml", {"url": primary.registry.url}, {"url": url})
        return Secondary(registry, proxy.port if proxy else registry.port, config, proxy)

    def start_target(self, stack: contextlib.ExitStack, name: str, primary: Primary) -> Target:
        timed = self.start_secondary(stack, f"{name}-timed", primary, proxied=False)
        return Target(timed, self.start_secondary(stack, f"{name}-counted", primary, proxied=True))

    def warm_up(self, secondary: Secondary) -> None:
        """A dry run first, so the Prefect server knows the flow before a timed run (once per benchmark)."""
        if self.warmup_s is None:
            command = georeg_command(secondary.georeg_config, "backfill", "--dry-run")
            self.warmup_s = run_processes([command], env=self.georeg_env, log_dir=self.logs, name="warmup").wall_s

    def run(self, scenario: str, variant: Variant, primary: Primary, target: Target) -> Sample:
        """`variant` into its timed secondary, then into its counted one; each checked against the primary."""
        if variant.tool == "georeg":
            self.warm_up(target.timed)
        timed = self.execute(scenario, variant, primary, target.timed)
        assert target.counted.proxy is not None
        target.counted.proxy.clear()
        counted = self.execute(scenario, variant, primary, target.counted)
        sent = uploads(target.counted.proxy)
        sample = Sample(
            scenario,
            variant.label,
            variant.shards,
            timed.wall_s,
            timed.flow_s,
            timed.cpu_s,
            timed.load_1m,
            counted.wall_s,
            counted.flow_s,
            sent.bytes,
            sent.upload_requests,
            sent.mounts,
            timed.georeg_summary,
        )
        flow = f" (flow {sample.flow_s:.2f} s)" if sample.flow_s is not None else ""
        print(
            f"  ({scenario}) {variant.label}: {sample.wall_s:.2f} s{flow}, cpu {sample.cpu_s:.1f} s, "
            f"load {sample.load_1m:.1f}; through the proxy {sample.proxied_wall_s:.2f} s, "
            f"{megabytes(sent.bytes)} MB uploaded",
            flush=True,
        )
        return sample

    def execute(self, scenario: str, variant: Variant, primary: Primary, secondary: Secondary) -> Execution:
        commands = self.commands(scenario, variant, primary, secondary)
        env = self.georeg_env if variant.tool == "georeg" else clean_environment()
        name = f"{scenario}-{variant.label.replace(' ', '-')}-{secondary.registry.workdir.name}"
        finished = run_processes(commands, env=env, log_dir=self.logs, name=name)
        check_listing(primary.listing, secondary.registry.url, f"({scenario}) {variant.label}")
        flow_s, summary = None, None
        if variant.tool == "georeg":
            flow_s = flow_run_seconds(self.prefect_api_url, finished.outputs[0], "backfill")
            summary = next(line for line in finished.outputs[0].splitlines() if line.startswith("bench: "))
        return Execution(finished.wall_s, finished.cpu_s, finished.load_1m, flow_s, summary)

    def commands(self, scenario: str, variant: Variant, primary: Primary, secondary: Secondary) -> list[list[str]]:
        if variant.tool == "georeg":
            return [georeg_command(secondary.georeg_config, "backfill")]
        destination = f"127.0.0.1:{secondary.port}/{NAMESPACE}"
        if variant.per_repository:
            loop = [skopeo_repository(primary, repository, destination) for repository in primary.repositories]
            return [["sh", "-ec", "\n".join(shlex.join(command) for command in loop)]]
        shards = [primary.repositories[index :: variant.shards] for index in range(variant.shards)]
        sources = [
            self.yaml_source(f"{scenario}-{variant.shards}-{i}", primary, shard) for i, shard in enumerate(shards)
        ]
        return [[*SKOPEO_SYNC, "--src", "yaml", str(source), destination] for source in sources]

    def yaml_source(self, name: str, primary: Primary, repositories: list[str]) -> Path:
        """skopeo's YAML source: these repositories of the primary, every tag (an empty list)."""
        document = {
            f"127.0.0.1:{primary.registry.port}": {
                "tls-verify": False,
                "images": {repository: [] for repository in repositories},
            }
        }
        path = self.logs / f"skopeo-{name}.yaml"
        path.write_text(yaml.safe_dump(document))
        return path


def skopeo_repository(primary: Primary, repository: str, destination: str) -> list[str]:
    """`skopeo sync` of one repository, every tag, to <destination>/<its last name component>."""
    source = f"127.0.0.1:{primary.registry.port}/{repository}"
    return [*SKOPEO_SYNC, "--src", "docker", "--src-tls-verify=false", source, destination]


def many_small_images(bench: Bench, arguments: argparse.Namespace, resync: bool) -> list[Sample]:
    """(a), and (c) when `resync`: every variant into its own fresh secondary, then again into the same."""
    print(f"(a) {arguments.repositories} repositories x {arguments.tags} tags of small images", flush=True)
    with contextlib.ExitStack() as stack:
        primary = bench.start_primary(stack, "primary-a", push_small_images, arguments.repositories, arguments.tags)
        targets = [bench.start_target(stack, f"a-{index}", primary) for index in range(len(VARIANTS_A))]
        samples = [
            bench.run("a", variant, primary, target) for variant, target in zip(VARIANTS_A, targets, strict=True)
        ]
        if resync:
            print("(c) the no-op resync of (a), into the same secondaries", flush=True)
            samples += [bench.run("c", v, primary, target) for v, target in zip(VARIANTS_A, targets, strict=True)]
    return samples


def shared_base(bench: Bench, arguments: argparse.Namespace) -> list[Sample]:
    print(f"(b) {arguments.shared_repositories} repositories sharing a {arguments.base_mib} MiB base layer", flush=True)
    with contextlib.ExitStack() as stack:
        primary = bench.start_primary(
            stack, "primary-b", push_shared_base_images, arguments.shared_repositories, arguments.base_mib
        )
        targets = [bench.start_target(stack, f"b-{index}", primary) for index in range(len(VARIANTS_B))]
        return [bench.run("b", variant, primary, target) for variant, target in zip(VARIANTS_B, targets, strict=True)]


# --- summaries -----------------------------------------------------------------------------------


def ratios(samples: list[Sample]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per scenario and skopeo variant: georeg's wall time, flow time and bytes uploaded over skopeo's."""
    found: dict[str, dict[str, dict[str, float | None]]] = {}
    for georeg in (s for s in samples if s.variant == GEOREG.label):
        assert georeg.flow_s is not None
        for skopeo in (s for s in samples if s.scenario == georeg.scenario and s.variant != GEOREG.label):
            found.setdefault(georeg.scenario, {})[skopeo.variant] = {
                "wall": georeg.wall_s / skopeo.wall_s,
                "flow": georeg.flow_s / skopeo.wall_s,
                "bytes": georeg.uploaded_bytes / skopeo.uploaded_bytes if skopeo.uploaded_bytes else None,
            }
    return found


def _sample(samples: list[Sample], scenario: str, variant: Variant) -> Sample | None:
    return next((s for s in samples if s.scenario == scenario and s.variant == variant.label), None)


def target_notes(results: dict[str, Any]) -> list[str]:
    """The targets georeg misses, said plainly."""
    samples = [Sample(**sample) for sample in results["samples"]]
    notes = []
    georeg, skopeo = _sample(samples, "a", GEOREG), _sample(samples, "a", SKOPEO_SERIAL)
    if georeg and skopeo and georeg.wall_s * TARGET_SPEEDUP_A > skopeo.wall_s:
        notes.append(
            f"(a) georeg took {georeg.wall_s:.1f} s, skopeo x1 {skopeo.wall_s:.1f} s: "
            f"{skopeo.wall_s / georeg.wall_s:.2f}x faster, target {TARGET_SPEEDUP_A:.0f}x"
        )
    georeg, base_bytes = _sample(samples, "b", GEOREG), results["parameters"]["base_mib"] * MIB
    if georeg and georeg.uploaded_bytes >= 2 * base_bytes:
        notes.append(f"(b) georeg uploaded {megabytes(georeg.uploaded_bytes)} MB: the base went more than once")
    georeg, skopeo = _sample(samples, "c", GEOREG), _sample(samples, "c", SKOPEO_SERIAL)
    if georeg and skopeo and georeg.wall_s > skopeo.wall_s:
        notes.append(f"(c) georeg's no-op took {georeg.wall_s:.1f} s as a process, skopeo x1's {skopeo.wall_s:.1f} s")
    if georeg and skopeo and georeg.flow_s is not None and georeg.flow_s * TARGET_FLOW_SPEEDUP_C > skopeo.wall_s:
        notes.append(
            f"(c) georeg's no-op flow took {georeg.flow_s:.1f} s; skopeo x1's no-op took {skopeo.wall_s:.1f} s, "
            f"{skopeo.wall_s / georeg.flow_s:.2f}x that, target {TARGET_FLOW_SPEEDUP_C:.0f}x"
        )
    return notes


# --- the run -------------------------------------------------------------------------------------


def measure(arguments: argparse.Namespace, scenarios: list[str], workdir: Path) -> dict[str, Any]:
    starting = time.monotonic()
    with contextlib.ExitStack() as stack:
        server = start_prefect_server(stack, workdir / "prefect-server", arguments.prefect_database)
        startup_s = time.monotonic() - starting
        print(f"prefect server healthy after {startup_s:.1f} s at {server.api_url}", flush=True)
        bench = Bench(workdir, server.api_url)
        samples = []
        if "a" in scenarios:
            samples += many_small_images(bench, arguments, resync="c" in scenarios)
        if "b" in scenarios:
            samples += shared_base(bench, arguments)
    return {
        "prefect_server_startup_s": round(startup_s, 2),
        "georeg_warmup_s": bench.warmup_s,
        "samples": [asdict(sample) for sample in samples],
        "ratios_to_skopeo": ratios(samples),
    }


def benchmark(arguments: argparse.Namespace, scenarios: list[str]) -> dict[str, Any]:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="georeg-bench-") as scratch:
        figures = measure(arguments, scenarios, Path(scratch))
    parameters = {**vars(arguments), "scenario": scenarios}
    parameters.update(small_layer_bytes=SMALL_LAYER_BYTES, unique_layer_bytes=UNIQUE_LAYER_BYTES)
    return {
        "benchmark": "backfill",
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - started, 1),
        "machine": machine(),
        "parameters": parameters,
        "skopeo_command": SKOPEO_SYNC,
        **figures,
    }


# --- reporting -----------------------------------------------------------------------------------


def _describe(scenario: str, parameters: dict[str, Any]) -> str:
    small = f"{parameters['repositories']} repos x {parameters['tags']} tags"
    return {
        "a": f"(a) {small}, 4 layers of 1-4 KiB, into empty secondaries",
        "b": f"(b) {parameters['shared_repositories']} repos sharing a {parameters['base_mib']} MiB base layer",
        "c": f"(c) no-op resync of (a): {small} already there",
    }[scenario]


def _row(sample: Sample, ratio: dict[str, float | None] | None) -> str:
    flow = f"{sample.flow_s:>7.2f}" if sample.flow_s is not None else f"{'-':>7}"
    line = (
        f"  {sample.variant:<12} {sample.wall_s:>7.2f} {flow} {sample.cpu_s:>6.1f} {sample.load_1m:>4.1f} "
        f"{sample.proxied_wall_s:>8.2f} {megabytes(sample.uploaded_bytes):>8} {sample.upload_requests:>7} "
        f"{sample.mounts:>6}"
    )
    if ratio is None:
        return line
    as_text = {key: f"{value:.2f}" if value is not None else "-" for key, value in ratio.items()}
    return f"{line}   {'':<12} {as_text['wall']:>5} {as_text['flow']:>5} {as_text['bytes']:>5}"


def format_table(results: dict[str, Any]) -> str:
    lines = [
        "Backfill, georeg vs skopeo sync, each into empty secondaries of its own (one run each; MB = 10^6 bytes)",
        f"  {'tool':<12} {'wall s':>7} {'flow s':>7} {'cpu s':>6} {'load':>4} {'proxied':>8} {'up MB':>8} "
        f"{'uploads':>7} {'mounts':>6}   {'georeg/this:':<12} {'wall':>5} {'flow':>5} {'bytes':>5}",
    ]
    samples = [Sample(**sample) for sample in results["samples"]]
    for scenario in ("a", "b", "c"):
        rows = [s for s in samples if s.scenario == scenario]
        if rows:
            lines.append(_describe(scenario, results["parameters"]))
            ratio = results["ratios_to_skopeo"].get(scenario, {})
            lines += [_row(sample, ratio.get(sample.variant)) for sample in rows]
    lines += [
        "wall: first process started -> last exited, straight to the secondary; flow: georeg's backfill flow run in",
        "Running (Prefect server); cpu: user+system of the tool's processes; load: 1-minute load average after the",
        "run (2 cores); proxied: wall s of the same run into a second secondary behind a recording proxy, which",
        "counts up MB (PATCH/PUT bodies under /blobs/uploads/), uploads (POST/PATCH/PUT there) and accepted mounts.",
        f"(prefect server start-up {results['prefect_server_startup_s']:.1f} s"
        + (f", georeg warm-up dry run {results['georeg_warmup_s']:.1f} s" if results["georeg_warmup_s"] else "")
        + ", not counted)",
    ]
    return "\n".join(lines + [f"NOTE: {note}" for note in target_notes(results)])


def _scenarios(text: str) -> list[str]:
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"scenarios are a comma-separated subset of {','.join(SCENARIOS)}")
    if "c" in chosen and "a" not in chosen:
        chosen.append("a")  # (c) resyncs what (a) copied
    return [scenario for scenario in SCENARIOS if scenario in chosen]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.backfill", description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", type=_scenarios, default=list(SCENARIOS), help="a,b,c (c implies a)")
    add_prefect_database_argument(parser)
    parser.add_argument("--repositories", type=int, default=50, help="(a) repositories (default 50)")
    parser.add_argument("--tags", type=int, default=10, help="(a) tags per repository (default 10)")
    parser.add_argument("--shared-repositories", type=int, default=40, help="(b) repositories (default 40)")
    parser.add_argument("--base-mib", type=int, default=100, help="(b) size of the shared base layer (default 100)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    scenarios = arguments.scenario
    quiet_tls_probes()
    if min(arguments.repositories, arguments.tags, arguments.shared_repositories, arguments.base_mib) < 1:
        raise SystemExit("every size and count must be at least 1")
    for tool in (SKOPEO, BIN / "georeg"):
        if not tool.is_file():
            raise SystemExit(f"{tool} is missing")
    return run_and_report("backfill", lambda: benchmark(arguments, scenarios), format_table)


if __name__ == "__main__":
    sys.exit(main())
