"""Repositories in groups, a task each: pure logic, without Prefect or registries."""

from __future__ import annotations

import asyncio

import pytest

from georeg.errors import GeoregError, TransientRegistryError
from georeg.repository_groups import GroupUnfinished, RepositoryGroup, in_groups
from georeg.repository_sync import RepositorySync, report_rows


async def test_a_retry_redoes_only_the_repositories_whose_failure_another_attempt_may_fix():
    calls: list[str] = []
    finished: list[None] = []

    async def count_finished() -> None:
        finished.append(None)

    async def work(name: str) -> str:
        calls.append(name)
        if name == "flaky" and calls.count("flaky") == 1:
            raise TransientRegistryError("503")
        if name == "broken":
            raise GeoregError("denied")
        return f"{name} done"

    group: RepositoryGroup[str] = RepositoryGroup(["a", "flaky", "broken"], asyncio.Semaphore(2), count_finished)
    with pytest.raises(GroupUnfinished, match="1 repositories to try again: flaky: 503"):
        await group.run(work)
    assert await group.run(work) == 2  # the retry, as the group's task would make it

    assert sorted(calls) == ["a", "broken", "broken", "flaky", "flaky"]
    assert group.results == {"a": "a done", "flaky": "flaky done"}
    assert list(group.errors) == ["broken"] and not group.errors["broken"].worth_retrying
    assert len(finished) == 3  # each repository once, however often it was tried
    assert str(group) == "a and 2 more"


async def test_groups_share_one_bound_on_repositories_at_once():
    in_flight = peak = 0

    async def work(name: str) -> str:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)  # a stand-in for a repository's requests: something to overlap
        in_flight -= 1
        return name

    sizes: list[int] = []

    async def run(group: RepositoryGroup[str]) -> None:
        sizes.append(len(group.names))
        await group.run(work)

    names = [f"r{number:02}" for number in range(40)]
    outcomes = await in_groups(names, 7, 4, run, of_error=lambda name, error: f"{name} failed")

    assert sorted(sizes) == [5, 7, 7, 7, 7, 7]
    assert sorted(outcomes) == names
    assert peak == 4


async def test_every_repository_is_recorded_even_when_its_groups_task_gives_up_or_fails():
    async def work(name: str) -> str:
        if name.startswith("flaky"):
            raise TransientRegistryError("503")
        return f"{name} done"

    async def run(group: RepositoryGroup[str]) -> None:
        if "boom" in group.names:  # the task fails before it reaches a single repository
            raise RuntimeError("the task itself failed")
        await group.run(work)  # raises GroupUnfinished for the flaky group: its task gives up

    recorded: list[str] = []

    async def record(outcome: str) -> None:
        recorded.append(outcome)

    with pytest.raises(RuntimeError, match="the task itself failed"):
        await in_groups(
            ["a", "b", "flaky-1", "c", "boom", "d"],
            2,
            4,
            run,
            of_error=lambda name, error: f"{name}: {error}",
            record=record,
        )

    # The failed task's group (boom, d) reached no repository: nothing is claimed for either.
    assert sorted(recorded) == ["a done", "b done", "c done", "flaky-1: 503"]


def test_the_report_lists_failures_then_the_slowest_not_every_repository():
    results = [RepositorySync(f"r{number:03}", seconds=number / 10) for number in range(500)]
    results[7].failed["v1"] = "denied"
    results[300].failed["*"] = "could not list"

    rows = report_rows(results)

    assert [row["repository"] for row in rows[:2]] == ["r007", "r300"]
    assert [row["repository"] for row in rows[2:]] == [f"r{number:03}" for number in range(499, 479, -1)]
