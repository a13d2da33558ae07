"""`georeg worker` against a real Prefect server: it runs a deployment's flow run as Prefect's process
worker does, and a busy server's 503 costs it milliseconds, not Prefect's 2 + 4 s."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

from prefect import flow

from tests.support.proxy import FaultProxy
from tests.support.services import REPOSITORY_ROOT, PrefectWorker, wait_until


@flow(name="georeg-worker-probe")
def probe() -> int:
    return 7


async def _deploy_and_run(pool: str) -> str:
    """A process pool of its own, a deployment of `probe` on it, and one flow run of that deployment."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    async with get_client() as client:
        await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        flow_id = await client.create_flow_from_name("georeg-worker-probe")
        deployment_id = await client.create_deployment(
            flow_id=flow_id,
            name=pool,
            work_pool_name=pool,
            entrypoint=f"{Path(__file__).relative_to(REPOSITORY_ROOT)}:probe",
            path=str(REPOSITORY_ROOT),
        )
        flow_run = await client.create_flow_run_from_deployment(deployment_id)
    return str(flow_run.id)


def _state_of(flow_run_id: str) -> str | None:
    from prefect.client.orchestration import get_client

    async def read() -> str | None:
        async with get_client() as client:
            state = (await client.read_flow_run(uuid.UUID(flow_run_id))).state
        return state.type.value if state else None

    return asyncio.run(read())


def test_the_worker_runs_a_flow_run_and_resends_a_busy_servers_503_at_once(prefect_api_url: str, tmp_path: Path):
    # Before it starts a run's process, a worker writes its labels onto the run: on a Prefect server on
    # SQLite that write is the one a burst refuses with 503 most often (benchmarks/burst.py).
    pool = f"worker-test-{uuid.uuid4().hex[:8]}"
    flow_run_id = asyncio.run(_deploy_and_run(pool))
    with FaultProxy(prefect_api_url.removesuffix("/api")) as proxy:
        proxy.add_fault("PATCH", rf"^/api/flow_runs/{flow_run_id}/labels$", status=503, times=2)
        environment = {**os.environ, "PREFECT_API_URL": f"{proxy.url}/api"}
        with PrefectWorker(tmp_path / "worker.log", environment, name="probe-worker", pool=pool) as worker:
            try:
                wait_until(lambda: _state_of(flow_run_id) == "COMPLETED", deadline=180, what="the probe's flow run")
            except AssertionError:
                raise AssertionError(
                    f"state {_state_of(flow_run_id)}; the worker's log:\n{worker.log_tail()}"
                ) from None
        labels = [r for r in proxy.requests if r.method == "PATCH" and r.path.endswith(f"{flow_run_id}/labels")]

    assert [r.status // 100 for r in labels] == [5, 5, 2]
    waited = labels[-1].arrived_at - labels[0].arrived_at
    # Prefect's client alone waits about 2 s, then 4 s, before the third try.
    assert waited < 3.0, f"the labels were written {waited:.1f} s after the first 503: Prefect's own backoff"
