"""The replication steps as Prefect tasks, retried with exponential backoff and jitter when, and only
when, the error says another attempt can succeed. The logic lives in `georeg.replication`."""

from __future__ import annotations

from typing import Any, TypeVar

import httpx
from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from prefect.tasks import exponential_backoff

from georeg import replication
from georeg.config import ReplicationConfig
from georeg.references import ImageReference
from georeg.registry import Descriptor, RegistryClient

T = TypeVar("T", bound=Task[Any, Any])


def retry_if_transient(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry connection failures, 5xx and 429; fail at once on anything a person has to fix."""
    error = state.data
    return bool(getattr(error, "transient", False)) or isinstance(error, httpx.TransportError)


# Clients are live objects, not values: nothing here is cached or persisted between runs.
_RETRYING: dict[str, Any] = {
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


@task(name="resolve-image", task_run_name="resolve {reference}", **_RETRYING)
async def resolve_image_task(primary: RegistryClient, reference: ImageReference) -> replication.ResolvedImage:
    return await replication.resolve_image(primary, reference)


@task(name="copy-blob", task_run_name="copy-blob {blob.digest}", **_RETRYING)
async def copy_blob_task(
    primary: RegistryClient, secondary: RegistryClient, repository: str, blob: Descriptor
) -> replication.BlobCopy:
    return await replication.copy_blob(primary, secondary, repository, blob)


@task(name="put-manifests", task_run_name="put-manifests {image.reference}", **_RETRYING)
async def put_manifests_task(secondary: RegistryClient, image: replication.ResolvedImage) -> None:
    await replication.put_manifests(secondary, image)


@task(name="verify-replica", task_run_name="verify {image.reference}", **_RETRYING)
async def verify_replica_task(secondary: RegistryClient, image: replication.ResolvedImage) -> None:
    await replication.verify_replica(secondary, image)


@task(name="converge-deletion", task_run_name="converge-deletion {reference}", **_RETRYING)
async def converge_deletion_task(
    primary: RegistryClient, secondary: RegistryClient, reference: ImageReference
) -> replication.Deletion:
    return await replication.converge_deletion(primary, secondary, reference)
