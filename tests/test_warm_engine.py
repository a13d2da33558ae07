"""`georeg warm-engine` and the job command `python -m georeg.warm_engine`: flow runs of a process
work pool started as forks of a process that has imported Prefect and georeg already."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from georeg.engine_settings import SettingsCache
from georeg.warm_engine import SOCKET_ENV
from tests.support.images import Pusher, build_image
from tests.support.services import (
    WarmEngine,
    clean_environment,
    descendants,
    wait_until,
)
from tests.test_deployment_dispatch import DeployedSite, deployed_site


def job_command(environment: dict[str, str], *arguments: str) -> subprocess.CompletedProcess[str]:
    """The job command as a process worker runs it (the flow-run id as an argument here)."""
    return subprocess.run(
        [sys.executable, "-m", "georeg.warm_engine", *arguments],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def warm_engine(tmp_path: Path) -> Iterator[WarmEngine]:
    with WarmEngine(tmp_path, clean_environment()) as engine:
        yield engine


def test_the_run_gets_the_job_commands_output_and_exit_code(warm_engine: WarmEngine):
    done = job_command({**clean_environment(), SOCKET_ENV: str(warm_engine.socket_path)}, "not-a-flow-run-id")

    assert done.returncode == 1
    assert "Invalid flow run id" in done.stderr  # written by the forked engine on the job command's stderr
    assert "flow run (no id) started as pid" in warm_engine.log_path.read_text()


def test_without_a_warm_engine_the_job_command_runs_the_engine_itself(tmp_path: Path):
    missing = tmp_path / "no-warm-engine.sock"

    done = job_command({**clean_environment(), SOCKET_ENV: str(missing)}, "not-a-flow-run-id")

    assert done.returncode == 1
    assert "Invalid flow run id" in done.stderr


def test_a_stale_socket_is_replaced_and_removed_on_stop(tmp_path: Path):
    with WarmEngine(tmp_path, clean_environment()) as first:
        first.kill()  # as if it died: its socket file stays behind
        assert first.socket_path.is_socket()
        with WarmEngine(tmp_path, clean_environment()) as second:
            done = job_command({**clean_environment(), SOCKET_ENV: str(second.socket_path)}, "not-a-flow-run-id")
            assert "Invalid flow run id" in done.stderr
            assert second.log_path.read_text().count("started as pid") == 1  # the second one forked it
        assert not second.socket_path.exists()


@pytest.fixture(scope="module")
def warm_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployedSite]:
    with deployed_site(tmp_path_factory.mktemp("warm-site"), warm=True) as site:
        yield site


def test_a_push_is_replicated_by_a_run_the_warm_engine_forked(warm_site: DeployedSite, repo_name: str):
    site, engine = warm_site, warm_site.warm_engine
    assert engine is not None
    image = build_image("docker")
    with Pusher(site.primary.url) as pusher:
        pusher.push_image(repo_name, image, "warm")

    site.wait_replicated(repo_name, "warm", image.digest)
    wait_until(
        lambda: site.flow_runs(f"replicate {repo_name}:warm") == ["COMPLETED"],
        deadline=30,
        what="the flow run to be recorded COMPLETED",
    )
    [run_id] = site.flow_run_ids(f"replicate {repo_name}:warm")
    assert f"flow run {run_id} started as pid" in engine.log_path.read_text()


def test_the_forked_runs_logs_reach_prefect(warm_site: DeployedSite, repo_name: str):
    site = warm_site
    image = build_image("oci")
    with Pusher(site.primary.url) as pusher:
        pusher.push_image(repo_name, image, "logged")
    site.wait_replicated(repo_name, "logged", image.digest)

    [run_id] = site.flow_run_ids(f"replicate {repo_name}:logged")
    wait_until(
        lambda: any("Finished in state Completed" in line for line in site.flow_run_logs(run_id)),
        deadline=30,
        what="the run's final log line in Prefect",
    )


def test_runs_after_the_first_start_with_the_settings_the_warm_engine_built(warm_site: DeployedSite, repo_name: str):
    site, engine = warm_site, warm_site.warm_engine
    assert engine is not None
    images = {tag: build_image("docker") for tag in ("first", "second")}
    with Pusher(site.primary.url) as pusher:
        for tag, image in images.items():
            pusher.push_image(repo_name, image, tag)
            site.wait_replicated(repo_name, tag, image.digest)  # one after the other: the second is a later run

    for tag in images:
        wait_until(
            lambda tag=tag: site.flow_runs(f"replicate {repo_name}:{tag}") == ["COMPLETED"],
            deadline=30,
            what=f"the run of {tag} to be recorded COMPLETED",
        )
    # Every run of the worker comes with the same settings: they were built once, for the first.
    assert engine.log_path.read_text().count("settings for runs like this one are ready") == 1


def test_settings_are_reused_for_the_same_settings_and_built_anew_for_others(tmp_path: Path):
    first, second = tmp_path / "run-1", tmp_path / "run-2"  # a process worker's fresh working directories
    first.mkdir()
    second.mkdir()
    worker = {**clean_environment(), "PREFECT_API_URL": "http://127.0.0.1:4200/api"}
    cache = SettingsCache()
    own_environment, own_cwd = dict(os.environ), os.getcwd()

    cache.learn({**worker, "PREFECT__FLOW_RUN_ID": str(uuid.uuid4())}, str(first))

    assert os.environ == own_environment and os.getcwd() == own_cwd  # the warm engine's own are untouched
    known = cache.get({**worker, "PREFECT__FLOW_RUN_ID": str(uuid.uuid4())}, str(second))
    assert known is not None and known.settings.api.url == "http://127.0.0.1:4200/api"
    assert cache.get({**worker, "PREFECT_API_URL": "http://127.0.0.1:4201/api"}, str(second)) is None
    (second / "prefect.toml").write_text('[logging]\nlevel = "DEBUG"\n')
    assert cache.get(worker, str(second)) is None  # a settings file in the working directory counts
    cache.learn(worker, str(second))
    from_file = cache.get(worker, str(second))
    assert from_file is not None and from_file.settings.logging.level == "DEBUG"


def test_a_signal_to_the_job_command_reaches_the_run(warm_engine: WarmEngine):
    # A Prefect API that accepts connections and never answers: the run waits there until told to stop.
    with socket.socket() as silent_api:
        silent_api.bind(("127.0.0.1", 0))
        silent_api.listen(16)
        environment = {
            **clean_environment(),
            SOCKET_ENV: str(warm_engine.socket_path),
            "PREFECT_API_URL": f"http://127.0.0.1:{silent_api.getsockname()[1]}/api",
        }
        job = subprocess.Popen(
            [sys.executable, "-m", "georeg.warm_engine", str(uuid.uuid4())],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until(lambda: "started as pid" in warm_engine.log_path.read_text(), deadline=30, what="the fork")
            [child] = [int(pid) for pid in re.findall(r"started as pid (\d+)", warm_engine.log_path.read_text())]
            assert job.poll() is None and Path(f"/proc/{child}").exists()  # both waiting on the API

            job.send_signal(signal.SIGTERM)

            assert job.wait(timeout=30) != 0
            wait_until(lambda: not Path(f"/proc/{child}").exists(), deadline=30, what="the run to end")
        finally:
            job.kill()


def test_a_peer_that_sends_nothing_is_dropped_and_runs_go_on(warm_engine: WarmEngine):
    with socket.socket(socket.AF_UNIX) as idle:
        idle.connect(str(warm_engine.socket_path))  # connected, and silent

        done = job_command({**clean_environment(), SOCKET_ENV: str(warm_engine.socket_path)}, "not-a-flow-run-id")

    assert "Invalid flow run id" in done.stderr
    assert "flow run (no id) started as pid" in warm_engine.log_path.read_text()


@contextlib.contextmanager
def run_waiting_on_a_silent_api(engine: WarmEngine, log_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A job command handed to `engine` whose run waits on a Prefect API that never answers; with its child."""
    with socket.socket() as silent_api, log_path.open("wb") as log:
        silent_api.bind(("127.0.0.1", 0))
        silent_api.listen(16)
        environment = {
            **clean_environment(),
            SOCKET_ENV: str(engine.socket_path),
            "PREFECT_API_URL": f"http://127.0.0.1:{silent_api.getsockname()[1]}/api",
        }
        job = subprocess.Popen(
            [sys.executable, "-m", "georeg.warm_engine", str(uuid.uuid4())], env=environment, stdout=log, stderr=log
        )
        try:
            wait_until(lambda: "started as pid" in engine.log_path.read_text(), deadline=30, what="the fork")
            [child] = [int(pid) for pid in re.findall(r"started as pid (\d+)", engine.log_path.read_text())]
            yield job, child
        finally:
            job.kill()
            job.wait()


def test_a_stop_signal_ends_runs_left_after_the_grace_period_and_leaves_nothing(tmp_path: Path):
    with WarmEngine(tmp_path, clean_environment(), "--shutdown-grace-seconds", "3") as engine:
        assert engine.process is not None
        with run_waiting_on_a_silent_api(engine, tmp_path / "job.log") as (job, child):
            below = descendants(engine.process.pid)
            assert below == [child]  # the run, and no server or helper of the warm engine's own

            engine.process.send_signal(signal.SIGTERM)
            stopped_at = time.monotonic()
            wait_until(lambda: not engine.socket_path.exists(), deadline=5, what="the warm engine to stop accepting")
            code = engine.process.wait(timeout=60)
            took = time.monotonic() - stopped_at
            job_code = job.wait(timeout=30)

    assert code == 0, engine.log_tail()
    assert 2 < took < 30  # it gave the run its 3 s before ending it
    assert job_code != 0  # the run was ended, and its job command says so ...
    assert "stopped during the flow run" not in (tmp_path / "job.log").read_text()  # ... with the run's own exit
    assert "ending 1 flow run(s) not finished within the grace period" in engine.log_path.read_text()
    assert not Path(f"/proc/{child}").exists()


def test_a_stop_signal_waits_for_runs_that_end_within_the_grace_period(tmp_path: Path):
    with WarmEngine(tmp_path, clean_environment(), "--shutdown-grace-seconds", "120") as engine:
        assert engine.process is not None
        with run_waiting_on_a_silent_api(engine, tmp_path / "job.log") as (job, child):
            engine.process.send_signal(signal.SIGINT)
            wait_until(lambda: not engine.socket_path.exists(), deadline=5, what="the warm engine to stop accepting")
            assert engine.process.poll() is None and Path(f"/proc/{child}").exists()  # still serving its run

            job.send_signal(signal.SIGTERM)  # the worker cancels the run: it ends, well within the grace period
            job_code = job.wait(timeout=30)
            code = engine.process.wait(timeout=30)

    assert code == 0, engine.log_tail()
    assert job_code != 0
    assert "stopped during the flow run" not in (tmp_path / "job.log").read_text()
    assert "not finished within the grace period" not in engine.log_path.read_text()
    assert not Path(f"/proc/{child}").exists()
