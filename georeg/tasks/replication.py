"""The image procedure as Prefect tasks (thin wrappers; the logic lives in `georeg.replication` and
`georeg.deletion`). One task per image and secondary: its retries redo the whole image, which costs
only HEADs for what is already there, and Prefect records one task run per image, not one per step."""

from __future__ import annotations

from prefect import task

from georeg import deletion, replication
from georeg.config import ReplicationConfig
from georeg.references import ImageReference
from georeg.registry import RegistryClient
from georeg.storage_adapters import StorageAdapter
from georeg.tasks.retries import RETRYING


@task(name="copy-image", task_run_name="copy {reference} to {secondary.name}", **RETRYING)
async def copy_image_task(
    primary: RegistryClient,
    secondary: RegistryClient,
    reference: ImageReference,
    settings: ReplicationConfig,
    shared_storage: StorageAdapter | None = None,
) -> replication.ImageReplication:
    return await replication.replicate(primary, secondary, reference, settings, shared_storage=shared_storage)


@task(name="converge-deletion", task_run_name="delete {reference} from {secondary.name}", **RETRYING)
async def converge_deletion_task(
    primary: RegistryClient, secondary: RegistryClient, reference: ImageReference
) -> deletion.Deletion:
    return await deletion.converge_deletion(primary, secondary, reference)
