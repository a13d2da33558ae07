"""The dispatcher's deployment mode against a real Prefect API server: runs that never end."""

from __future__ import annotations

import pytest

from georeg.config import DispatchConfig
from georeg.dispatcher import DeploymentFlowRuns


async def test_a_flow_run_left_running_by_a_dead_worker_is_ended_as_crashed(prefect_api_url: str) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    @flow(name="georeg-dispatch-orphan")
    def orphan() -> None:  # never runs: its worker "died" after marking it Running
        pass

    async with get_client() as client:
        flow_run = await client.create_flow_run(orphan)
        await client.set_flow_run_state(flow_run.id, Running(), force=True)

    runs = DeploymentFlowRuns(DispatchConfig(mode="deployment", poll_seconds=0.2, run_timeout_seconds=1))
    state = await runs._wait(str(flow_run.id))

    assert state.is_crashed()
    assert "dispatch.run_timeout_seconds" in (state.message or "")
    async with get_client() as client:
        assert (await client.read_flow_run(flow_run.id)).state.is_crashed()  # Prefect shows it, not only georeg


@pytest.mark.parametrize("seconds", [0, -1])
def test_the_run_timeout_must_be_positive(seconds: float) -> None:
    with pytest.raises(ValueError, match="run_timeout_seconds"):
        DispatchConfig(run_timeout_seconds=seconds)
