"""Turning journaled work into flow runs, inside `georeg serve`.

The loop claims due work rows (up to `dispatch.concurrency` runs in flight), runs each as a flow run
(or, in a burst, several as one `replicate-images` run), and records the outcome: success deletes the
row (unless newer events arrived meanwhile, then it runs again), failure schedules a retry with
exponential backoff and jitter. Two ways to run:

- `inline`: the flow runs in this process (still recorded by Prefect, embedded or server);
- `deployment`: a flow run of the `replicate-image` / `delete-image` deployment is created through
  the Prefect API, as `run_deployment(..., timeout=0)` does, with an idempotency key derived from the
  work row so a retry never starts a second run, and watched until it ends. While the API is
  unreachable the work waits in the journal.
- `events`: the receiver's Prefect event starts the run (an automation, `georeg automations apply`),
  and that run settles the journal's work itself. The work becomes due here only after
  `events_fallback_seconds`: what no triggered run has settled by then (no trigger, a failed run, a
  push by digest alone) is dispatched as in `deployment` mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import time
from typing import Any, Protocol

import httpx

from georeg.config import DispatchConfig, GeoregConfig
from georeg.errors import GeoregError
from georeg.events import REPLICATE
from georeg.prefect_client import SharedPrefectClient, retry_busy_server
from georeg.state import Claim, StateStore

logger = logging.getLogger("georeg.dispatcher")


class PrefectUnavailable(GeoregError):
    """The Prefect API did not answer: the work goes back to the journal, no attempt is counted."""

    transient = True


class FlowRunFailed(GeoregError):
    """The flow run ended in a state other than Completed."""


class FlowRuns(Protocol):
    async def run(self, claims: list[Claim], store: StateStore) -> None:
        """Run the claimed work to its end, one claim as its own flow run, several as one batch run
        (`replicate-images`, which settles each claim in the journal itself); raise if it did not succeed."""
        ...

    async def close(self) -> None:
        """Release what the runs shared (the dispatcher is stopping)."""
        ...


class InlineFlowRuns:
    """Flows run in the receiver's own process."""

    def __init__(self) -> None:
        self.prefect = SharedPrefectClient()

    async def run(self, claims: list[Claim], store: StateStore) -> None:
        from georeg.flows.delete import delete_image
        from georeg.flows.replicate import replicate_image, replicate_images

        async with self.prefect.installed():
            if len(claims) > 1:
                await replicate_images([dataclasses.asdict(claim) for claim in claims])
                return
            [claim] = claims
            flow = replicate_image if claim.action == REPLICATE else delete_image
            await flow(claim.repository, claim.reference, claim.secondary)

    async def close(self) -> None:
        await self.prefect.close()


class DeploymentFlowRuns:
    """Flow runs of the deployments, executed by whichever worker of the pool takes them."""

    def __init__(self, settings: DispatchConfig) -> None:
        self.settings = settings
        self.prefect = SharedPrefectClient()
        self._deployment_ids: dict[str, Any] = {}  # deployment name -> id, looked up at its first run

    async def close(self) -> None:
        await self.prefect.close()

    async def run(self, claims: list[Claim], store: StateStore) -> None:
        flow_run_id = claims[0].flow_run_id or await self._start(claims)
        for claim in claims:
            await store.journal.set_flow_run(claim, flow_run_id)
        state = await self._wait(flow_run_id)
        if not state.is_completed():
            raise FlowRunFailed(f"flow run {flow_run_id} ended {state.type.value}: {state.message or ''}".strip())

    async def _start(self, claims: list[Claim]) -> str:
        from prefect.client.orchestration import get_client

        if len(claims) > 1:
            deployment = self.settings.batch_deployment
        elif claims[0].action == REPLICATE:
            deployment = self.settings.replicate_deployment
        else:
            deployment = self.settings.delete_deployment
        try:
            # A client of its own, not the shared one: a Prefect client that has connected once retries a
            # refused connection for about a minute, and an unreachable API must be noticed at once here
            # (the work goes back to the journal). Watching the run below can afford the retries.
            async with retry_busy_server(get_client(httpx_settings=self._httpx_settings())) as client:
                try:
                    flow_run = await self._create_flow_run(client, deployment, claims)
                except httpx.HTTPStatusError as error:
                    if error.response.status_code != 404 or deployment not in self._deployment_ids:
                        raise
                    del self._deployment_ids[deployment]  # deleted and deployed again since: it has a new id
                    flow_run = await self._create_flow_run(client, deployment, claims)
        except (httpx.TransportError, OSError, RuntimeError) as error:
            raise PrefectUnavailable(f"cannot create a flow run of {deployment}: {error}") from error
        return str(flow_run.id)

    async def _create_flow_run(self, client: Any, deployment: str, claims: list[Claim]) -> Any:
        """What `run_deployment(deployment, timeout=0)` does, with the deployment looked up by name once
        rather than at every run: on a server busy with the previous run, that read took 0.07 to 0.4 s."""
        from prefect.states import Scheduled

        deployment_id = self._deployment_ids.get(deployment)
        if deployment_id is None:
            deployment_id = self._deployment_ids[deployment] = (await client.read_deployment_by_name(deployment)).id
        if len(claims) > 1:
            parameters: dict[str, Any] = {"items": [dataclasses.asdict(claim) for claim in claims]}
        else:
            [claim] = claims
            parameters = {"repository": claim.repository, "reference": claim.reference, "secondary": claim.secondary}
        # Same work, same attempt -> same key: a lost answer never becomes a second run.
        key = ",".join(f"{claim.secondary}:{claim.sequence}:{claim.attempts}" for claim in claims)
        if len(claims) > 1:
            key = hashlib.sha256(key.encode()).hexdigest()[:32]
        return await client.create_flow_run_from_deployment(
            deployment_id,
            parameters=parameters,
            state=Scheduled(),  # due now: the worker's next poll takes it
            idempotency_key=f"georeg:{key}",
            tags=["georeg", *sorted({f"secondary:{claim.secondary}" for claim in claims})],
        )

    def _httpx_settings(self) -> dict[str, Any] | None:
        """The Prefect API's TLS context, built once: Prefect's client loads the CA bundle anew for every
        client it makes (0.05 s of CPU), and each flow run started makes one. With verification turned
        off, Prefect's client builds its own, as before."""
        from prefect.settings import get_current_settings

        from georeg.registry.tls import ca_bundle_context

        api = get_current_settings().api
        return None if api.tls_insecure_skip_verify else {"verify": ca_bundle_context(api.ssl_cert_file)}

    async def _wait(self, flow_run_id: str) -> Any:
        """The run's final state. A worker that died with its machine leaves its run Running for ever:
        one not finished after `run_timeout_seconds` is ended as crashed here, and so retried."""
        from prefect.states import Crashed

        deadline = time.monotonic() + self.settings.run_timeout_seconds
        while True:
            try:
                client = await self.prefect.client()
                flow_run = await client.read_flow_run(flow_run_id)
                if flow_run.state is not None and flow_run.state.is_final():
                    return flow_run.state
                if time.monotonic() > deadline:
                    limit = self.settings.run_timeout_seconds
                    why = f"georeg: not finished within dispatch.run_timeout_seconds ({limit:g} s)"
                    await client.set_flow_run_state(flow_run_id, Crashed(message=why), force=True)
                    return (await client.read_flow_run(flow_run_id)).state
            except (httpx.TransportError, OSError, RuntimeError) as error:
                # The run goes on on its worker; the API will be back. Keep watching.
                logger.warning("cannot read flow run %s, will retry: %s", flow_run_id, error)
            await asyncio.sleep(self.settings.poll_seconds)


class Dispatcher:
    def __init__(self, config: GeoregConfig, store: StateStore, runs: FlowRuns, observer: Any = None) -> None:
        self.settings = config.dispatch
        self.store = store
        self.runs = runs
        self.observer = observer  # receives started(claim) per item / finished(claims, ok) per run, for metrics
        self._active: dict[int, asyncio.Task[None]] = {}  # by the id of the run's first claim
        self._claims: dict[int, list[Claim]] = {}  # the claims of the runs in _active
        self._wake = asyncio.Event()
        self._pause_until = 0.0
        self._stopping = False
        self._abandoned: set[int] = set()  # runs that shutdown cancelled: their work goes back to the journal

    @classmethod
    def for_config(cls, config: GeoregConfig, store: StateStore, observer: Any = None) -> Dispatcher:
        # events mode falls back to deployment runs for the work no triggered run settled
        runs: FlowRuns = InlineFlowRuns() if config.dispatch.mode == "inline" else DeploymentFlowRuns(config.dispatch)
        return cls(config, store, runs, observer)

    def wake(self) -> None:
        """New work was journaled: look now instead of at the next poll."""
        self._wake.set()

    async def run_forever(self) -> None:
        await self._resume_after_restart()
        while True:
            await self.dispatch_due()
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.settings.poll_seconds)

    async def dispatch_due(self) -> int:
        """Start flow runs for due work, up to the concurrency bound; return how many items started.

        While there are fewer due items than free runs, each gets a run of its own, at once. A burst
        that brings more is shared among the free runs, up to `batch_size` items each: Prefect's
        bookkeeping per flow run, not the copies, is what limits how many images a second get across.
        """
        if self._stopping or time.time() < self._pause_until:
            return 0
        free = self.settings.concurrency - len(self._active)
        if free <= 0:
            return 0
        claims = await self.store.journal.claim_due(free * self.settings.batch_size)
        runs = min(free, len(claims))
        for group in (claims[index::runs] for index in range(runs)):
            self._start(group)
        return len(claims)

    async def drain(self) -> None:
        """Wait for every run in flight (tests and shutdown)."""
        while self._active:
            await asyncio.gather(*self._active.values(), return_exceptions=True)

    async def stop(self) -> None:
        """Stop at once: the runs in flight are cancelled (see `shutdown` for the graceful way)."""
        await self.shutdown(grace_seconds=0)

    async def shutdown(self, grace_seconds: float) -> None:
        """Start nothing more; let inline runs in flight finish for up to `grace_seconds`, then cancel the
        rest and put their work back in the journal as pending, for the next start to run again.

        Deployment runs are not waited for: they go on on their workers, and their rows keep their flow
        run ids, so that the next start watches those runs again rather than starting new ones."""
        self._stopping = True
        inline = not isinstance(self.runs, DeploymentFlowRuns)
        if inline and self._active and grace_seconds > 0:
            logger.info("stopping: waiting up to %g s for %d flow run(s) in flight", grace_seconds, len(self._active))
            await asyncio.wait(list(self._active.values()), timeout=grace_seconds)
        left = dict(self._active)
        if left and inline:
            logger.warning(
                "stopping: %d flow run(s) not finished within the grace period go back to the journal: %s",
                len(left),
                ", ".join(_describe(claim) for run in left for claim in self._claims.get(run, [])),
            )
        self._abandoned.update(left)
        for task in left.values():
            task.cancel()
        await asyncio.gather(*left.values(), return_exceptions=True)
        await self.runs.close()

    async def _resume_after_restart(self) -> None:
        """Rows left running by a previous process: watch their flow runs again, or run them anew."""
        by_flow_run: dict[str, list[Claim]] = {}
        for claim in await self.store.journal.running():
            if claim.flow_run_id and isinstance(self.runs, DeploymentFlowRuns):
                by_flow_run.setdefault(claim.flow_run_id, []).append(claim)
            else:  # an inline run died with its process; replication is idempotent
                await self.store.journal.release(claim)
        for group in by_flow_run.values():
            self._start(group)

    def _start(self, claims: list[Claim]) -> None:
        if self.observer:
            for claim in claims:
                self.observer.started(claim)
        run = claims[0].id
        self._claims[run] = claims
        self._active[run] = asyncio.create_task(self._execute(claims), name=f"georeg-work-{run}")

    async def _abandon(self, claims: list[Claim]) -> None:
        """A run that shutdown cancelled: inline, its work not yet settled goes back to pending; a
        deployment's rows keep their flow run, which goes on on its worker and is watched again after
        the restart."""
        if isinstance(self.runs, DeploymentFlowRuns):
            return
        try:
            for claim in claims if len(claims) == 1 else await self.store.journal.unsettled(claims):
                await self.store.journal.release(claim)
        except Exception as error:  # the rows stay running; the next start releases them (_resume_after_restart)
            logger.warning("%s: could not put the work back in the journal: %s", _describe(claims[0]), error)

    async def _execute(self, claims: list[Claim]) -> None:
        run, ok = claims[0].id, False
        try:
            await self.runs.run(claims, self.store)
            ok = True
            if len(claims) > 1:  # a batch settled its items itself; one it did not has failed
                await self._failed(await self.store.journal.unsettled(claims), "the run recorded no outcome")
            elif not await self.store.journal.succeeded(claims[0]):
                logger.info("%s: newer events arrived during the run; running again", _describe(claims[0]))
        except PrefectUnavailable as error:
            logger.warning("%s; the work stays in the journal", error)
            self._pause_until = time.time() + self.settings.poll_seconds * 5
            for claim in claims:
                await self.store.journal.release(claim)
        except asyncio.CancelledError:
            if run in self._abandoned:
                await self._abandon(claims)
            raise
        except Exception as error:  # every failure of a run is recorded, whatever its kind
            if run in self._abandoned:
                # Prefect's engine may turn the cancellation into an error of its own: no failed attempt.
                await self._abandon(claims)
                return
            unsettled = claims if len(claims) == 1 else await self.store.journal.unsettled(claims)
            await self._failed(unsettled, f"{type(error).__name__}: {error}")
        finally:
            self._active.pop(run, None)
            self._claims.pop(run, None)
            if self.observer and run not in self._abandoned:  # not an outcome: the run will be made again
                self.observer.finished(claims, ok)
            self.wake()

    async def _failed(self, claims: list[Claim], error: str) -> None:
        for claim in claims:
            delay = await self.store.journal.failed(
                claim, error, max_attempts=self.settings.max_attempts, backoff_cap=self.settings.backoff_cap_seconds
            )
            logger.warning(
                "%s failed (attempt %d), retrying in %.0fs: %s", _describe(claim), claim.attempts + 1, delay, error
            )


def _describe(claim: Claim) -> str:
    return f"{claim.action} {claim.repository}:{claim.reference} -> {claim.secondary}"
