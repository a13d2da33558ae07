"""Storage benchmark: replication between registries that share their S3 storage, against a full copy.

    python -m benchmarks.storage [--images 10] [--total-mib 500]

A moto S3 server (credentials required, as S3 does), a primary registry on the s3 driver, and a set
of --images images of --total-mib MiB in all (3 random layers each) pushed to it. Then, with a
Prefect server already running, one `georeg backfill` per case into a secondary registry on the s3
driver too, with the same http.secret:

- shared: the secondary on the primary's bucket and root, so georeg confirms and copies nothing;
- separate: the secondary on its own root in the same bucket, so every blob travels.

georeg's config gives both registries their `storage:` block, and georeg decides the mode itself.
Each case runs twice, each time into a fresh secondary: once straight to it, timed (the process,
and the flow run as the Prefect server recorded it), once through a recording proxy that counts the
bytes uploaded (the proxy's hop would weigh on the timing). After each run the secondary's
tag -> digest listing must equal the primary's. The shared case fails the benchmark if a single
upload request reaches its secondary.
A table goes to stdout; the figures to benchmarks/results/storage.json. MB means 10^6 bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BenchmarkError,
    RepositoryListing,
    Uploads,
    add_prefect_database_argument,
    check_listing,
    flow_run_seconds,
    georeg_command,
    listing,
    machine,
    megabytes,
    run_and_report,
    run_processes,
    start_prefect_server,
    uploads,
    write_georeg_config,
)
from benchmarks.replicate import BIN, MB, MIB, prefect_env
from tests.support.emulators import BUCKET, MotoServer
from tests.support.images import Pusher, build_image
from tests.support.proxy import FaultProxy
from tests.support.registry import RegistryProcess

NAMESPACE = "bench"
HTTP_SECRET = "georeg-storage-benchmark"  # one http.secret for every registry, as instances of one registry have
LAYER_SHARES = (5, 3, 2)  # each image's bytes split into layers in these proportions
PRIMARY_ROOT = "/primary"
SEPARATE_ROOT = "/secondary"
CASES = ("shared", "separate")
GEOREG_MODE = re.compile(r"\((?P<mode>\w+) mode\)$")  # the end of `georeg backfill`'s line: "... (copy mode)"
# What is asked of georeg; the benchmark reports a miss, it does not fail on one.
TARGET_SPEEDUP = 20.0


@dataclass(frozen=True)
class Execution:
    """One `georeg backfill` into one secondary."""

    wall_s: float
    flow_s: float  # the backfill flow run's time in Running, from the Prefect server
    cpu_s: float  # user + system time of the georeg process
    load_1m: float  # the machine's 1-minute load average at the end
    mode: str  # what georeg decided, from the line `georeg backfill` prints
    georeg_summary: str
    uploads: Uploads | None  # what the recording proxy counted, when there was one


@dataclass(frozen=True)
class Sample:
    """A case: timed into a secondary georeg reaches directly, bytes counted into another behind a proxy."""

    case: str
    mode: str
    wall_s: float
    flow_s: float
    cpu_s: float
    load_1m: float
    proxied_wall_s: float
    proxied_flow_s: float
    uploaded_bytes: int
    upload_requests: int
    georeg_summary: str


def layer_sizes(image_bytes: int) -> list[int]:
    sizes = [image_bytes * share // sum(LAYER_SHARES) for share in LAYER_SHARES[:-1]]
    return [*sizes, image_bytes - sum(sizes)]


def push_images(primary: RegistryProcess, images: int, total_mib: int) -> int:
    """--images images of random layers, --total-mib MiB in all, one repository each; returns the blob bytes."""
    sizes = layer_sizes(total_mib * MIB // images)
    blob_bytes = 0
    with Pusher(primary.url) as pusher:
        for index in range(images):
            image = build_image("docker", layer_sizes=sizes)
            pusher.push_image(f"{NAMESPACE}/storage-{index:02d}", image, "v1")
            blob_bytes += sum(blob.size for blob in image.blobs)
    return blob_bytes


class Bench:
    """The moto server, the primary and its listing, the Prefect server's address, the scratch directory."""

    def __init__(self, workdir: Path, moto: MotoServer, primary: RegistryProcess, prefect_api_url: str) -> None:
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir()
        self.moto = moto
        self.primary = primary
        self.primary_listing: RepositoryListing = listing(primary.url)
        self.prefect_api_url = prefect_api_url
        self.env = prefect_env(workdir / "prefect-client", prefect_api_url)
        self.warmup_s: float | None = None

    def storage(self, case: str, purpose: str) -> dict[str, Any]:
        """A secondary's storage: the primary's own when shared, else a root of its own."""
        return self.moto.registry_storage(PRIMARY_ROOT if case == "shared" else f"{SEPARATE_ROOT}-{purpose}")

    def run(self, case: str) -> Sample:
        """The case into a secondary reached directly (timed), then into one behind a recording proxy (counted)."""
        timed = self.execute(case, "timed", proxied=False)
        counted = self.execute(case, "counted", proxied=True)
        assert counted.uploads is not None
        return Sample(
            case,
            timed.mode,
            timed.wall_s,
            timed.flow_s,
            timed.cpu_s,
            timed.load_1m,
            counted.wall_s,
            counted.flow_s,
            counted.uploads.bytes,
            counted.uploads.upload_requests,
            timed.georeg_summary,
        )

    def execute(self, case: str, purpose: str, proxied: bool) -> Execution:
        """One `georeg backfill` into a fresh secondary on the `case` storage, checked against the primary."""
        storage = self.storage(case, purpose)
        with contextlib.ExitStack() as stack:
            secondary = stack.enter_context(
                RegistryProcess(self.workdir / f"{case}-{purpose}", storage=storage, http_secret=HTTP_SECRET)
            )
            proxy = stack.enter_context(FaultProxy(secondary.url)) if proxied else None
            config = write_georeg_config(
                self.workdir / f"georeg-{case}-{purpose}.yaml",
                {"url": self.primary.url, "storage": self.moto.registry_storage(PRIMARY_ROOT)},
                {"url": proxy.url if proxy else secondary.url, "storage": storage},
            )
            self.warm_up(config)
            finished = run_processes(
                [georeg_command(config, "backfill")], env=self.env, log_dir=self.logs, name=f"{case}-{purpose}"
            )
            check_listing(self.primary_listing, secondary.url, f"{case} storage")
            sent = uploads(proxy) if proxy else None
        output = finished.outputs[0]
        summary = next((line for line in output.splitlines() if line.startswith("bench: ")), "")
        mode = found["mode"] if (found := GEOREG_MODE.search(summary)) else "unknown"
        flow_s = flow_run_seconds(self.prefect_api_url, output, "backfill")
        return Execution(finished.wall_s, flow_s, finished.cpu_s, finished.load_1m, mode, summary, sent)

    def warm_up(self, config: Path) -> None:
        """A dry run first, so the Prefect server knows the flow before a timed run (once per benchmark)."""
        if self.warmup_s is None:
            command = georeg_command(config, "backfill", "--dry-run")
            self.warmup_s = run_processes([command], env=self.env, log_dir=self.logs, name="warmup").wall_s


def check_sample(sample: Sample, blob_bytes: int) -> None:
    """Fail loudly when a case did not do what it stands for."""
    expected_mode = "shared" if sample.case == "shared" else "copy"
    if sample.mode != expected_mode:
        raise BenchmarkError(f"{sample.case} storage: georeg chose {sample.mode} mode:\n{sample.georeg_summary}")
    if sample.case == "shared" and (sample.uploaded_bytes or sample.upload_requests):
        raise BenchmarkError(
            f"shared storage: {sample.uploaded_bytes} bytes in {sample.upload_requests} upload requests reached "
            "the secondary; it should have been sent nothing"
        )
    if sample.case == "separate" and sample.uploaded_bytes < blob_bytes:
        raise BenchmarkError(f"separate storage: {sample.uploaded_bytes} bytes uploaded, the images have {blob_bytes}")


# --- the run -------------------------------------------------------------------------------------


def measure(arguments: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    with (
        MotoServer(workdir / "moto") as moto,
        contextlib.ExitStack() as stack,
    ):
        moto.require_credentials()
        moto.create_bucket(BUCKET)
        primary = stack.enter_context(
            RegistryProcess(workdir / "primary", storage=moto.registry_storage(PRIMARY_ROOT), http_secret=HTTP_SECRET)
        )
        started = time.monotonic()
        blob_bytes = push_images(primary, arguments.images, arguments.total_mib)
        push_s = time.monotonic() - started
        print(f"pushed {arguments.images} images, {megabytes(blob_bytes)} MB, in {push_s:.1f} s", flush=True)
        server = start_prefect_server(stack, workdir / "prefect-server", arguments.prefect_database)
        bench = Bench(workdir, moto, primary, server.api_url)
        samples = []
        for case in CASES:
            samples.append(sample := bench.run(case))
            print(f"  {case}: {sample.wall_s:.2f} s (flow {sample.flow_s:.2f} s), {sample.mode} mode", flush=True)
            check_sample(sample, blob_bytes)
    shared, separate = samples
    return {
        "blob_bytes": blob_bytes,
        "push_s": round(push_s, 2),
        "georeg_warmup_s": bench.warmup_s,
        "samples": [asdict(sample) for sample in samples],
        "separate_over_shared": {"wall": separate.wall_s / shared.wall_s, "flow": separate.flow_s / shared.flow_s},
    }


def benchmark(arguments: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="georeg-bench-") as scratch:
        figures = measure(arguments, Path(scratch))
    return {
        "benchmark": "storage",
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - started, 1),
        "machine": machine(),
        "parameters": {**vars(arguments), "layer_bytes": layer_sizes(arguments.total_mib * MIB // arguments.images)},
        **figures,
    }


# --- reporting -----------------------------------------------------------------------------------


def _row(sample: dict[str, Any]) -> str:
    uploaded = sample["uploaded_bytes"]
    rate = f"{uploaded / MB / sample['proxied_flow_s']:.1f}" if uploaded else "-"
    return (
        f"{sample['case']:<9} {sample['mode']:<6} {sample['wall_s']:>7.2f} {sample['flow_s']:>7.2f} "
        f"{sample['cpu_s']:>6.1f} {sample['load_1m']:>4.1f} {sample['proxied_wall_s']:>8.2f} "
        f"{sample['proxied_flow_s']:>8.2f} {megabytes(uploaded):>8} {sample['upload_requests']:>7} {rate:>7}"
    )


def format_table(results: dict[str, Any]) -> str:
    parameters, ratio = results["parameters"], results["separate_over_shared"]
    lines = [
        f"georeg backfill onto S3 storage (moto): {parameters['images']} images, "
        f"{megabytes(results['blob_bytes'])} MB of blobs (one run per case; MB = 10^6 bytes)",
        f"{'':<45}{'--- through the proxy ---':^42}".rstrip(),
        f"{'case':<9} {'mode':<6} {'wall s':>7} {'flow s':>7} {'cpu s':>6} {'load':>4} {'wall s':>8} {'flow s':>8} "
        f"{'up MB':>8} {'uploads':>7} {'MB/s':>7}",
    ]
    lines += [_row(sample) for sample in results["samples"]]
    lines += [
        f"separate/shared: wall {ratio['wall']:.1f}x, flow {ratio['flow']:.1f}x (straight to the secondary)",
        "wall: the whole `georeg backfill` process; flow: its flow run in Running (Prefect server); cpu: user+system",
        "of georeg; load: 1-minute load average after the run (2 cores); through the proxy: the same case into a",
        "second secondary behind a recording proxy, which counts up MB (PATCH/PUT bodies under /blobs/uploads/) and",
        "uploads (POST/PATCH/PUT there); MB/s: up MB over that run's flow time.",
        f"(georeg warm-up dry run {results['georeg_warmup_s']:.1f} s, push {results['push_s']:.1f} s, not counted)",
    ]
    if ratio["wall"] < TARGET_SPEEDUP:
        lines.append(
            f"NOTE: shared is {ratio['wall']:.1f}x faster than a copy as a process (flow {ratio['flow']:.1f}x), "
            f"target {TARGET_SPEEDUP:.0f}x"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.storage", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10, help="images, one repository each (default 10)")
    parser.add_argument("--total-mib", type=int, default=500, help="MiB of layers over all images (default 500)")
    add_prefect_database_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    if min(arguments.images, arguments.total_mib) < 1:
        raise SystemExit("--images and --total-mib must be at least 1")
    if not (BIN / "moto_server").is_file():
        raise SystemExit(f"{BIN / 'moto_server'} is missing: install the test extras (./scripts/setup)")
    return run_and_report("storage", lambda: benchmark(arguments), format_table)


if __name__ == "__main__":
    sys.exit(main())
