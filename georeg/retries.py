"""georeg's retry policy, in one place: which layer retries which kind of failure, and how long it waits.

    failure                                       retried by                      budget
    connection error, 5xx, 408 (replayable body)  the registry client's request   replication.request_attempts
                                                  loop                            per request, and
                                                                                  replication.retries_per_image
                                                                                  per image, whichever ends first
    429                                           the same loop, after the         the same; the pause (Retry-After,
                                                  registry-wide pause              capped at 120 s) holds every worker
    401 with a token that expired                 the auth flow                   once per request
    a streamed chunk that failed                  the chunk copy, resuming at      replication.request_attempts
                                                  the registry's offset            resumes per blob
    a failure above the request (a blob stream     the Prefect task around the      replication.task_retries
    that broke, an upload that must restart)      image                           per image
    a whole event's run that failed               the dispatcher, with backoff     dispatch.max_attempts per event,
                                                                                  then parked (a backfill retries)
    a whole repository that failed in a backfill  the next backfill, after its     for ever, at most once per
                                                  repository's retry_at            retry_backoff_cap_seconds
    a storage SDK call                            the SDK itself (3 attempts)      never again above it
    a Prefect server's 503 (its SQLite was busy)  `georeg serve`'s Prefect client  5 quick tries (1.5 s in
                                                  transport, then Prefect's own    all), then Prefect's
                                                  client                          PREFECT_CLIENT_MAX_RETRIES

A failure that one layer has retried until its budget ran out is marked `exhausted`; no layer above
retries it again, so the layers never multiply.
"""

from __future__ import annotations

import contextlib
import contextvars
import random
from collections.abc import Iterator


def backoff_delay(attempt: int, *, base: float, cap: float, jitter: bool = True) -> float:
    """Seconds to wait before retry number `attempt` (1 for the first): base, 2 x base, 4 x base ... up
    to `cap`, then spread over its upper half so that callers failing together do not retry in step."""
    delay = min(cap, base * 2 ** max(0, attempt - 1))
    return delay * random.uniform(0.5, 1.0) if jitter else delay


class RetryBudget:
    """Retries left for one operation (an image's copy), across every request it sends."""

    def __init__(self, retries: int) -> None:
        self.left = retries

    def take(self) -> bool:
        """Spend one retry; False when none is left."""
        if self.left <= 0:
            return False
        self.left -= 1
        return True


_BUDGET: contextvars.ContextVar[RetryBudget | None] = contextvars.ContextVar("georeg_retry_budget", default=None)


@contextlib.contextmanager
def retry_budget(retries: int) -> Iterator[RetryBudget]:
    """Every request sent inside the block (and in tasks it starts) draws its retries from one budget."""
    budget = RetryBudget(retries)
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


def take_retry() -> bool:
    """Whether the operation under way may retry once more (always, outside any budget)."""
    budget = _BUDGET.get()
    return budget is None or budget.take()
