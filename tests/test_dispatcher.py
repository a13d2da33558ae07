"""The dispatcher against a real Prefect API server: its shared Prefect client, and runs that never end."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client

from georeg.config import DispatchConfig, GeoregConfig, parse_config
from georeg.dispatcher import DeploymentFlowRuns, Dispatcher
from georeg.events import REPLICATE, AcceptedEvent
from georeg.prefect_client import SharedPrefectClient
from georeg.state import Claim, StateStore

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


class HeldRuns:
    """Flow runs that end when the test releases them (one per repository), as long runs in flight do."""

    def __init__(self) -> None:
        self.release: dict[str, asyncio.Event] = {}
        self.started: list[str] = []

    async def run(self, claims: list[Claim], store: StateStore) -> None:
        [claim] = claims  # two items and four free runs: a run each
        self.started.append(claim.repository)
        await self.release.setdefault(claim.repository, asyncio.Event()).wait()

    async def close(self) -> None:
        pass


class HeldDeploymentRuns(DeploymentFlowRuns):
    """Deployment runs whose flow runs were created and are going on on a worker (they never end here)."""

    async def run(self, claims: list[Claim], store: StateStore) -> None:
        [claim] = claims
        await store.journal.set_flow_run(claim, f"flow-run-of-{claim.repository}")
        await asyncio.Event().wait()


async def journal_two_pushes(tmp_path: Path) -> tuple[GeoregConfig, StateStore]:
    config = parse_config(
        {
            "primary": {"url": "http://127.0.0.1:1"},
            "secondaries": [{"name": "east", "url": "http://127.0.0.1:2"}],
            "state": {"url": f"sqlite:///{tmp_path / 'journal.db'}"},
        },
        base_dir=tmp_path,
    )
    store = StateStore(config.state.url)
    await store.ensure_schema()
    events = [AcceptedEvent(f"ev-{name}", REPLICATE, f"group/{name}", "1.0") for name in ("done", "left")]
    assert await store.journal.record_events(events, ["east"]) == 2
    return config, store


async def test_shutdown_waits_for_runs_that_finish_and_puts_the_rest_back_as_pending(tmp_path: Path) -> None:
    config, store = await journal_two_pushes(tmp_path)
    runs = HeldRuns()
    dispatcher = Dispatcher(config, store, runs)
    try:
        assert await dispatcher.dispatch_due() == 2

        stopping = asyncio.create_task(dispatcher.shutdown(grace_seconds=2))
        await asyncio.sleep(0)  # a yield: the shutdown begins while both runs are held
        assert not stopping.done()  # it waits for them
        runs.release.setdefault("group/done", asyncio.Event()).set()
        await asyncio.wait_for(stopping, timeout=30)

        assert await dispatcher.dispatch_due() == 0  # a stopping dispatcher starts nothing
        assert await store.journal.running() == []
        assert await store.journal.depth() == 1  # the finished run's row is gone; the other's is back
        assert [claim.repository for claim in await store.journal.claim_due(10)] == ["group/left"]
    finally:
        await store.close()


async def test_shutdown_leaves_deployment_runs_to_their_workers(tmp_path: Path) -> None:
    config, store = await journal_two_pushes(tmp_path)
    dispatcher = Dispatcher(config, store, HeldDeploymentRuns(config.dispatch))
    try:
        assert await dispatcher.dispatch_due() == 2
        running = await store.journal.running()
        for _ in range(100):  # both runs record their flow run ids at once
            if all(claim.flow_run_id for claim in running):
                break
            await asyncio.sleep(0.01)
            running = await store.journal.running()

        await asyncio.wait_for(dispatcher.shutdown(grace_seconds=3600), timeout=30)  # no waiting for workers

        # Still running, with their flow runs: the next start watches them rather than starting new ones.
        assert sorted(claim.flow_run_id or "" for claim in await store.journal.running()) == [
            "flow-run-of-group/done",
            "flow-run-of-group/left",
        ]
    finally:
        await store.close()


async def test_a_busy_prefect_servers_503_is_sent_again_at_once_not_after_prefects_seconds(prefect_api_url: str):
    # A Prefect server on SQLite answers 503 when two writes meet; Prefect's own client would wait 2 s,
    # then 4 s, before its third try.
    import time

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.support.proxy import FaultProxy

    with FaultProxy(prefect_api_url.removesuffix("/api")) as proxy:
        proxy.add_fault("POST", r"^/api/flow_runs/$", status=503, times=2)
        with temporary_settings({PREFECT_API_URL: f"{proxy.url}/api"}):
            shared = SharedPrefectClient()
            try:
                async with shared.installed():
                    started = time.monotonic()
                    assert await trivial(3) == 3
                    took = time.monotonic() - started
            finally:
                await shared.close()
        created = [r.status for r in proxy.requests if r.method == "POST" and r.path == "/api/flow_runs/"]

    assert created == [503, 503, 201]
    assert took < 3.0, f"the flow run took {took:.1f} s: the 503s waited for Prefect's own backoff"
