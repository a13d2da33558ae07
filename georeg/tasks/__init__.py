"""Prefect tasks: one retryable unit of replication each, wrapping `georeg.replication` one-to-one."""

from georeg.tasks.replication import (
    converge_deletion_task,
    copy_blob_task,
    put_manifests_task,
    resolve_image_task,
    retry_if_transient,
    verify_replica_task,
    with_retry_settings,
)

__all__ = [
    "converge_deletion_task",
    "copy_blob_task",
    "put_manifests_task",
    "resolve_image_task",
    "retry_if_transient",
    "verify_replica_task",
    "with_retry_settings",
]
