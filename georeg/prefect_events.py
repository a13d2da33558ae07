"""georeg's events in Prefect's event feed: every name of an event or a resource is here.

Prefect reacts to the outside world through its events (the feed in the UI, deployment triggers,
automations). georeg emits:

- `georeg.registry.manifest.pushed` / `.deleted`: the receiver accepted a registry event (payload:
  tag, digest, media type; the primary is a related resource);
- `georeg.replication.completed` / `.failed`: an image reached a secondary, or did not (payload:
  bytes copied, or the reason; the secondary is a related resource);
- `georeg.backfill.completed` / `.failed`: a backfill of one secondary ended (payload: its counts).

The registry events are about `georeg.repository.<repository>`, and so are the replication ones;
the backfill events are about `georeg.secondary.<name>`. Emitting is best effort and never raises:
the journal, not the feed, is georeg's durable record. Prefect's `emit_event` hands the event to a
background worker thread that sends it; with no Prefect API to send to, it does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from georeg.events import REPLICATE, AcceptedEvent
from georeg.references import is_digest

logger = logging.getLogger("georeg.prefect_events")

MANIFEST_PUSHED = "georeg.registry.manifest.pushed"
MANIFEST_DELETED = "georeg.registry.manifest.deleted"
REPLICATION_COMPLETED = "georeg.replication.completed"
REPLICATION_FAILED = "georeg.replication.failed"
BACKFILL_COMPLETED = "georeg.backfill.completed"
BACKFILL_FAILED = "georeg.backfill.failed"

REPOSITORY_PREFIX = "georeg.repository."
SECONDARY_PREFIX = "georeg.secondary."
PRIMARY_RESOURCE = "georeg.registry.primary"
# A label of the registry events' resource: triggers match "tag" pushes and leave pushes by digest alone
# (an index's children, which the index's run puts) to the journal.
REFERENCE_KIND_LABEL = "georeg.reference.kind"

# Registry event ids become Prefect event ids through this namespace: a redelivered registry event is
# the same Prefect event, which Prefect's triggers count once.
_EVENT_ID_NAMESPACE = uuid.UUID("6f1c2a57-3b0e-4d8e-9a51-5f0f4d2b7c10")
# Registry events waiting for the emitting task; beyond this the receiver drops them (counted, logged).
_QUEUE_LIMIT = 10_000


def repository_resource(repository: str, **labels: str) -> dict[str, str]:
    return {"prefect.resource.id": f"{REPOSITORY_PREFIX}{repository}", "prefect.resource.name": repository, **labels}


def secondary_resource(secondary: str) -> dict[str, str]:
    return {"prefect.resource.id": f"{SECONDARY_PREFIX}{secondary}", "prefect.resource.name": secondary}


def _related(resource_id: str, role: str, name: str) -> dict[str, str]:
    return {"prefect.resource.id": resource_id, "prefect.resource.role": role, "prefect.resource.name": name}


def primary_related() -> dict[str, str]:
    return _related(PRIMARY_RESOURCE, "primary", "primary")


def secondary_related(secondary: str) -> dict[str, str]:
    return _related(f"{SECONDARY_PREFIX}{secondary}", "secondary", secondary)


def prefect_event_id(registry_event_id: str) -> uuid.UUID:
    return uuid.uuid5(_EVENT_ID_NAMESPACE, registry_event_id)


def emit(
    event: str,
    resource: dict[str, str],
    *,
    related: Sequence[dict[str, str]] = (),
    payload: dict[str, Any] | None = None,
    event_id: uuid.UUID | None = None,
) -> bool:
    """Emit one event through Prefect's events worker; False (and a log line) if it could not be queued."""
    try:
        from prefect.events import emit_event

        emitted = emit_event(event=event, resource=resource, related=list(related), payload=payload, id=event_id)
    except Exception as error:  # the feed is best effort: never fail the work for it
        logger.warning("could not emit %s: %s", event, error)
        return False
    return emitted is not None


def registry_event_name(accepted: AcceptedEvent) -> str:
    return MANIFEST_PUSHED if accepted.action == REPLICATE else MANIFEST_DELETED


def emit_registry_event(accepted: AcceptedEvent) -> bool:
    """`georeg.registry.manifest.pushed|deleted` for one event the receiver journaled."""
    kind = "digest" if is_digest(accepted.reference) else "tag"
    payload = {
        "repository": accepted.repository,
        "reference": accepted.reference,
        "tag": accepted.tag,
        "digest": accepted.digest,
        "media_type": accepted.media_type,
        "registry_event_id": accepted.event_id,
    }
    return emit(
        registry_event_name(accepted),
        repository_resource(accepted.repository, **{REFERENCE_KIND_LABEL: kind}),
        related=[primary_related()],
        payload=payload,
        event_id=prefect_event_id(accepted.event_id),
    )


def emit_replication(
    secondary: str, repository: str, reference: str, action: str, *, error: str | None = None, **figures: Any
) -> bool:
    """`georeg.replication.completed` (with the figures, e.g. bytes copied) or `.failed` (with the reason)."""
    payload: dict[str, Any] = {"repository": repository, "reference": reference, "secondary": secondary}
    payload["action"] = action
    if error is None:
        payload.update(figures)
    else:
        payload["reason"] = error
    return emit(
        REPLICATION_FAILED if error is not None else REPLICATION_COMPLETED,
        repository_resource(repository),
        related=[secondary_related(secondary), primary_related()],
        payload=payload,
    )


def emit_backfill(secondary: str, summary: dict[str, Any], *, failed: bool) -> bool:
    """`georeg.backfill.completed|failed` for one secondary, with the backfill's counts."""
    return emit(
        BACKFILL_FAILED if failed else BACKFILL_COMPLETED,
        secondary_resource(secondary),
        related=[primary_related()],
        payload={**summary, "secondary": secondary},
    )


class RegistryEventFeed:
    """The receiver's side: accepted registry events go to Prefect's feed from a task of their own.

    `submit` only appends to a queue, so the registry's 2xx never waits for Prefect; the task hands
    each event to Prefect's events worker in a thread, since the worker's first use may start it (and,
    without PREFECT_API_URL, Prefect's temporary server)."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[AcceptedEvent] = asyncio.Queue(_QUEUE_LIMIT)
        self._task: asyncio.Task[None] | None = None
        self.emitted = 0
        self.dropped = 0

    def submit(self, events: Iterable[AcceptedEvent]) -> None:
        if self._task is None:
            return  # not started: a receiver without a dispatcher (tests) has no Prefect to tell
        for accepted in events:
            try:
                self._queue.put_nowait(accepted)
            except asyncio.QueueFull:
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    logger.warning("Prefect's event feed is behind: %d registry events not emitted", self.dropped)

    def start(self) -> None:
        # An empty context: Prefect attaches the run of the sender's context as a related resource, and
        # registry events belong to no flow run, whichever run happens to start the feed.
        self._task = asyncio.create_task(self._forward(), name="georeg-prefect-events", context=contextvars.Context())

    async def _forward(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                self.emitted += await asyncio.to_thread(_emit_registry_events, batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def stop(self, timeout: float = 5.0) -> None:
        """Hand what is queued to Prefect's worker (for at most `timeout`), then let its worker send it."""
        if self._task is None:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        await asyncio.to_thread(_drain_prefect_worker, timeout)


def _emit_registry_events(batch: list[AcceptedEvent]) -> int:
    return sum(emit_registry_event(accepted) for accepted in batch)


def _drain_prefect_worker(timeout: float) -> None:
    with contextlib.suppress(Exception):
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=timeout)
