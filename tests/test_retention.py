"""Retention on a real SQLite file and a real PostgreSQL database: old done events and old finished
runs go, in bounded batches; recent ones, events whose work is still owed and runs in progress stay."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from sqlalchemy import insert, select, update

from georeg.config import parse_config
from georeg.errors import ConfigError
from georeg.events import REPLICATE, AcceptedEvent
from georeg.receiver import create_app
from georeg.state import StateStore
from georeg.state.journal import JournalEvent
from georeg.state.retention import DAY_SECONDS
from georeg.state.runs import RunRecord

OLD = time.time() - 20 * DAY_SECONDS
RECENT = time.time() - 1 * DAY_SECONDS


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'state.db'}"


@pytest.fixture
async def store(url: str):
    state = StateStore(url)
    await state.ensure_schema()
    yield state
    await state.close()


def push(event_id: str, tag: str) -> AcceptedEvent:
    return AcceptedEvent(event_id, REPLICATE, "group/app", tag)


async def received(store: StateStore, event_ids: list[str], at: float) -> None:
    async with store.database.transaction() as session:
        await session.execute(update(JournalEvent).where(JournalEvent.event_id.in_(event_ids)).values(received_at=at))


async def event_ids(store: StateStore) -> set[str]:
    async with store.database.transaction() as session:
        return set(await session.scalars(select(JournalEvent.event_id)))


async def add_run(store: StateStore, name: str, kind: str, started: float, finished: float | None) -> None:
    async with store.database.transaction() as session:
        await session.execute(
            insert(RunRecord).values(
                kind=kind, secondary="east", started_at=started, finished_at=finished, outcome=name, summary="{}"
            )
        )


async def run_names(store: StateStore) -> set[str | None]:
    async with store.database.transaction() as session:
        return set(await session.scalars(select(RunRecord.outcome)))


async def journal_with_every_case(store: StateStore) -> None:
    journal = store.journal
    await journal.record_events([push("old-done", "1")], ["east"])
    [claim] = await journal.claim_due(1)
    assert await journal.succeeded(claim)
    await journal.record_events([push("old-running", "3")], ["east"])
    [running] = await journal.claim_due(1)  # a flow run started from it ...
    await journal.record_events([push("old-newer", "3")], ["east"])  # ... and a newer event is owed after it
    await journal.record_events([push("recent-done", "4")], ["east"])
    [claim] = await journal.claim_due(1)
    assert (running.reference, claim.reference) == ("3", "4")
    assert await journal.succeeded(claim)
    await journal.record_events([push("old-owed", "2")], ["east"])  # pending: its work is owed
    await received(store, ["old-done", "old-owed", "old-running", "old-newer"], OLD)
    await received(store, ["recent-done"], RECENT)


async def test_old_done_events_and_old_finished_runs_go_the_rest_stays(store: StateStore):
    await journal_with_every_case(store)
    await add_run(store, "old-finished", "backfill", OLD, OLD + 60)
    await add_run(store, "old-crashed", "backfill", OLD + 100, OLD + 160)
    await add_run(store, "old-in-progress", "backfill", OLD + 200, None)
    await add_run(store, "latest-backfill", "backfill", OLD + 300, OLD + 360)  # status's "last backfill"
    await add_run(store, "only-verify", "verify", OLD, OLD + 60)  # status's "last verification"
    await add_run(store, "recent-finished", "backfill-batch", RECENT, RECENT + 60)
    await add_run(store, "recent-latest-batch", "backfill-batch", RECENT + 100, RECENT + 160)

    pruned = await store.retention.prune(14)

    assert (pruned.events, pruned.runs) == (1, 2)
    assert await event_ids(store) == {"old-owed", "old-running", "old-newer", "recent-done"}
    assert await run_names(store) == {
        "old-in-progress",
        "latest-backfill",
        "only-verify",
        "recent-finished",
        "recent-latest-batch",
    }
    assert (await store.runs.last("backfill", "east")).outcome == "latest-backfill"  # type: ignore[union-attr]
    assert await store.retention.prune(14) == type(pruned)(events=0, runs=0, batches=[0, 0])  # nothing more
    # A shorter retention reaches the recent ones too, and still never what is owed or running.
    assert (await store.retention.prune(0.5)).events == 1
    assert await event_ids(store) == {"old-owed", "old-running", "old-newer"}


async def test_batches_bound_each_statement(store: StateStore):
    async with store.database.transaction() as session:
        await session.execute(
            insert(JournalEvent),
            [
                {"event_id": f"e{n}", "action": REPLICATE, "repository": "r", "reference": "1", "received_at": OLD}
                for n in range(2500)
            ],
        )
    await store.journal.record_events([push("recent", "1")], ["east"])

    pruned = await store.retention.prune(14, batch_size=1000)

    assert pruned.events == 2500
    assert pruned.batches == [1000, 1000, 500, 0]  # three batches of events, then one (empty) of runs
    assert await event_ids(store) == {"recent"}


async def test_serve_prunes_in_the_background(url: str, store: StateStore, tmp_path: Path):
    await journal_with_every_case(store)
    config = parse_config(
        {
            "primary": {"url": "http://127.0.0.1:1"},
            "secondaries": [{"name": "east", "url": "http://127.0.0.1:2"}],
            "notifications": {"secret": "s"},
            "state": {"url": url, "retention_days": 7},
        },
        base_dir=tmp_path,
    )
    served = StateStore(config.state.url)
    app = create_app(config, served, dispatch=False)
    try:
        async with app.router.lifespan_context(app):
            deadline = time.monotonic() + 30
            while "old-done" in await event_ids(store):
                assert time.monotonic() < deadline, "serve did not prune the old event"
                await asyncio.sleep(0.05)
            assert [task for task in asyncio.all_tasks() if task.get_name() == "georeg-retention"]
        assert not [task for task in asyncio.all_tasks() if task.get_name() == "georeg-retention"]  # stopped with it
    finally:
        await served.close()
    assert await event_ids(store) == {"old-owed", "old-running", "old-newer", "recent-done"}


@pytest.mark.parametrize("days", [0, -1, 3651])
def test_retention_days_is_bounded(days: int, tmp_path: Path):
    raw = {"primary": {"url": "http://127.0.0.1:1"}, "secondaries": [{"name": "east", "url": "http://127.0.0.1:2"}]}
    with pytest.raises(ConfigError, match=r"state\.retention_days: Input should be"):
        parse_config({**raw, "state": {"retention_days": days}}, base_dir=tmp_path)
    kept = parse_config({**raw, "state": {"retention_days": 30, "migrate_on_start": False}}, base_dir=tmp_path)
    assert (kept.state.retention_days, kept.state.migrate_on_start) == (30, False)
    assert parse_config(raw, base_dir=tmp_path).state.retention_days == 14
