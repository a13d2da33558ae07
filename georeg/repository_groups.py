"""Repositories in groups, one Prefect task per group: what a backfill or verify of 10^4 repositories
shows in Prefect is a few hundred task runs, not one per repository, which the UI cannot draw.

A group keeps what each repository came to across its task's retries, so a retry redoes only the
repositories whose failure another attempt may fix. Every group's repositories share one bound, the
number of repositories at once, so the groups' edges never leave that bound idle.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from georeg.concurrency import bounded
from georeg.errors import GeoregError

R = TypeVar("R")

# Groups under way at once: enough that one group's slowest repository does not leave the shared
# bound idle, few enough that Prefect shows a handful of running tasks, not every group at once.
GROUPS_AT_ONCE = 3


class GroupUnfinished(GeoregError):
    """Some repositories of a group failed in a way another attempt may fix: the group's task retries them."""

    transient = True

    def __init__(self, errors: dict[str, GeoregError]) -> None:
        named = "; ".join(f"{name}: {error}" for name, error in list(errors.items())[:3])
        super().__init__(f"{len(errors)} repositories to try again: {named}")


class RepositoryGroup(Generic[R]):
    """The repositories one task works on, and what each came to. A plain class, not a dataclass:
    Prefect rebuilds dataclass parameters when it resolves a task's inputs, and the task must fill in
    this very object, which the flow reads afterwards."""

    def __init__(
        self, names: list[str], room: asyncio.Semaphore, finished: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self.names = names
        self.room = room  # repositories at once, shared by every group of the run
        self.finished = finished  # called once per repository, when it first comes to an end
        self.results: dict[str, R] = {}
        self.errors: dict[str, GeoregError] = {}

    def __str__(self) -> str:  # the task run's name
        return self.names[0] if len(self.names) == 1 else f"{self.names[0]} and {len(self.names) - 1} more"

    async def run(self, work: Callable[[str], Awaitable[R]]) -> int:
        """Do `work` for each repository without a result yet; raise GroupUnfinished when some failed
        in a way worth another attempt. Returns how many repositories have a result."""

        async def one(name: str) -> None:
            first = name not in self.errors
            try:
                self.results[name] = await work(name)
                self.errors.pop(name, None)
            except GeoregError as error:
                self.errors[name] = error
            if first and self.finished is not None:
                await self.finished()

        await asyncio.gather(*(bounded(self.room, one(name)) for name in self.names if name not in self.results))
        worth_retrying = {name: error for name, error in self.errors.items() if error.worth_retrying}
        if worth_retrying:
            raise GroupUnfinished(worth_retrying)
        return len(self.results)

    def outcomes(self, of_error: Callable[[str, GeoregError], R]) -> list[R]:
        """What each repository came to, in the group's order: its result, or what `of_error` makes of
        the error it ended in. A repository never reached (its task was cancelled) has neither."""
        return [
            self.results[name] if name in self.results else of_error(name, self.errors[name])
            for name in self.names
            if name in self.results or name in self.errors
        ]


async def in_groups(
    names: list[str],
    size: int,
    concurrency: int,
    run_group: Callable[[RepositoryGroup[R]], Awaitable[object]],
    *,
    of_error: Callable[[str, GeoregError], R],
    record: Callable[[R], Awaitable[None]] | None = None,
    finished: Callable[[], Awaitable[None]] | None = None,
) -> list[R]:
    """Split `names` into groups of `size` and run each (`run_group`, a task that calls `group.run`), a
    few at once, `concurrency` repositories at once in all. Returns what every repository came to, and
    hands each to `record` as its group ends, even when the group's task gave up or failed."""
    room = asyncio.Semaphore(concurrency)
    groups = [RepositoryGroup[R](names[start : start + size], room, finished) for start in range(0, len(names), size)]
    gate = asyncio.Semaphore(GROUPS_AT_ONCE)
    outcomes: list[R] = []

    async def one(group: RepositoryGroup[R]) -> None:
        try:
            with contextlib.suppress(GroupUnfinished):  # what each repository came to is in the group
                await bounded(gate, run_group(group))
        finally:
            came_to = group.outcomes(of_error)
            outcomes.extend(came_to)
            for outcome in came_to:
                if record is not None:
                    await record(outcome)

    # Every group comes to its end (and is recorded) before a failure of one is raised.
    ended = await asyncio.gather(*(one(group) for group in groups), return_exceptions=True)
    for failure in ended:
        if isinstance(failure, BaseException):
            raise failure
    return outcomes
