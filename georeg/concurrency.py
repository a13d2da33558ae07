"""Running many awaitables at once, within bounds."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Hashable, Iterable
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


# Per event loop: an asyncio semaphore belongs to the loop it is used on (tests run one loop a test).
_SHARED: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Hashable, asyncio.Semaphore]] = (
    weakref.WeakKeyDictionary()
)


def shared_semaphore(key: Hashable, size: int) -> asyncio.Semaphore:
    """The one semaphore of this process (and event loop) named `key`, made with `size` on first use:
    everything that asks for the same key shares its bound, whichever flow run or client asks."""
    semaphores = _SHARED.setdefault(asyncio.get_running_loop(), {})
    return semaphores.setdefault(key, asyncio.Semaphore(size))
