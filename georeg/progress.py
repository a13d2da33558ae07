"""Progress of long flows: a Prefect progress artifact in the UI and, when the CLI runs the flow in its
own process, a progress bar (the CLI installs a listener for the duration of the run)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from uuid import UUID

logger = logging.getLogger("georeg.progress")

Listener = Callable[[str, int, int], None]  # (what, done, total)
_listener: ContextVar[Listener | None] = ContextVar("georeg_progress_listener", default=None)


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


class Progress:
    # Each artifact update is a request to the Prefect API, and the advances that queue behind it
    # hold their caller's concurrency slot: a no-op backfill finishes repositories faster than the
    # API can take one update each. One update a second is all a person watching can read.
    INTERVAL_S = 1.0

    def __init__(self, key: str, what: str, total: int) -> None:
        self.key, self.what, self.total = key, what, total
        self.done = 0
        self._artifact: UUID | None = None
        self._shown = -1.0
        self._last_update = 0.0  # time.monotonic() of the last update sent (or being sent)
        self._updating = asyncio.Lock()  # concurrent advances must not land out of order

    async def start(self) -> None:
        from prefect.artifacts import acreate_progress_artifact

        self._artifact = await acreate_progress_artifact(0.0, key=self.key, description=self.what)
        self._notify()

    async def advance(self) -> None:
        from prefect.artifacts import aupdate_progress_artifact

        self.done += 1
        self._notify()
        if self._artifact is None:
            return
        finished = self.done >= self.total
        now = time.monotonic()
        if not finished and now - self._last_update < self.INTERVAL_S:
            return
        self._last_update = now  # before the await: the advances right behind this one skip
        async with self._updating:
            percent = 100.0 * self.done / self.total if self.total else 100.0  # the count now, not when called
            # At most one update per whole percent, too: a long backfill does not send one per repository.
            if int(percent) > int(self._shown) or (percent == 100.0 and self._shown < 100.0):
                self._shown = percent
                await aupdate_progress_artifact(self._artifact, percent)

    def _notify(self) -> None:
        listener = _listener.get()
        if listener is not None:
            listener(self.what, self.done, self.total)
