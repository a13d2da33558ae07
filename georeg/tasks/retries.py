"""How georeg's Prefect tasks retry: with exponential backoff and jitter when, and only when, the
error says another attempt can succeed and no layer below has already retried it (`georeg.retries`)."""

from __future__ import annotations

from typing import Any, TypeVar

import httpx
from prefect import Task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from georeg.config import ReplicationConfig
from georeg.errors import GeoregError
from georeg.retries import backoff_delay

T = TypeVar("T", bound=Task[Any, Any])
_MAX_TASK_DELAY_SECONDS = 600.0


def retry_if_transient(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry what may work next time and was not retried already; fail at once on anything a person has to fix."""
    error = state.data
    if isinstance(error, GeoregError):
        return error.worth_retrying
    return isinstance(error, httpx.TransportError)  # a body stream that broke: only the whole task can redo it


def task_delays(retries: int, base: float) -> list[float]:
    """The waits before each of a task's retries; Prefect spreads them with `retry_jitter_factor`."""
    return [backoff_delay(n, base=base, cap=_MAX_TASK_DELAY_SECONDS, jitter=False) for n in range(1, retries + 1)]


# Clients are live objects, not values: nothing here is cached or persisted between runs.
RETRYING: dict[str, Any] = {
    "retries": ReplicationConfig().task_retries,
    "retry_delay_seconds": task_delays(ReplicationConfig().task_retries, ReplicationConfig().retry_delay_seconds),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_if_transient,
    "cache_policy": NO_CACHE,
}


def with_retry_settings(step: T, settings: ReplicationConfig) -> T:
    """The task with the retry count and base delay from the config's `replication:` block."""
    return step.with_options(  # type: ignore[return-value]
        retries=settings.task_retries,
        retry_delay_seconds=task_delays(settings.task_retries, settings.retry_delay_seconds),
    )
