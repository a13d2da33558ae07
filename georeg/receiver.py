"""The notification receiver: the primary registry's webhooks in, journaled work out.

Routes: `POST /api/v4/container_registry_event/events` (GitLab's path, so existing registry configs
work unchanged) and `POST /events`; `GET /healthz`; `GET /metrics` (Prometheus text, counts only: no
label holds a repository name); `GET /status` (the same document as `georeg status --json`, behind
`Authorization: Bearer <notifications.status_token>`, and refused when no token is configured).

An accepted event is in the journal before the 2xx leaves, so an event the registry considers
delivered is never lost. The receiver answers fast and never 5xx for anything a request contains:
the registry delivers serially, and a refused event blocks every event behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from georeg.config import GeoregConfig
from georeg.dispatcher import Dispatcher
from georeg.errors import ConfigError
from georeg.events import EVENTS_MEDIA_TYPE, InvalidEvents, classify
from georeg.lifecycle import run_unblocked
from georeg.prefect_events import RegistryEventFeed
from georeg.state import Claim, StateStore
from georeg.status import collect_status

logger = logging.getLogger("georeg.receiver")

EVENTS_PATHS = ("/api/v4/container_registry_event/events", "/events")
_ACCEPTED_CONTENT_TYPES = {EVENTS_MEDIA_TYPE, "application/json"}


class ReceiverMetrics:
    """Prometheus metrics of one receiver (its own registry, so several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.received = Counter("georeg_events_received", "Events in accepted envelopes", registry=self.registry)
        self.accepted = Counter("georeg_events_accepted", "Events journaled for replication", registry=self.registry)
        self.ignored = Counter("georeg_events_ignored", "Events acknowledged and dropped", registry=self.registry)
        self.rejected = Counter(
            "georeg_requests_rejected", "Requests refused, by reason", ["reason"], registry=self.registry
        )
        self.dispatch_lag = Histogram(
            "georeg_dispatch_lag_seconds",
            "From an event's arrival to the start of the flow run that serves it",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
            registry=self.registry,
        )
        self.journal_depth = Gauge("georeg_journal_depth", "Work items not yet done", registry=self.registry)
        self.runs = Counter("georeg_flow_runs", "Flow runs finished, by outcome", ["outcome"], registry=self.registry)

    def started(self, claim: Claim) -> None:
        self.dispatch_lag.observe(max(0.0, time.time() - claim.first_event_at))

    def finished(self, claims: list[Claim], ok: bool) -> None:
        self.runs.labels("completed" if ok else "failed").inc()


def create_app(config: GeoregConfig, store: StateStore, *, dispatch: bool = True) -> Starlette:
    """The receiver app; with `dispatch`, its lifespan also runs the dispatcher."""
    secrets = [secret.encode() for secret in config.notifications.accepted_secrets()]
    if not secrets:
        raise ConfigError("notifications.secret: georeg serve needs the secret the registry sends as Authorization")
    token = config.notifications.status_token
    status_token = token.get_secret_value().encode() if token is not None else None
    secondaries = [secondary.name for secondary in config.secondaries]
    limit = config.notifications.max_body_bytes
    metrics = ReceiverMetrics()
    dispatcher = Dispatcher.for_config(config, store, metrics)
    feed = RegistryEventFeed()
    # events mode: Prefect's trigger on the emitted event starts the run; the journal's work waits this long.
    fallback_delay = config.dispatch.events_fallback_seconds if config.dispatch.mode == "events" else 0.0

    def refuse(status: int, reason: str, message: str) -> JSONResponse:
        metrics.rejected.labels(reason).inc()
        return JSONResponse({"error": message}, status_code=status)

    async def receive_events(request: Request) -> Response:
        supplied = request.headers.get("authorization", "").encode()
        if not any(hmac.compare_digest(supplied, secret) for secret in secrets):
            return refuse(401, "unauthorized", "the Authorization header does not match notifications.secret")
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in _ACCEPTED_CONTENT_TYPES:
            return refuse(415, "media_type", f"expected Content-Type {EVENTS_MEDIA_TYPE}")
        body = await _read_at_most(request, limit)
        if body is None:
            response = refuse(413, "too_large", f"the body exceeds {limit} bytes")
            # A client that sent that much should start afresh; and if the discarding stopped at its caps,
            # what is left of the body must not be read as the next request.
            response.headers["Connection"] = "close"
            return response
        try:
            classified = classify(json.loads(body))
        except (ValueError, RecursionError):
            return refuse(400, "malformed", "the body is not valid JSON")
        except InvalidEvents as error:
            return refuse(400, "invalid", str(error))
        try:
            new = (
                await store.journal.record_events(
                    classified.accepted,
                    secondaries,
                    digest_delay=config.dispatch.digest_push_delay_seconds,
                    dispatch_delay=fallback_delay,
                )
                if classified.accepted
                else 0
            )
        except SQLAlchemyError as error:
            # Not the request's fault: the registry keeps the event and delivers it again.
            logger.error("journal unavailable: %s", error)
            return JSONResponse({"error": "the journal is unavailable; deliver again later"}, status_code=503)
        metrics.received.inc(len(classified.accepted) + classified.ignored)
        metrics.accepted.inc(len(classified.accepted))
        metrics.ignored.inc(classified.ignored)
        if new:
            dispatcher.wake()
            # After the journal, never instead of it; only queued here, so the answer does not wait for Prefect.
            feed.submit(classified.accepted)
        return JSONResponse({"accepted": len(classified.accepted), "new": new, "ignored": classified.ignored})

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def status(request: Request) -> Response:
        # The document names repositories and their failures: only for holders of the status token.
        if status_token is None:
            return refuse(403, "status_disabled", "GET /status is off: set notifications.status_token to enable it")
        scheme, _, supplied = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(supplied.strip().encode(), status_token):
            response = refuse(401, "status_unauthorized", "GET /status needs Authorization: Bearer <status_token>")
            response.headers["WWW-Authenticate"] = 'Bearer realm="georeg status"'
            return response
        return JSONResponse(await collect_status(config, store))

    async def metrics_endpoint(request: Request) -> Response:
        metrics.journal_depth.set(await store.journal.depth())
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await store.ensure_schema(migrate=config.state.migrate_on_start)
        if dispatch and config.dispatch.mode == "inline":
            await _start_prefect_api()
        if dispatch:
            feed.start()
        loop_task = asyncio.create_task(dispatcher.run_forever(), name="georeg-dispatcher") if dispatch else None
        retention_days = config.state.retention_days
        pruning = asyncio.create_task(store.retention.prune_forever(retention_days), name="georeg-retention")
        try:
            yield
        finally:
            # uvicorn has stopped accepting and answered what was in flight; now the flow runs.
            pruning.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pruning
            if loop_task is not None:
                loop_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop_task
            await dispatcher.shutdown(config.dispatch.shutdown_grace_seconds)
            await feed.stop()

    routes = [Route(path, receive_events, methods=["POST"]) for path in EVENTS_PATHS]
    routes += [Route("/healthz", healthz), Route("/metrics", metrics_endpoint), Route("/status", status)]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.dispatcher = dispatcher
    app.state.metrics = metrics
    app.state.feed = feed
    return app


# After deciding 413, the rest of the body is read and dropped, up to this many times the limit and for at
# most this long, before the answer goes out. A client still sending when the connection closes gets a
# reset instead of the 413 (broken pipe), and the registry would log that rather than the reason; nginx's
# lingering close does the same. The caps bound what a hostile client can make the receiver read.
_DISCARD_FACTOR = 4
_DISCARD_SECONDS = 5.0


async def _read_at_most(request: Request, limit: int) -> bytes | None:
    """The body, or None when it exceeds `limit` (never buffering more than that); an oversized body is
    read to its end and dropped, within the caps above, so that the client is listening for the answer."""
    declared = request.headers.get("content-length", "")
    too_large = declared.isdigit() and int(declared) > limit
    if too_large and request.headers.get("expect", "").lower() == "100-continue":
        return None  # the client sends nothing until it has an answer: there is nothing to drain
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _DISCARD_SECONDS
    body = bytearray()
    received = 0
    while True:
        try:
            # Only the discarding is timed: a legitimate body may trickle in as slowly as the server allows.
            timeout = max(0.0, deadline - loop.time()) if too_large else None
            message = await asyncio.wait_for(request.receive(), timeout)
        except asyncio.TimeoutError:
            break
        if message["type"] == "http.disconnect":
            if too_large:
                break
            raise ClientDisconnect()  # as request.stream() does: a body cut short is never processed
        piece = message.get("body", b"")
        received += len(piece)
        if not too_large:
            body += piece
            if len(body) > limit:
                too_large, body = True, bytearray()
                deadline = loop.time() + _DISCARD_SECONDS
        if not message.get("more_body", False) or (too_large and received > _DISCARD_FACTOR * limit):
            break
    return None if too_large else bytes(body)


async def _start_prefect_api() -> None:
    """Without PREFECT_API_URL, Prefect starts a temporary server on first use (about 10 s): pay it
    at start-up rather than on the first event. It is started with the stop signals unblocked
    (georeg.lifecycle), so that it obeys the SIGTERM that stops it."""
    from prefect.client.orchestration import get_client

    def healthcheck() -> None:
        with get_client(sync_client=True) as client:
            client.api_healthcheck()

    await asyncio.to_thread(run_unblocked, healthcheck)
