"""How georeg's Prefect tasks retry: with exponential backoff and jitter when, and only when, the
error says another attempt can succeed."""

from __future__ import annotations

from typing import Any, TypeVar

import httpx
from prefect import Task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from prefect.tasks import exponential_backoff

from georeg.config import ReplicationConfig

T = TypeVar("T", bound=Task[Any, Any])


def retry_if_transient(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry connection failures, 5xx and 429; fail at once on anything a person has to fix."""
    error = state.data
    return bool(getattr(error, "transient", False)) or isinstance(error, httpx.TransportError)


# Clients are live objects, not values: nothing here is cached or persisted between runs.
RETRYING: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_if_transient,
    "cache_policy": NO_CACHE,
}


def with_retry_settings(step: T, settings: ReplicationConfig) -> T:
    """The task with the retry count and base delay from the config's `replication:` block."""
    return step.with_options(  # type: ignore[return-value]
        retries=settings.task_retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=settings.retry_delay_seconds),
    )
