"""A backfill shared among workers: its due repositories split into batches, each a flow run of the
`backfill-batch` deployment that any worker of the pool can take, on any machine, watched until it
ends and ended as crashed if its worker died. What each batch did is added up from its run record."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any
from uuid import UUID

from georeg.config import BackfillConfig, GeoregConfig
from georeg.progress import Progress, artifact_key
from georeg.repository_sync import add_up
from georeg.state import StateStore

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

logger = logging.getLogger("georeg.backfill")
_POLL_SECONDS = 1.0
_STARTING_SECONDS = 60.0  # the least time a batch may stay Pending before its worker counts as dead
BATCH_RUN = "backfill-batch"  # the kind of run record a batch leaves


def fans_out(config: GeoregConfig, due: int) -> bool:
    """Only a backfill that runs as a deployment has a pool of workers to share with."""
    return config.backfill.fan_out and _deployment_id() is not None and due > config.backfill.batch_size


def _deployment_id() -> UUID | None:
    """The running flow run's deployment, from the run's context. Not `prefect.runtime.deployment.id`:
    for a flow run of no deployment, that one asks the API and blocks the event loop while it waits
    (0.3 s on a busy server), holding up every repository in flight."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return context.flow_run.deployment_id if context is not None and context.flow_run is not None else None


def batch_lease(flow_run_id: str) -> str:
    """The lease a batch flow run renews while it lives."""
    return f"backfill-batch:{flow_run_id}"


async def run_batches(
    config: GeoregConfig, store: StateStore, secondary: str, due: list[str], dry_run: bool
) -> dict[str, Any]:
    """Run the batches as flow runs of the batch deployment and add up what they recorded."""
    from prefect.deployments.flow_runs import arun_deployment

    size = config.backfill.batch_size
    batches = [due[start : start + size] for start in range(0, len(due), size)]
    progress = Progress(
        artifact_key("backfill", secondary, "batches"), f"Backfill batches of {secondary}", len(batches)
    )
    await progress.start()

    async def run(batch: list[str]) -> FlowRun:
        parameters = {"secondary": secondary, "repositories": batch, "dry_run": dry_run}
        for _ in range(2):  # a batch whose worker died (crashed) runs once more
            started = await arun_deployment(config.backfill.batch_deployment, parameters=parameters, timeout=0)
            flow_run = await _batch_outcome(store, started.id, config.backfill)
            if not (flow_run.state and flow_run.state.is_crashed()):
                break
            logger.warning("batch flow run %s crashed; running its %d repositories again", flow_run.id, len(batch))
        await progress.advance()
        return flow_run

    flow_runs = await asyncio.gather(*(run(batch) for batch in batches))
    recorded = {summary["flow_run_id"]: summary for summary in await store.runs.summaries(BATCH_RUN, secondary)}
    parts, lost, workers, mode = [], [], set(), None
    for batch, flow_run in zip(batches, flow_runs, strict=True):
        part = recorded.get(str(flow_run.id))
        if part is None:  # it never got to record anything: crashed, or still "running" on a dead worker
            state = flow_run.state.type.value if flow_run.state else "unknown"
            lost.append((len(batch), f"batch flow run {flow_run.id} ({len(batch)} repositories) ended {state}"))
            continue
        parts.append(part)
        workers.add(part["worker"])
        mode = part["mode"]
    summary = add_up(parts)
    summary["failed"] += sum(count for count, _ in lost)
    summary["failures"] = (summary["failures"] + [why for _, why in lost])[:3]
    summary.update(secondary=secondary, dry_run=dry_run, workers=sorted(workers))
    if mode is not None:
        summary["mode"] = mode
    return summary


async def _batch_outcome(store: StateStore, flow_run_id: UUID, settings: BackfillConfig) -> FlowRun:
    """Wait for a batch flow run to end, and end it as crashed if it never will.

    A worker killed with its machine leaves its flow run Running (or Pending) in Prefect for ever. A batch
    renews its lease while it runs: one that has been Running for `lease_seconds` without a live lease
    has lost its worker. A worker takes a few seconds from Pending to Running (it starts the run's
    process): one still Pending after `lease_seconds`, and at least a minute, died before it ran. So
    has one still not finished after `batch_timeout_seconds`.
    """
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    deadline = time.time() + settings.batch_timeout_seconds
    async with get_client() as client:
        while True:
            flow_run = await client.read_flow_run(flow_run_id)
            state = flow_run.state
            if state is None or state.is_final():
                break
            why = None
            in_state = time.time() - state.timestamp.timestamp()
            if time.time() > deadline:
                why = f"it did not finish within backfill.batch_timeout_seconds ({settings.batch_timeout_seconds:g} s)"
            elif state.is_pending() and in_state > max(settings.lease_seconds, _STARTING_SECONDS):
                why = f"it was still starting after {in_state:.0f} s: its worker died before it ran"
            elif (
                state.is_running()
                and in_state > settings.lease_seconds
                and await store.leases.holder(batch_lease(str(flow_run_id))) is None
            ):
                why = f"its worker stopped renewing its lease for {settings.lease_seconds:g} s: it died"
            if why is not None:
                logger.warning("batch flow run %s ends as crashed: %s", flow_run_id, why)
                await client.set_flow_run_state(flow_run_id, Crashed(message=f"georeg: {why}"), force=True)
                flow_run = await client.read_flow_run(flow_run_id)
                break
            await asyncio.sleep(_POLL_SECONDS)
    await store.leases.release(batch_lease(str(flow_run_id)), str(flow_run_id))
    return flow_run
