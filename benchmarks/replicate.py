"""Replication benchmark: georeg against skopeo on real registries, plus georeg's CLI latency.

    python -m benchmarks.replicate [--layer-mib 1024] [--trend-mib 256] [--runs 3] [--cli-runs 5] [--embedded-runs 3]

Measured in one run, so a noisy machine weighs on both tools alike:

1. Copy of an image with one large random layer (--layer-mib, then --trend-mib) from a primary
   registry to a fresh secondary registry, by `georeg replicate` and by `skopeo copy`, --runs times
   each: wall time, MB/s and the peak RSS of the copying process, from GNU time. For georeg also the
   flow's own copy time, which `georeg replicate` prints ("... sent in X.XX s, N MB/s)"). Every copy
   is checked afterwards: the secondary must serve the primary's manifest digest and hold the layer.
2. Wall time of `georeg replicate` for a small image, against a running Prefect server and with
   Prefect's embedded default (a temporary server per call).

Medians are printed as a table; every sample goes to benchmarks/results/replicate.json.
MB means 10^6 bytes throughout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.images import DOCKER_CONFIG, DOCKER_LAYER, DOCKER_MANIFEST, Blob, Image, Pusher, build_image
from tests.support.registry import RegistryProcess
from tests.support.services import BackgroundProcess, PrefectServer, clean_environment

MIB = 1024 * 1024
MB = 1_000_000
PIECE = 8 * MIB  # the most of the layer this process holds in memory at once
GNU_TIME = Path("/usr/bin/time")
SKOPEO = Path("/usr/bin/skopeo")
BIN = Path(sys.executable).parent
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "replicate.json"
COMMAND_TIMEOUT_S = 900.0
LARGE_REPOSITORY = "bench/large"
SMALL_REPOSITORY = "bench/small"
SMALL_LAYER_SIZES = [4 * 1024, 8 * 1024]
# The line `georeg replicate` prints per secondary ends "... sent in 12.34 s, 87 MB/s)".
FLOW_REPORT = re.compile(r"sent in (?P<seconds>\d+(?:\.\d+)?) s(?:, (?P<rate>\d+) MB/s)?\)")
# What is asked of georeg; the benchmark reports a miss, it does not fail on one.
MIN_RATIO_TO_SKOPEO = 0.8
MAX_PEAK_RSS_MB = 150.0


class BenchmarkError(RuntimeError):
    """A copy that did not happen, a tool that failed, or an output that could not be read."""


# --- commands ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timed:
    """One command's wall time and peak resident memory (GNU time), and what it printed."""

    wall_s: float
    peak_rss_mb: float
    output: str
    status: int = 0


def run_timed(
    command: Sequence[str],
    *,
    env: dict[str, str],
    cwd: Path,
    log_path: Path,
    check: bool = True,
    timeout_s: float = COMMAND_TIMEOUT_S,
) -> Timed:
    """Run `command` under `/usr/bin/time -f "%M %e"` in its own session, output to `log_path`; with
    `check`, a non-zero exit status is an error, else it is returned."""
    time_path = log_path.with_suffix(".time")
    timed = [str(GNU_TIME), "-f", "%M %e", "-o", str(time_path), *command]
    job = BackgroundProcess(timed, log_path, env, cwd).start()
    assert job.process is not None
    try:
        status = job.process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"{command[0]} still running after {timeout_s:.0f} s: stopped") from None
    finally:
        if job.process.poll() is None:  # timed out or interrupted: stop it and whatever it started
            os.killpg(job.process.pid, signal.SIGKILL)
            job.process.wait()
    if status != 0 and check:
        raise BenchmarkError(f"{' '.join(command)} exited with {status}:\n{job.log_tail(25)}")
    # GNU time writes "Command exited with ..." first when the command fails; the figures are last.
    peak_kb, wall_s = time_path.read_text().splitlines()[-1].split()
    return Timed(float(wall_s), int(peak_kb) * 1024 / MB, log_path.read_text(errors="replace"), status)


def flow_seconds(output: str) -> tuple[float, int | None]:
    """The flow's own duration and the MB/s it printed (None below 1 MB), from `georeg replicate`'s output."""
    found = FLOW_REPORT.search(output)
    if found is None:
        raise BenchmarkError(f"no '... sent in X s' line in georeg's output:\n{output[-2000:]}")
    return float(found["seconds"]), int(found["rate"]) if found["rate"] else None


# --- the images ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerFile:
    """A layer on disk: gzip framing around random bytes, so skopeo sees a compressed layer and
    copies it unchanged (an uncompressed one it would compress, changing the digest)."""

    path: Path
    digest: str
    diff_id: str
    size: int


@dataclass(frozen=True)
class LargeImage:
    repository: str
    tag: str
    digest: str
    layer: LayerFile
    layer_mib: int


def write_random_layer(path: Path, mib: int) -> LayerFile:
    """`mib` MiB of random data in stored (level 0) gzip, written and hashed PIECE bytes at a time."""
    compressor = zlib.compressobj(level=0, wbits=31)  # wbits 31: gzip header and trailer
    blob_hash, content_hash = hashlib.sha256(), hashlib.sha256()
    with path.open("wb") as out:
        remaining = mib * MIB
        while remaining:
            piece = os.urandom(min(PIECE, remaining))
            remaining -= len(piece)
            content_hash.update(piece)
            framed = compressor.compress(piece)
            blob_hash.update(framed)
            out.write(framed)
        framed = compressor.flush()
        blob_hash.update(framed)
        out.write(framed)
    return LayerFile(path, "sha256:" + blob_hash.hexdigest(), "sha256:" + content_hash.hexdigest(), path.stat().st_size)


def _file_pieces(path: Path) -> Iterator[bytes]:
    with path.open("rb") as source:
        while piece := source.read(PIECE):
            yield piece


def upload_layer(registry_url: str, repository: str, layer: LayerFile) -> None:
    """Monolithic upload streamed from the file: POST for a session, then one PUT with the body."""
    with httpx.Client(base_url=registry_url, timeout=httpx.Timeout(600.0, connect=10.0)) as client:
        opened = client.post(f"/v2/{repository}/blobs/uploads/")
        if opened.status_code != 202:
            raise BenchmarkError(f"upload POST to the primary: {opened.status_code} {opened.text}")
        location = httpx.URL(registry_url + "/").join(opened.headers["Location"])
        done = client.put(
            location.copy_merge_params({"digest": layer.digest}),
            content=_file_pieces(layer.path),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(layer.size)},
        )
        if done.status_code != 201:
            raise BenchmarkError(f"upload PUT to the primary: {done.status_code} {done.text}")


def push_large_image(primary: RegistryProcess, workdir: Path, mib: int) -> LargeImage:
    """A Docker v2 image of one random `mib` MiB layer plus a small config, pushed to the primary."""
    layer = write_random_layer(workdir / f"layer-{mib}mib.gz", mib)
    upload_layer(primary.url, LARGE_REPOSITORY, layer)
    config_body = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Labels": {"georeg.benchmark.nonce": os.urandom(8).hex()}},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
    }
    config = Blob.of(json.dumps(config_body).encode(), DOCKER_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": config.descriptor(),
        "layers": [{"mediaType": DOCKER_LAYER, "size": layer.size, "digest": layer.digest}],
    }
    # The layer is already on the primary; the Pusher sends the config, then the manifest.
    image = Image(json.dumps(manifest, indent=2).encode(), DOCKER_MANIFEST, [config])
    tag = f"{mib}mib"
    with Pusher(primary.url) as pusher:
        pusher.push_image(LARGE_REPOSITORY, image, tag)
    return LargeImage(LARGE_REPOSITORY, tag, image.digest, layer, mib)


def verify_replica(
    secondary: RegistryProcess, repository: str, tag: str, digest: str, layer: LayerFile | None = None
) -> None:
    """Fail loudly unless the secondary serves `digest` for the tag and, if given, holds the whole layer."""
    with Pusher(secondary.url) as client:
        served = client.head_manifest(repository, tag)  # HEAD with Accept for the Docker and OCI types
        if served != digest:
            raise BenchmarkError(f"{secondary.url}/{repository}:{tag} serves {served or 'nothing'}, expected {digest}")
        if layer is not None and not client.blob_exists(repository, layer.digest):
            raise BenchmarkError(f"{secondary.url}: layer {layer.digest} is not linked in {repository}")
    if layer is None:
        return
    hex_digest = layer.digest.removeprefix("sha256:")
    data = secondary.workdir / "storage/docker/registry/v2/blobs/sha256" / hex_digest[:2] / hex_digest / "data"
    stored = data.stat().st_size if data.exists() else 0
    if stored != layer.size:
        raise BenchmarkError(f"{secondary.url} stores {stored} bytes of the layer, expected {layer.size}")


# --- the measurements ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CopySample:
    tool: str
    layer_mib: int
    layer_bytes: int
    run: int
    wall_s: float
    mb_per_s: float  # layer bytes / the process's wall time
    peak_rss_mb: float
    copy_s: float | None = None  # georeg only: the flow's own time, as `georeg replicate` printed it
    copy_mb_per_s: float | None = None  # layer bytes / copy_s
    printed_mb_per_s: int | None = None  # the rate georeg printed (bytes sent / its time, rounded)


@dataclass(frozen=True)
class CliSample:
    wall_s: float
    flow_s: float
    peak_rss_mb: float


def prefect_env(home: Path, api_url: str | None) -> dict[str, str]:
    """No PREFECT_ setting of the caller's, a private PREFECT_HOME; without `api_url`, Prefect's embedded default."""
    env = clean_environment(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    return env


class Bench:
    """Everything one benchmark run shares: the scratch directory, the primary, the georeg command."""

    def __init__(self, workdir: Path, primary: RegistryProcess) -> None:
        self.workdir = workdir
        self.primary = primary
        self.logs = workdir / "logs"
        self.logs.mkdir()

    def write_georeg_config(self, secondary: RegistryProcess, name: str) -> Path:
        """A georeg.yaml with the primary and one secondary, both without auth, default replication."""
        config = {
            "primary": {"url": self.primary.url},
            "secondaries": [{"name": "bench", "url": secondary.url}],
            "state": {"url": f"sqlite:///{self.workdir / 'georeg.db'}"},
        }
        path = self.workdir / f"georeg-{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def georeg_replicate(
        self, config: Path, image: str, env: dict[str, str], name: str
    ) -> tuple[Timed, float, int | None]:
        """`georeg replicate`, timed; also the flow's own seconds and printed MB/s."""
        command = [str(BIN / "georeg"), "--config", str(config), "replicate", image]
        timed = run_timed(command, env=env, cwd=self.workdir, log_path=self.logs / f"{name}.log")
        return (timed, *flow_seconds(timed.output))

    def skopeo_copy(self, image: LargeImage, secondary: RegistryProcess, target: str, name: str) -> Timed:
        command = [
            str(SKOPEO),
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            f"docker://127.0.0.1:{self.primary.port}/{image.repository}:{image.tag}",
            f"docker://127.0.0.1:{secondary.port}/{target}:{image.tag}",
        ]
        return run_timed(command, env=clean_environment(), cwd=self.workdir, log_path=self.logs / f"{name}.log")

    def copy_large(self, tool: str, image: LargeImage, run: int, env: dict[str, str]) -> CopySample:
        """One copy into a secondary registry started for it alone, so the whole layer must travel."""
        name = f"{tool}-{image.layer_mib}mib-{run}"
        secondary_dir = self.workdir / f"secondary-{name}"
        size = image.layer.size
        extra: dict[str, Any]
        with RegistryProcess(secondary_dir) as secondary:
            if tool == "georeg":
                config = self.write_georeg_config(secondary, name)
                timed, copy_s, printed = self.georeg_replicate(config, f"{image.repository}:{image.tag}", env, name)
                target = image.repository
                extra = {"copy_s": copy_s, "copy_mb_per_s": size / MB / copy_s, "printed_mb_per_s": printed}
            else:
                target, extra = f"bench/skopeo-copy-{run}", {}
                timed = self.skopeo_copy(image, secondary, target, name)
            verify_replica(secondary, target, image.tag, image.digest, image.layer)
        shutil.rmtree(secondary_dir)  # a GiB per copy otherwise
        return CopySample(
            tool, image.layer_mib, size, run, timed.wall_s, size / MB / timed.wall_s, timed.peak_rss_mb, **extra
        )

    def cli_runs(self, mode: str, runs: int, secondary: RegistryProcess, env: dict[str, str]) -> list[CliSample]:
        """`georeg replicate` of a fresh small image under a fresh tag, `runs` times."""
        config = self.write_georeg_config(secondary, f"cli-{mode}")
        samples = []
        for run in range(1, runs + 1):
            tag = f"{mode}-{run}"
            image = build_image("docker", layer_sizes=SMALL_LAYER_SIZES)
            with Pusher(self.primary.url) as pusher:
                pusher.push_image(SMALL_REPOSITORY, image, tag)
            timed, flow_s, _ = self.georeg_replicate(config, f"{SMALL_REPOSITORY}:{tag}", env, f"cli-{mode}-{run}")
            verify_replica(secondary, SMALL_REPOSITORY, tag, image.digest)
            samples.append(CliSample(timed.wall_s, flow_s, timed.peak_rss_mb))
            print(f"  cli {mode} run {run}: {timed.wall_s:.2f} s (flow {flow_s:.2f} s)", flush=True)
        return samples

    def large_copies(self, images: list[LargeImage], runs: int, env: dict[str, str]) -> list[CopySample]:
        copies = []
        for run in range(1, runs + 1):
            for image in images:
                tools = ("georeg", "skopeo") if run % 2 else ("skopeo", "georeg")  # take turns going first
                for tool in tools:
                    copies.append(sample := self.copy_large(tool, image, run, env))
                    copy = f", copy phase {sample.copy_mb_per_s:.1f} MB/s" if sample.copy_mb_per_s else ""
                    print(
                        f"  {tool} {sample.layer_mib} MiB run {run}: {sample.wall_s:.2f} s, "
                        f"{sample.mb_per_s:.1f} MB/s{copy}, {sample.peak_rss_mb:.1f} MB RSS",
                        flush=True,
                    )
        return copies


# --- summaries -----------------------------------------------------------------------------------


def _median(samples: Sequence[Any], name: str) -> float:
    return statistics.median(getattr(sample, name) for sample in samples)


def summarise_tool(samples: list[CopySample]) -> dict[str, Any]:
    figures = {
        "runs": len(samples),
        "layer_bytes": samples[0].layer_bytes,
        "wall_s_median": _median(samples, "wall_s"),
        "mb_per_s_median": _median(samples, "mb_per_s"),
        "peak_rss_mb_median": _median(samples, "peak_rss_mb"),
        "peak_rss_mb_max": max(s.peak_rss_mb for s in samples),
    }
    if samples[0].copy_s is not None:
        figures["copy_s_median"] = _median(samples, "copy_s")
        figures["copy_mb_per_s_median"] = _median(samples, "copy_mb_per_s")
    return figures


def summarise_copies(samples: list[CopySample], sizes: list[int]) -> list[dict[str, Any]]:
    """Per layer size: each tool's medians, and georeg's median MB/s (whole process, copy phase) over skopeo's."""
    rows = []
    for mib in sizes:
        row: dict[str, Any] = {"layer_mib": mib}
        for tool in ("georeg", "skopeo"):
            row[tool] = summarise_tool([s for s in samples if s.layer_mib == mib and s.tool == tool])
        skopeo = row["skopeo"]["mb_per_s_median"]
        row["ratio_to_skopeo_whole_process"] = row["georeg"]["mb_per_s_median"] / skopeo
        row["ratio_to_skopeo_copy_phase"] = row["georeg"]["copy_mb_per_s_median"] / skopeo
        rows.append(row)
    return rows


def summarise_cli(samples: list[CliSample]) -> dict[str, Any]:
    walls = [s.wall_s for s in samples]
    return {
        "runs": len(samples),
        "wall_s": walls,
        "flow_s": [s.flow_s for s in samples],
        "wall_s_min": min(walls),
        "wall_s_median": statistics.median(walls),
        "wall_s_max": max(walls),
        "flow_s_median": _median(samples, "flow_s"),
        "peak_rss_mb_max": max(s.peak_rss_mb for s in samples),
    }


def _version(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).strip().splitlines()[0] if done.returncode == 0 else "unknown"


# --- the run -------------------------------------------------------------------------------------


def measure(arguments: argparse.Namespace, sizes: list[int], workdir: Path) -> dict[str, Any]:
    with (
        RegistryProcess(workdir / "primary") as primary,
        RegistryProcess(workdir / "secondary-cli") as cli_secondary,
    ):
        bench = Bench(workdir, primary)
        print(f"pushing {' and '.join(f'{mib} MiB' for mib in sizes)} layer images to the primary", flush=True)
        images = [push_large_image(primary, workdir, mib) for mib in sizes]

        starting = time.monotonic()
        with PrefectServer(workdir / "prefect-server") as server:
            startup_s = time.monotonic() - starting
            print(f"prefect server healthy after {startup_s:.1f} s at {server.api_url}", flush=True)
            server_env = prefect_env(workdir / "prefect-client", server.api_url)
            # First, so that the server has seen the flow and its tasks before the timed copies.
            cli_server = bench.cli_runs("server", arguments.cli_runs, cli_secondary, server_env)
            copies = bench.large_copies(images, arguments.runs, server_env)

        embedded_env = prefect_env(workdir / "prefect-embedded", api_url=None)
        cli_embedded = bench.cli_runs("embedded", arguments.embedded_runs, cli_secondary, embedded_env)
    return {
        "prefect_server_startup_s": round(startup_s, 2),
        "copies": [asdict(sample) for sample in copies],
        "summary": summarise_copies(copies, sizes),
        "cli": {"server": summarise_cli(cli_server), "embedded": summarise_cli(cli_embedded)},
    }


def benchmark(arguments: argparse.Namespace) -> dict[str, Any]:
    sizes = list(dict.fromkeys([arguments.layer_mib, arguments.trend_mib]))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="georeg-bench-") as scratch:
        figures = measure(arguments, sizes, Path(scratch))
    return {
        "benchmark": "replicate",
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - started, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "prefect": _version([str(BIN / "prefect"), "--version"]),
            "skopeo": _version([str(SKOPEO), "--version"]),
        },
        "parameters": {**vars(arguments), "small_layer_bytes": SMALL_LAYER_SIZES},
        **figures,
    }


# --- reporting -----------------------------------------------------------------------------------


def _copy_lines(row: dict[str, Any]) -> list[str]:
    georeg, skopeo = row["georeg"], row["skopeo"]
    return [
        f"{row['layer_mib']:>6} MiB  georeg  {georeg['wall_s_median']:>7.2f} {georeg['mb_per_s_median']:>7.1f} "
        f"{georeg['copy_s_median']:>7.2f} {georeg['copy_mb_per_s_median']:>9.1f} "
        f"{georeg['peak_rss_mb_median']:>7.1f} {georeg['peak_rss_mb_max']:>7.1f}",
        f"{'':>10}  skopeo  {skopeo['wall_s_median']:>7.2f} {skopeo['mb_per_s_median']:>7.1f} {'-':>7} {'-':>9} "
        f"{skopeo['peak_rss_mb_median']:>7.1f} {skopeo['peak_rss_mb_max']:>7.1f}",
        f"{'':>10}  georeg/skopeo MB/s: whole process {row['ratio_to_skopeo_whole_process']:.2f}, "
        f"copy phase {row['ratio_to_skopeo_copy_phase']:.2f}",
    ]


def _notes(row: dict[str, Any]) -> list[str]:
    notes, mib = [], row["layer_mib"]
    ratio, rss = row["ratio_to_skopeo_whole_process"], row["georeg"]["peak_rss_mb_max"]
    if ratio < MIN_RATIO_TO_SKOPEO:
        notes.append(f"georeg (whole process) is {ratio:.2f}x skopeo at {mib} MiB (< {MIN_RATIO_TO_SKOPEO}x)")
    if rss > MAX_PEAK_RSS_MB:
        notes.append(f"georeg peaked at {rss:.1f} MB RSS at {mib} MiB (> {MAX_PEAK_RSS_MB:.0f} MB)")
    return notes


def format_table(results: dict[str, Any]) -> str:
    runs = results["parameters"]["runs"]
    lines = [
        f"Large layer copy, primary -> fresh secondary (median of {runs} run(s); MB = 10^6 bytes)",
        f"{'layer':>10}  {'tool':<7} {'wall s':>7} {'MB/s':>7} {'copy s':>7} {'copy MB/s':>9} "
        f"{'RSS med':>7} {'RSS max':>7}",
    ]
    notes = []
    for row in results["summary"]:
        lines += _copy_lines(row)
        notes += _notes(row)
    lines += [
        "",
        f"georeg replicate, small image ({len(SMALL_LAYER_SIZES)} layers of a few KiB), seconds",
        f"{'prefect':<24} {'runs':>4} {'min':>7} {'median':>7} {'max':>7} {'flow med':>8} {'RSS max MB':>10}",
    ]
    for mode, label in {"server": "running server", "embedded": "embedded (temp server)"}.items():
        cli = results["cli"][mode]
        lines.append(
            f"{label:<24} {cli['runs']:>4} {cli['wall_s_min']:>7.2f} {cli['wall_s_median']:>7.2f} "
            f"{cli['wall_s_max']:>7.2f} {cli['flow_s_median']:>8.2f} {cli['peak_rss_mb_max']:>10.1f}"
        )
    lines.append(f"(prefect server start-up, not counted above: {results['prefect_server_startup_s']:.1f} s)")
    return "\n".join(lines + [f"NOTE: {note}" for note in notes])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.replicate", description=__doc__.split("\n")[0])
    parser.add_argument("--layer-mib", type=int, default=1024, help="size of the large layer (default 1024)")
    parser.add_argument("--trend-mib", type=int, default=256, help="a second, smaller layer size (default 256)")
    parser.add_argument("--runs", type=int, default=3, help="copies per tool and layer size; medians shown (default 3)")
    parser.add_argument("--cli-runs", type=int, default=5, help="small-image runs with a Prefect server (default 5)")
    parser.add_argument("--embedded-runs", type=int, default=3, help="small-image runs, embedded Prefect (default 3)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    if min(vars(arguments).values()) < 1:
        raise SystemExit("every size and count must be at least 1")
    for tool in (GNU_TIME, SKOPEO, BIN / "georeg"):
        if not tool.is_file():
            raise SystemExit(f"{tool} is missing")
    try:
        results = benchmark(arguments)
    except BenchmarkError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(format_table(results))
    print(f"\nwritten to {RESULTS_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
