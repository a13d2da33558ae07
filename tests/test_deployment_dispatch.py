"""End to end, deployment dispatch: registry notifications -> `georeg serve` -> flow runs of the
deployments (`prefect deploy --all` from this checkout) -> a real `prefect worker` -> the secondary.
Also: the Prefect server goes away while events arrive, and nothing is lost or run twice."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.images import Pusher, build_image, build_index
from tests.support.registry import RegistryProcess, free_port
from tests.support.services import (
    BackgroundProcess,
    GeoregServe,
    PrefectServer,
    PrefectWorker,
    WarmEngine,
    clean_environment,
    deploy_georeg,
    georeg_cli,
    prefect_cli,
    wait_until,
)
from tests.test_serve import SECRET, deployments_notifications, write_georeg_config


@dataclass
class DeployedSite:
    primary: RegistryProcess
    secondary: RegistryProcess
    server: PrefectServer
    worker: BackgroundProcess
    receiver: GeoregServe
    environment: dict[str, str]
    warm_engine: WarmEngine | None = None

    def secondary_digest(self, repository: str, reference: str) -> str | None:
        with Pusher(self.secondary.url) as secondary:
            return secondary.head_manifest(repository, reference)

    def wait_replicated(self, repository: str, reference: str, digest: str, deadline: float = 120) -> None:
        wait_until(
            lambda: self.secondary_digest(repository, reference) == digest,
            deadline=deadline,
            what=f"{repository}:{reference} on the secondary (worker log:\n{self.worker.log_tail(15)})",
            interval=0.25,
        )

    def flow_runs(self, name: str) -> list[str]:
        """States of the flow runs named `name`, from the real server."""
        from prefect.client.orchestration import PrefectClient
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

        async def read() -> list[str]:
            async with PrefectClient(self.server.api_url) as client:
                runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
                return [run.state.type.value for run in runs if run.state]

        return asyncio.run(read())

    def flow_run_ids(self, name: str) -> list[str]:
        from prefect.client.orchestration import PrefectClient
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

        async def read() -> list[str]:
            async with PrefectClient(self.server.api_url) as client:
                runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
                return [str(run.id) for run in runs]

        return asyncio.run(read())

    def batch_states(self) -> list[tuple[int, str]]:
        """(items, state) of every `replicate-images` flow run."""
        from prefect.client.orchestration import PrefectClient
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName

        async def read() -> list[tuple[int, str]]:
            async with PrefectClient(self.server.api_url) as client:
                runs = await client.read_flow_runs(
                    flow_filter=FlowFilter(name=FlowFilterName(any_=["replicate-images"]))
                )
                return [(len(run.parameters["items"]), run.state.type.value) for run in runs if run.state]

        return asyncio.run(read())

    def flow_run_logs(self, flow_run_id: str) -> list[str]:
        """The messages the flow run logged, as the Prefect server stored them."""
        response = httpx.post(
            f"{self.server.api_url}/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}}, timeout=10
        )
        response.raise_for_status()
        return [entry["message"] for entry in response.json()]


@contextlib.contextmanager
def deployed_site(
    root: Path, *, warm: bool = False, mode: str = "deployment", **dispatch: Any
) -> Iterator[DeployedSite]:
    """Registries, a Prefect server with georeg deployed, a worker (with a warm engine if `warm`), `georeg serve`;
    in events mode, with georeg's automations applied (the trigger that starts the runs)."""
    receiver_port = free_port()
    notifications = deployments_notifications(f"http://127.0.0.1:{receiver_port}", SECRET)
    with (
        RegistryProcess(root / "primary", notifications=notifications) as primary,
        RegistryProcess(root / "secondary") as secondary,
        PrefectServer(root / "prefect-home") as server,
        contextlib.ExitStack() as stack,
    ):
        config = write_georeg_config(root / "georeg.yaml", primary.url, secondary.url, mode=mode, **dispatch)
        environment = clean_environment(
            PREFECT_API_URL=server.api_url,
            PREFECT_HOME=str(root / "prefect-home"),
            GEOREG_CONFIG=str(config),
        )
        deploy_georeg(environment)
        if mode == "events":
            georeg_cli(environment, "automations", "apply")
        engine = stack.enter_context(WarmEngine(root, environment)) if warm else None
        worker = stack.enter_context(PrefectWorker(root / "worker.log", environment, warm_engine=engine))
        receiver = stack.enter_context(GeoregServe(config, root / "serve.log", environment, port=receiver_port))
        yield DeployedSite(primary, secondary, server, worker, receiver, environment, engine)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployedSite]:
    with deployed_site(tmp_path_factory.mktemp("deployed-site")) as deployed:
        yield deployed


def test_a_push_runs_the_deployment_on_a_worker(site: DeployedSite, repo_name: str):
    image = build_image("docker")
    index = build_index([build_image("oci", platform=("linux", "arm64")), build_image("oci")], kind="oci")
    with Pusher(site.primary.url) as pusher:
        pusher.push_image(repo_name, image, "v1")
        pusher.push_image(repo_name, index, "multi")

    site.wait_replicated(repo_name, "v1", image.digest)
    site.wait_replicated(repo_name, "multi", index.digest)
    wait_until(
        lambda: site.flow_runs(f"replicate {repo_name}:v1") == ["COMPLETED"],
        deadline=30,
        what="the flow run to be recorded COMPLETED",
    )


def test_events_wait_while_prefect_is_down_and_run_exactly_once(site: DeployedSite, repo_name: str):
    site.server.stop()
    image = build_image("oci")
    with Pusher(site.primary.url) as pusher:
        pusher.push_image(repo_name, image, "during-outage")
    # The receiver journals the event and answers the registry although Prefect is unreachable.
    wait_until(
        lambda: "cannot create a flow run" in site.receiver.log_path.read_text(),
        deadline=60,
        what="the dispatcher to notice that Prefect is down",
    )
    assert site.secondary_digest(repo_name, "during-outage") is None

    site.server.start()  # same port, same database

    site.wait_replicated(repo_name, "during-outage", image.digest)
    wait_until(
        lambda: site.flow_runs(f"replicate {repo_name}:during-outage") == ["COMPLETED"],
        deadline=60,
        what="exactly one COMPLETED flow run",
    )


def test_runs_keep_starting_after_the_deployment_is_deleted_and_deployed_again(site: DeployedSite, repo_name: str):
    from prefect.client.orchestration import PrefectClient

    async def deployment_id(delete: bool = False) -> str:
        async with PrefectClient(site.server.api_url) as client:  # it retries the SQLite server's 503s
            deployment = await client.read_deployment_by_name("replicate-image/replicate-image")
            if delete:
                await client.delete_deployment(deployment.id)
            return str(deployment.id)

    images = {tag: build_image("docker") for tag in ("before", "after")}
    with Pusher(site.primary.url) as pusher:
        pusher.push_image(repo_name, images["before"], "before")
        site.wait_replicated(repo_name, "before", images["before"].digest)  # the receiver knows the deployment now
        old_id = asyncio.run(deployment_id(delete=True))
        prefect_cli(site.environment, "deploy", "--all")
        assert asyncio.run(deployment_id()) != old_id

        pusher.push_image(repo_name, images["after"], "after")

    site.wait_replicated(repo_name, "after", images["after"].digest)
    wait_until(
        lambda: site.flow_runs(f"replicate {repo_name}:after") == ["COMPLETED"],
        deadline=60,
        what="one COMPLETED flow run of the new deployment",
    )


def test_a_backlog_is_shared_among_runs_on_the_worker(tmp_path: Path, repo_name: str):
    # One run at a time: while the first image's run goes on, the rest of the backlog piles up and is
    # handed to the worker in shared runs of `replicate-images`.
    with deployed_site(tmp_path, concurrency=1) as site:
        site.receiver.stop()
        images = {f"{repo_name}-{number}": build_image("oci", layer_sizes=[100]) for number in range(8)}
        with Pusher(site.primary.url) as pusher:
            for repository, image in images.items():
                pusher.push_image(repository, image, "v1")
        site.receiver.start()

        for repository, image in images.items():
            site.wait_replicated(repository, "v1", image.digest)
        wait_until(
            lambda: "COMPLETED" in {state for _, state in site.batch_states()},
            deadline=60,
            what="a shared run to complete",
        )
        assert all(items > 1 for items, _ in site.batch_states())


def test_a_failed_run_is_retried_with_backoff_and_stays_visible(tmp_path: Path, repo_name: str):
    # A site of its own: the journal depth asserted below must be this test's work only, and stopping
    # the secondary must not fail what other tests left running.
    with deployed_site(tmp_path) as site:
        _fail_then_recover(site, repo_name)


def _fail_then_recover(site: DeployedSite, repo_name: str) -> None:
    site.secondary.stop()  # every copy to it fails until it is back
    image = build_image("oci")
    with Pusher(site.primary.url) as pusher:
        pusher.push_image(repo_name, image, "retry")
    name = f"replicate {repo_name}:retry"

    wait_until(lambda: "FAILED" in site.flow_runs(name), deadline=120, what="a FAILED flow run")
    # The receiver learns of the failure at its next look at the run; then the work is still owed, visibly.
    wait_until(
        lambda: 'georeg_flow_runs_total{outcome="failed"}' in httpx.get(f"{site.receiver.url}/metrics").text,
        deadline=60,
        what="the receiver to count the failed run",
    )
    assert "georeg_journal_depth 1.0" in httpx.get(f"{site.receiver.url}/metrics").text

    site.secondary.start()

    site.wait_replicated(repo_name, "retry", image.digest)
    wait_until(lambda: "COMPLETED" in site.flow_runs(name), deadline=60, what="the retried run to complete")
    assert site.flow_runs(name).count("COMPLETED") == 1


def test_deploy_all_creates_every_deployment_with_its_schedule(site: DeployedSite):
    from prefect.client.orchestration import PrefectClient

    async def read() -> dict[str, list[str]]:
        async with PrefectClient(site.server.api_url) as client:
            deployments = await client.read_deployments()
            return {
                f"{d.entrypoint.split(':')[1]}/{d.name}": [s.schedule.cron for s in d.schedules] for d in deployments
            }

    assert asyncio.run(read()) == {
        "replicate_image/replicate-image": [],
        "replicate_images/replicate-images": [],
        "delete_image/delete-image": [],
        "backfill/backfill": ["0 */6 * * *"],
        "verify/verify": ["30 3 * * *"],
        "backfill_batch/backfill-batch": [],
    }


def test_the_worker_starts_the_engine_directly(site: DeployedSite):
    """prefect.yaml sets the job's command, so a process worker runs the engine (through a warm engine
    when it has one) instead of a workspace supervisor that imports Prefect and then starts the engine
    (a second import). The event flows are named as modules, which a warm engine has imported."""
    from prefect.client.orchestration import PrefectClient

    async def read() -> dict[str, dict[str, Any]]:
        async with PrefectClient(site.server.api_url) as client:
            return {d.name: d.job_variables or {} for d in await client.read_deployments()}

    variables = asyncio.run(read())
    assert set(variables) == {
        "replicate-image",
        "replicate-images",
        "delete-image",
        "backfill",
        "verify",
        "backfill-batch",
    }
    for job in variables.values():
        assert str(job.get("command")).endswith("/.venv/bin/python -m georeg.warm_engine")
    assert variables["replicate-image"]["env"]["PREFECT__FLOW_ENTRYPOINT"] == "georeg.flows.replicate:replicate_image"
    assert variables["delete-image"]["env"]["PREFECT__FLOW_ENTRYPOINT"] == "georeg.flows.delete:delete_image"
    assert variables["replicate-images"]["env"]["PREFECT__FLOW_ENTRYPOINT"] == "georeg.flows.replicate:replicate_images"


# --- dispatch.mode events: Prefect's own trigger on the receiver's event starts the run ---


@pytest.fixture(scope="module")
def events_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployedSite]:
    # A fallback far beyond the test: every run here is one the trigger started.
    with deployed_site(tmp_path_factory.mktemp("events-site"), mode="events", events_fallback_seconds=600) as deployed:
        yield deployed


def metric(site: DeployedSite, name: str) -> float:
    text = httpx.get(f"{site.receiver.url}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_events_mode_a_trigger_starts_the_run_and_the_run_settles_the_journal(events_site: DeployedSite, repo_name):
    site = events_site
    image = build_image("oci")
    with Pusher(site.primary.url) as pusher:
        pusher.push_image(repo_name, image, "v1")

    site.wait_replicated(repo_name, "v1", image.digest, deadline=90)
    wait_until(lambda: metric(site, "georeg_journal_depth") == 0, deadline=30, what="the triggered run to settle")
    assert metric(site, "georeg_flow_runs_total") == 0  # the receiver's dispatcher started nothing
    wait_until(
        lambda: site.flow_runs(f"replicate {repo_name}:v1") == ["COMPLETED"],
        deadline=30,
        what="the triggered run recorded COMPLETED",
    )
