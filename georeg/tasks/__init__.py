"""Prefect tasks: one retryable unit of work each, thin wrappers over georeg's plain async functions.

Imported on first use, so a replicate or delete flow run does not load the backfill's tasks.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_MODULES = {
    "list_repositories_task": "georeg.tasks.backfill",
    "sync_repository_task": "georeg.tasks.backfill",
    "verify_repository_task": "georeg.tasks.backfill",
    "confirm_shared_task": "georeg.tasks.replication",
    "converge_deletion_task": "georeg.tasks.replication",
    "copy_blob_task": "georeg.tasks.replication",
    "put_manifests_task": "georeg.tasks.replication",
    "resolve_image_task": "georeg.tasks.replication",
    "verify_replica_task": "georeg.tasks.replication",
    "retry_if_transient": "georeg.tasks.retries",
    "with_retry_settings": "georeg.tasks.retries",
}

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


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULES[name]), name)
