"""The replication steps as Prefect tasks (thin wrappers; the logic lives in `georeg.replication`)."""

from __future__ import annotations

from prefect import task

from georeg import replication
from georeg.references import ImageReference
from georeg.registry import Descriptor, RegistryClient
from georeg.storage_adapters import StorageAdapter
from georeg.tasks.retries import RETRYING


@task(name="resolve-image", task_run_name="resolve {reference}", **RETRYING)
async def resolve_image_task(primary: RegistryClient, reference: ImageReference) -> replication.ResolvedImage:
    return await replication.resolve_image(primary, reference)


@task(name="copy-blob", task_run_name="copy-blob {blob.digest}", **RETRYING)
async def copy_blob_task(
    primary: RegistryClient, secondary: RegistryClient, repository: str, blob: Descriptor
) -> replication.BlobCopy:
    return await replication.copy_blob(primary, secondary, repository, blob)


@task(name="confirm-shared", task_run_name="confirm-shared {image.reference}", **RETRYING)
async def confirm_shared_task(
    secondary: RegistryClient, storage: StorageAdapter, image: replication.ResolvedImage
) -> list[replication.BlobCopy]:
    return await replication.confirm_shared(secondary, storage, image)


@task(name="put-manifests", task_run_name="put-manifests {image.reference}", **RETRYING)
async def put_manifests_task(secondary: RegistryClient, image: replication.ResolvedImage) -> None:
    await replication.put_manifests(secondary, image)


@task(name="verify-replica", task_run_name="verify {image.reference}", **RETRYING)
async def verify_replica_task(secondary: RegistryClient, image: replication.ResolvedImage) -> None:
    await replication.verify_replica(secondary, image)


@task(name="converge-deletion", task_run_name="converge-deletion {reference}", **RETRYING)
async def converge_deletion_task(
    primary: RegistryClient, secondary: RegistryClient, reference: ImageReference
) -> replication.Deletion:
    return await replication.converge_deletion(primary, secondary, reference)
