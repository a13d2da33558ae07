"""Running many awaitables at once, within bounds."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import TypeVar

T = TypeVar("T")


async def bounded(semaphore: asyncio.Semaphore, work: Awaitable[T]) -> T:
    """Await `work` once `semaphore` has room: bounds how many run at once."""
    async with semaphore:
        return await work


async def all_or_nothing(works: Iterable[Awaitable[T]]) -> list[T]:
    """Await every one at once; at the first failure, cancel the others before raising it, so that a
    step that has failed stops sending requests instead of finishing work nobody will use."""
    tasks = [asyncio.ensure_future(work) for work in works]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
