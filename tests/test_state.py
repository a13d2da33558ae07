"""The journal and its work rows on a real SQLite file and a real PostgreSQL database: durability,
deduplication, coalescing, retries, and receivers sharing one PostgreSQL database."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from georeg.errors import ConfigError
from georeg.events import DELETE, REPLICATE, AcceptedEvent
from georeg.state import StateStore, database_url, journal
from georeg.state.journal import PENDING, WorkItem
from georeg.state.sync import FAILED, MISMATCH, STARTED, SYNCED, VERIFIED
from georeg.state.sync import PENDING as PENDING_SYNC
from georeg.tag_records import changed, decode, encode, record_columns


def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """`state.url` for the database `request.param` names; PostgreSQL is started only when a test asks for it."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'state.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path):
    state = StateStore(state_url(request, tmp_path))
    await state.ensure_schema()
    yield state
    await state.close()


def push(event_id: str, tag: str = "1.0") -> AcceptedEvent:
    return AcceptedEvent(event_id, REPLICATE, "group/app", tag)


async def rows(store: StateStore) -> list[WorkItem]:
    from sqlalchemy import select

    async with store.database.transaction() as session:
        return list((await session.scalars(select(WorkItem).order_by(WorkItem.secondary))).all())


async def test_an_event_is_owed_to_every_secondary_and_recorded_once(store):
    assert await store.journal.record_events([push("a")], ["east", "west"]) == 1
    assert await store.journal.record_events([push("a")], ["east", "west"]) == 0  # the registry delivered it again
    assert [(r.secondary, r.action, r.status) for r in await rows(store)] == [
        ("east", REPLICATE, PENDING),
        ("west", REPLICATE, PENDING),
    ]


async def test_a_burst_to_one_tag_is_one_piece_of_work_for_the_latest(store):
    for number in range(20):
        await store.journal.record_events([push(f"burst-{number}")], ["east"])
    [row] = await rows(store)
    claims = await store.journal.claim_due(10)
    assert len(claims) == 1 and claims[0].sequence == row.sequence
    assert await store.journal.claim_due(10) == []  # claimed work is not handed out twice


async def test_events_during_a_run_make_it_run_again(store):
    await store.journal.record_events([push("first")], ["east"])
    [claim] = await store.journal.claim_due(1)
    await store.journal.record_events([push("second")], ["east"])  # arrives while the run is going on

    assert await store.journal.succeeded(claim) is False
    [again] = await store.journal.claim_due(1)
    assert again.sequence > claim.sequence
    assert await store.journal.succeeded(again) is True
    assert await rows(store) == []


CHILD = "sha256:" + "c" * 64


async def test_a_push_by_digest_waits_for_its_index_which_covers_it(store):
    child = AcceptedEvent("child", REPLICATE, "group/app", CHILD)
    await store.journal.record_events([child], ["east"], digest_delay=60)
    await store.journal.record_events([push("index", tag="multi")], ["east"], digest_delay=60)

    [claim] = await store.journal.claim_due(10)  # the tag at once; the child is not due yet
    assert claim.reference == "multi"
    assert await store.journal.covered("east", "group/app", [CHILD]) == 1  # the index's run put the child
    assert await store.journal.succeeded(claim) is True
    assert await rows(store) == []


async def test_a_push_by_digest_whose_index_never_comes_is_still_replicated(store):
    await store.journal.record_events([AcceptedEvent("child", REPLICATE, "group/app", CHILD)], ["east"], digest_delay=1)
    assert await store.journal.claim_due(10) == []

    async with store.database.transaction() as session:  # as if the delay had passed
        from sqlalchemy import update

        await session.execute(update(WorkItem).values(next_attempt_at=time.time() - 1))
    [claim] = await store.journal.claim_due(10)
    assert claim.reference == CHILD


async def test_covering_leaves_running_rows_other_repositories_and_deletes_alone(store):
    await store.journal.record_events([AcceptedEvent("running", REPLICATE, "group/app", CHILD)], ["east"])
    await store.journal.claim_due(10)
    await store.journal.record_events(
        [
            AcceptedEvent("other", REPLICATE, "group/other", CHILD),
            AcceptedEvent("gone", DELETE, "group/app", "sha256:" + "d" * 64),
        ],
        ["east"],
    )
    assert await store.journal.covered("east", "group/app", [CHILD, "sha256:" + "d" * 64]) == 0
    assert len(await rows(store)) == 3


async def test_unsettled_claims_are_those_still_running(store):
    await store.journal.record_events([push(f"u{number}", tag=f"{number}") for number in range(3)], ["east"])
    first, second, third = await store.journal.claim_due(10)
    assert await store.journal.succeeded(first) is True
    await store.journal.failed(second, "boom", max_attempts=5, backoff_cap=10)

    assert await store.journal.unsettled([first, second, third]) == [third]
    assert await store.journal.succeeded(first) is True  # settled already: nothing is run again


async def test_a_row_settled_and_claimed_again_is_not_the_old_claims_to_settle(store):
    await store.journal.record_events([push("old")], ["east"])
    [claim] = await store.journal.claim_due(10)
    await store.journal.record_events([push("new")], ["east"])  # arrives while the run goes on
    assert await store.journal.succeeded(claim) is False  # settled: back to pending for the newer event
    [again] = await store.journal.claim_due(10)  # another run takes it before the first run's end is seen

    assert await store.journal.unsettled([claim]) == []
    assert await store.journal.unsettled([again]) == [again]


async def test_the_latest_event_decides_the_action(store):
    await store.journal.record_events([push("p")], ["east"])
    await store.journal.record_events([AcceptedEvent("d", DELETE, "group/app", "1.0")], ["east"])
    [claim] = await store.journal.claim_due(1)
    assert claim.action == DELETE


async def test_failures_back_off_grow_and_park_after_max_attempts(store):
    await store.journal.record_events([push("x")], ["east"])
    delays = []
    for _ in range(3):
        [claim] = await store.journal.claim_due(1)
        delays.append(await store.journal.failed(claim, "boom", max_attempts=3, backoff_cap=1000))
        async with store.database.transaction() as session:  # make it due again instead of waiting out the backoff
            from sqlalchemy import update

            await session.execute(update(WorkItem).values(next_attempt_at=time.time() - 1))
    [row] = await rows(store)
    assert row.status == journal.FAILED and row.attempts == 3 and row.last_error == "boom"
    assert delays[2] > delays[0]
    assert await store.journal.claim_due(1) == []  # parked: visible, not retried until a new event
    await store.journal.record_events([push("y")], ["east"])
    assert len(await store.journal.claim_due(1)) == 1  # a new event revives it


async def test_repository_states_are_written_in_bulk(store):
    """A backfill marks its repositories started in one go and records successes in batches, more rows
    than one statement takes; a failure recorded before still counts and a success clears it."""
    names = [f"group/app{number:04d}" for number in range(1234)]
    await store.sync.repository_failed("east", names[0], "boom", base=1, cap=10)
    await store.sync.set_repository_states("east", names, state=STARTED)
    assert {row.state for row in (await store.sync.repository_states("east")).values()} == {STARTED}

    await store.sync.repositories_synced("east", names[:1000])

    states = await store.sync.repository_states("east")
    assert len(states) == 1234 and states[names[-1]].state == STARTED
    assert states[names[0]].state == SYNCED and states[names[0]].retry_count == 0
    assert states[names[0]].last_failure is None and states[names[999]].last_synced_at is not None
    assert not await store.sync.repository_states("west")


async def test_status_counts_failures_and_deferred_repositories_are_queries_not_a_scan_of_rows(store):
    names = [f"group/app{number:04d}" for number in range(30)]
    await store.sync.repositories_synced("east", names[:20])
    await store.sync.set_repository_states("east", names[20:25], state=STARTED)
    for name in names[25:]:
        await store.sync.repository_failed("east", name, f"{name} failed", base=3600, cap=7200)
    await store.sync.repository_failed("east", names[0], "failed, retry due", base=0, cap=1)
    await store.sync.repository_verified("east", names[1], None)
    await store.sync.repository_verified("east", names[2], "tag v1 missing")  # back to pending

    states, verifications = await store.sync.counts("east")
    latest = await store.sync.latest_failures("east", 3)

    assert states == {SYNCED: 18, STARTED: 5, FAILED: 6, PENDING_SYNC: 1}
    assert verifications == {VERIFIED: 1, MISMATCH: 1, None: 28}
    assert [row.repository for row in latest] == [names[0], names[29], names[28]]
    assert await store.sync.deferred_repositories("east") == set(names[25:])
    assert await store.sync.known_repositories("east") == set(names)
    assert await store.sync.counts("west") == ({}, {})


async def test_tag_records_are_written_and_loaded_in_bulk_and_a_failure_forgets_one(store):
    """A backfill loads every record of its repositories in a few queries and writes each its own; a
    pass that trusted the record keeps the time of the last full check; an event changes one record."""
    names = [f"group/app{number:04d}" for number in range(1234)]
    records = {
        name: record_columns({"v1": f"sha256:{number:064x}"}, checked_at=5.0) for number, name in enumerate(names)
    }
    await store.sync.repositories_synced("east", names, records)
    # A later pass trusted the records: new records, the check time kept.
    await store.sync.repositories_synced("east", names[:2], {n: record_columns({}, checked_at=None) for n in names[:2]})

    loaded = await store.sync.tag_records("east", [*names, "group/unknown"])

    assert len(loaded) == 1234 and "group/unknown" not in loaded
    assert loaded[names[0]] == ("{}", 5.0)
    assert loaded[names[-1]] == (encode({"v1": f"sha256:{1233:064x}"}), 5.0)
    assert await store.sync.tag_records("west", names) == {}

    await store.sync.update_tag_record("east", names[5], lambda text: changed(text, wrote={"v2": "x"}, removed=None))
    assert decode((await store.sync.tag_records("east", [names[5]]))[names[5]][0]) == {
        "v1": f"sha256:{5:064x}",
        "v2": "x",
    }
    await store.sync.repository_failed("east", names[5], "boom", base=1, cap=10)
    assert (await store.sync.tag_records("east", [names[5]]))[names[5]] == (None, 5.0)
    assert (await store.sync.repository_states("east"))[names[5]].state == FAILED  # the record is not loaded there


async def test_running_rows_are_listed_for_recovery_and_can_be_released(store):
    await store.journal.record_events([push("r")], ["east"])
    [claim] = await store.journal.claim_due(1)
    await store.journal.set_flow_run(claim, "run-1")
    [running] = await store.journal.running()
    assert running.flow_run_id == "run-1"
    await store.journal.release(running)
    assert [c.id for c in await store.journal.claim_due(1)] == [claim.id]


def test_database_urls_map_to_the_async_drivers():
    assert database_url("sqlite:///georeg.db") == "sqlite+aiosqlite:///georeg.db"
    assert database_url("postgresql://u@h/db") == "postgresql+asyncpg://u@h/db"
    with pytest.raises(ConfigError, match=r"state\.url: 'mysql' is not supported"):
        database_url("mysql://h/db")


@pytest.fixture(params=["sqlite", "postgresql"])
async def receivers(request: pytest.FixtureRequest, tmp_path: Path):
    """Two StateStores on one database, as two `georeg serve` processes sharing `state.url`."""
    url = state_url(request, tmp_path)
    first, second = StateStore(url), StateStore(url)
    await first.ensure_schema()
    yield first, second
    await first.close()
    await second.close()


async def test_two_receivers_on_one_database_never_claim_the_same_row(receivers):
    """SELECT ... FOR UPDATE SKIP LOCKED (PostgreSQL), BEGIN IMMEDIATE (SQLite): concurrent claims split the rows."""
    first, second = receivers
    events = [push(f"tag-{number}", tag=f"{number}.0") for number in range(150)]
    assert await first.journal.record_events(events, ["east", "west"]) == 150
    all_ids = {row.id for row in await rows(first)}
    assert len(all_ids) == 300

    async def claim_all(store: StateStore) -> list[int]:
        claimed: list[int] = []
        while batch := await store.journal.claim_due(7):
            claimed.extend(claim.id for claim in batch)
        return claimed

    # Two claimers per receiver, so each store also races itself over its connection pool.
    claims = await asyncio.gather(claim_all(first), claim_all(second), claim_all(first), claim_all(second))
    by_first, by_second = claims[0] + claims[2], claims[1] + claims[3]
    assert by_first and by_second, "both receivers should get some of the work"
    assert len(by_first) + len(by_second) == len(set(by_first) | set(by_second)), "a row was claimed twice"
    assert set(by_first).isdisjoint(by_second)
    assert set(by_first) | set(by_second) == all_ids
    assert len(await first.journal.running()) == 300


async def test_an_event_delivered_to_two_receivers_at_once_is_journaled_once(receivers):
    first, second = receivers
    for number in range(20):
        event = [push(f"twice-{number}", tag=f"{number}.0")]
        assert sorted(
            await asyncio.gather(
                first.journal.record_events(event, ["east"]), second.journal.record_events(event, ["east"])
            )
        ) == [0, 1]
    assert await first.journal.depth() == 20


async def test_two_backfills_starting_at_once_get_one_lease(receivers):
    first, second = receivers
    for number in range(20):
        lease = f"backfill:east-{number}"
        got = await asyncio.gather(first.leases.acquire(lease, "one", 60), second.leases.acquire(lease, "two", 60))
        [winner] = [holder for holder in got if holder is not None]  # the other one is told the lease is taken
        assert await first.leases.holder(lease) == winner


async def test_two_failures_of_a_new_repository_at_once_both_count(receivers):
    first, second = receivers
    for number in range(20):
        repository = f"group/new-{number}"
        await asyncio.gather(
            first.sync.repository_failed("east", repository, "one", base=1, cap=10),
            second.sync.repository_failed("east", repository, "two", base=1, cap=10),
        )
        state = (await first.sync.repository_states("east"))[repository]
        assert (state.state, state.retry_count) == (FAILED, 2)


async def test_a_registry_pause_only_grows(store: StateStore):
    assert await store.pauses.paused_until("georeg-pause-registry-443") == 0.0
    await store.pauses.pause("georeg-pause-registry-443", 2000.0)
    await store.pauses.pause("georeg-pause-registry-443", 1000.0)  # a shorter pause does not cut it short
    assert await store.pauses.paused_until("georeg-pause-registry-443") == 2000.0
    await store.pauses.pause("georeg-pause-registry-443", 3000.0)
    assert await store.pauses.paused_until("georeg-pause-registry-443") == 3000.0
    assert await store.pauses.paused_until("georeg-pause-other-443") == 0.0


async def test_events_mode_a_triggered_run_settles_the_work_its_start_covers(store):
    await store.journal.record_events([push("first")], ["east", "west"], dispatch_delay=60)
    assert await store.journal.claim_due(10) == []  # the dispatcher waits: the trigger's run comes first
    covered = await store.journal.last_sequence()  # the triggered run starts here
    await store.journal.record_events([push("during")], ["west"], dispatch_delay=60)  # pushed while it runs

    assert await store.journal.settle_through("east", "group/app", "1.0", covered) == 1
    assert await store.journal.settle_through("west", "group/app", "1.0", covered) == 0  # newer than the run
    assert [(row.secondary, row.sequence > covered) for row in await rows(store)] == [("west", True)]


async def test_events_mode_leaves_a_row_the_dispatcher_is_running_to_that_run(store):
    await store.journal.record_events([push("first")], ["east"])
    [claim] = await store.journal.claim_due(1)  # the fallback dispatched it
    assert await store.journal.settle_through("east", "group/app", "1.0", claim.sequence) == 0
    assert await store.journal.succeeded(claim) is True
