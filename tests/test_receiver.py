"""The receiver's HTTP contract, every input rule, on the real app with a real SQLite or PostgreSQL journal."""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from georeg.config import parse_config
from georeg.events import EVENTS_MEDIA_TYPE
from georeg.receiver import create_app
from georeg.registry.manifests import DOCKER_MANIFEST
from georeg.state import StateStore

SECRET = "s3cret-token"
PATH = "/api/v4/container_registry_event/events"
DIGEST = "sha256:" + "d" * 64


STATUS_TOKEN = "status-token-0123456789"


@contextlib.asynccontextmanager
async def receiver_client(state_url: str, base_dir: Path, **notifications: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The real app (no dispatcher) with its journal, and an HTTP client talking to it."""
    config = parse_config(
        {
            "primary": {"url": "http://127.0.0.1:1"},
            "secondaries": [{"name": "east", "url": "http://127.0.0.1:2"}],
            "notifications": {"secret": SECRET, "secrets": ["next-secret"], "max_body_bytes": 4096, **notifications},
            "state": {"url": state_url},
        },
        base_dir=base_dir,
    )
    store = StateStore(config.state.url)
    await store.ensure_schema()
    app = create_app(config, store, dispatch=False)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://receiver") as client:
            client.store = store  # type: ignore[attr-defined]
            yield client
    finally:
        await store.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def receiver(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    if request.param == "postgresql":
        state_url = request.getfixturevalue("postgres_url")
    else:
        state_url = f"sqlite:///{tmp_path / 'journal.db'}"
    async with receiver_client(state_url, tmp_path, status_token=STATUS_TOKEN) as client:
        yield client


def envelope(*events: dict) -> bytes:
    return json.dumps({"events": list(events)}).encode()


def manifest_push(event_id: str = "ev-1", tag: str = "1.0") -> dict:
    target = {"mediaType": DOCKER_MANIFEST, "repository": "group/app", "digest": DIGEST, "tag": tag}
    return {"id": event_id, "action": "push", "target": target}


async def post(
    client: httpx.AsyncClient,
    body: bytes,
    *,
    secret: str = SECRET,
    path: str = PATH,
    content_type: str = EVENTS_MEDIA_TYPE,
) -> httpx.Response:
    return await client.post(path, content=body, headers={"Authorization": secret, "Content-Type": content_type})


async def test_a_manifest_push_is_journaled_before_the_answer(receiver):
    response = await post(receiver, envelope(manifest_push()))
    assert response.status_code == 200
    assert response.json() == {"accepted": 1, "new": 1, "ignored": 0}
    assert await receiver.store.journal.depth() == 1


async def test_both_paths_and_both_secrets_are_accepted(receiver):
    assert (await post(receiver, envelope(manifest_push("a")), path="/events")).status_code == 200
    assert (await post(receiver, envelope(manifest_push("b")), secret="next-secret")).status_code == 200
    assert (await post(receiver, envelope(manifest_push("c")), content_type="application/json")).status_code == 200


async def test_a_redelivered_event_is_recorded_once(receiver):
    await post(receiver, envelope(manifest_push("same")))
    again = await post(receiver, envelope(manifest_push("same")))
    assert again.status_code == 200 and again.json()["new"] == 0
    assert await receiver.store.journal.depth() == 1


async def test_events_georeg_does_not_need_are_acknowledged_and_dropped(receiver):
    pull = {"id": "p", "action": "pull", "target": {"repository": "group/app", "digest": DIGEST}}
    blob = {
        "id": "b",
        "action": "push",
        "target": {"mediaType": "application/octet-stream", "repository": "group/app", "digest": DIGEST},
    }
    response = await post(receiver, envelope(pull, blob))
    assert response.status_code == 200 and response.json() == {"accepted": 0, "new": 0, "ignored": 2}
    assert await receiver.store.journal.depth() == 0


@pytest.mark.parametrize(
    ("request_kwargs", "status"),
    [
        ({"secret": "wrong"}, 401),
        ({"secret": ""}, 401),
        ({"content_type": "text/plain"}, 415),
        ({"body": b"{not json"}, 400),
        ({"body": b'{"no": "events"}'}, 400),
        ({"body": envelope({"id": "x", "action": "push", "target": {"repository": "UPPER/case", "tag": "1"}})}, 400),
        (
            {"body": envelope({"id": "x", "action": "delete", "target": {"repository": "a", "digest": "sha256:zz"}})},
            400,
        ),
        ({"body": b"[" * 5000}, 413),
        ({"body": b"[" * 3000 + b"]" * 3000}, 413),
        ({"body": b"[" * 2000 + b"]" * 2000}, 400),
    ],
)
async def test_bad_input_gets_a_4xx_and_leaves_nothing(receiver, request_kwargs, status):
    request_kwargs = dict(request_kwargs)  # the parameter dict is shared by the sqlite and postgresql runs
    body = request_kwargs.pop("body", envelope(manifest_push()))
    response = await post(receiver, body, **request_kwargs)
    assert response.status_code == status
    assert "error" in response.json()
    assert await receiver.store.journal.depth() == 0


async def test_random_bodies_never_produce_a_5xx(receiver):
    # Seeded: the same 30 bodies every run, so a body that fails here fails again where it can be looked at.
    bodies = random.Random(20261202)
    for size in (0, 1, 7, 100, 1000, 4000):
        for _ in range(5):
            body = bodies.randbytes(size)
            response = await post(receiver, body)
            assert 400 <= response.status_code < 500, body[:64]
    assert await receiver.store.journal.depth() == 0
    assert (await receiver.get("/healthz")).text == "ok"


async def test_metrics_count_what_happened(receiver):
    await post(receiver, envelope(manifest_push("m1")))
    await post(receiver, envelope(manifest_push("m2")), secret="nope")
    text = (await receiver.get("/metrics")).text
    assert "georeg_events_accepted_total 1.0" in text
    assert 'georeg_requests_rejected_total{reason="unauthorized"} 1.0' in text
    assert "georeg_journal_depth 1.0" in text


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer wrong-token-0123456789", f"Basic {STATUS_TOKEN}", STATUS_TOKEN, f"Bearer {SECRET}"],
)
async def test_status_needs_the_status_token_as_a_bearer_token(receiver, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}

    refused = await receiver.get("/status", headers=headers)

    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert "secondaries" not in refused.text


async def test_status_with_the_token_is_the_status_document(receiver):
    await post(receiver, envelope(manifest_push()))

    response = await receiver.get("/status", headers={"Authorization": f"Bearer {STATUS_TOKEN}"})

    assert response.status_code == 200
    document = response.json()
    assert document["version"] == 1 and [entry["name"] for entry in document["secondaries"]] == ["east"]


async def test_without_a_status_token_status_is_refused_and_the_rest_stays_open(tmp_path: Path):
    async with receiver_client(f"sqlite:///{tmp_path / 'journal.db'}", tmp_path) as client:
        refused = await client.get("/status", headers={"Authorization": f"Bearer {STATUS_TOKEN}"})
        assert refused.status_code == 403
        assert "notifications.status_token" in refused.json()["error"]
        assert (await client.get("/healthz")).text == "ok"
        assert (await client.get("/metrics")).status_code == 200


async def test_metrics_carry_no_repository_name(receiver):
    await post(receiver, envelope(manifest_push("m1")))
    await post(receiver, envelope(manifest_push("m2")), secret="nope")
    await post(receiver, b"{bad")
    await receiver.get("/status")

    text = (await receiver.get("/metrics")).text

    assert "group/app" not in text
    labels = {
        label for family in text_string_to_metric_families(text) for sample in family.samples for label in sample.labels
    }
    assert "reason" in labels and labels <= {"reason", "outcome", "le"}  # counts by kind, never by repository
    assert SECRET not in text and STATUS_TOKEN not in text
