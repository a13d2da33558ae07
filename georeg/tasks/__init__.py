"""Prefect tasks: one retryable unit of work each, thin wrappers over georeg's plain async functions."""

from georeg.tasks.backfill import list_repositories_task, sync_repository_task, verify_repository_task
from georeg.tasks.replication import (
    confirm_shared_task,
    converge_deletion_task,
    copy_blob_task,
    put_manifests_task,
    resolve_image_task,
    verify_replica_task,
)
from georeg.tasks.retries import retry_if_transient, with_retry_settings

__all__ = [
    "confirm_shared_task",
    "converge_deletion_task",
    "copy_blob_task",
    "list_repositories_task",
    "put_manifests_task",
    "resolve_image_task",
    "retry_if_transient",
    "sync_repository_task",
    "verify_replica_task",
    "verify_repository_task",
    "with_retry_settings",
]
