"""The dispatcher against a real Prefect API server: its shared Prefect client, and runs that never end."""

from __future__ import annotations

import pytest
from prefect import flow
from prefect.client.orchestration import get_client

from georeg.config import DispatchConfig
from georeg.dispatcher import DeploymentFlowRuns, SharedPrefectClient

pytestmark = pytest.mark.usefixtures("prefect_api_url")


@flow
async def trivial(value: int) -> int:
    return value


async def test_inside_installed_prefects_own_get_client_answers_with_the_shared_client():
    shared = SharedPrefectClient()
    try:
        client = await shared.client()
        assert await shared.client() is client
        async with shared.installed():
            assert get_client() is client
            async with get_client() as inner:  # as Prefect's code does: entering and leaving keeps it open
                assert await inner.api_healthcheck() is None
        assert get_client() is not client  # outside the block, Prefect makes its own clients again
        assert await client.api_healthcheck() is None
    finally:
        await shared.close()


async def test_inline_flow_runs_share_the_client_and_leave_it_open():
    shared = SharedPrefectClient()
    try:
        async with shared.installed():
            assert await trivial(1) == 1
            assert await trivial(2) == 2
        assert await (await shared.client()).api_healthcheck() is None
    finally:
        await shared.close()


async def test_after_close_the_next_use_opens_a_new_client():
    shared = SharedPrefectClient()
    first = await shared.client()
    await shared.close()
    await shared.close()  # closing twice is harmless
    second = await shared.client()
    try:
        assert second is not first
        assert await second.api_healthcheck() is None
    finally:
        await shared.close()


async def test_a_flow_run_left_running_by_a_dead_worker_is_ended_as_crashed() -> None:
    from prefect.states import Running

    @flow(name="georeg-dispatch-orphan")
    def orphan() -> None:  # never runs: its worker "died" after marking it Running
        pass

    async with get_client() as client:
        flow_run = await client.create_flow_run(orphan)
        await client.set_flow_run_state(flow_run.id, Running(), force=True)

    runs = DeploymentFlowRuns(DispatchConfig(mode="deployment", poll_seconds=0.2, run_timeout_seconds=1))
    try:
        state = await runs._wait(str(flow_run.id))
    finally:
        await runs.close()

    assert state.is_crashed()
    assert "dispatch.run_timeout_seconds" in (state.message or "")
    async with get_client() as client:
        assert (await client.read_flow_run(flow_run.id)).state.is_crashed()  # Prefect shows it, not only georeg


@pytest.mark.parametrize("seconds", [0, -1])
def test_the_run_timeout_must_be_positive(seconds: float) -> None:
    with pytest.raises(ValueError, match="run_timeout_seconds"):
        DispatchConfig(run_timeout_seconds=seconds)
