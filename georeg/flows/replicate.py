"""The `replicate-image` flow: make one image on each secondary digest-equal to the primary's."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from prefect import flow

from georeg.config import load_config
from georeg.errors import GeoregError
from georeg.flows.common import event_outcomes, for_each_secondary
from georeg.references import ImageReference, validate_reference, validate_repository
from georeg.registry import RegistryClient
from georeg.replication import BlobOutcome, bounded
from georeg.sharing import decide_mode
from georeg.tasks.replication import (
    confirm_shared_task,
    copy_blob_task,
    put_manifests_task,
    resolve_image_task,
    verify_replica_task,
)
from georeg.tasks.retries import with_retry_settings


@flow(name="replicate-image", flow_run_name="replicate {repository}:{reference}")
async def replicate_image(repository: str, reference: str, secondary: str | None = None) -> list[dict[str, Any]]:
    """Copy `repository` at `reference` (a tag or a digest) from the primary to each secondary.

    Resolve the image on the primary (an index with every child), make every blob present on the
    secondary (skip, mount or stream), put the manifests children first and the tag last, then
    check that the secondary serves the primary's digest. A secondary that shares the primary's
    storage gets nothing copied: its manifests and blobs are confirmed instead.

    Args:
        repository: e.g. "group/app".
        reference: a tag ("1.0") or a digest ("sha256:...").
        secondary: the name of one secondary from the config; all of them when omitted.

    Returns:
        One summary per secondary: digest, blobs copied / present / mounted, bytes sent.
    """
    config = load_config()
    settings = config.replication
    image_reference = ImageReference(validate_repository(repository), validate_reference(reference))

    async def replicate_to(primary: RegistryClient, target: RegistryClient) -> dict[str, Any]:
        try:
            summary = await copy_image(primary, target)
        except GeoregError as error:
            await outcomes.record(target.name, repository, reference, error)
            raise
        await outcomes.record(target.name, repository, reference, None)
        return summary

    async def copy_image(primary: RegistryClient, target: RegistryClient) -> dict[str, Any]:
        started = time.monotonic()
        mode = decide_mode(config, config.select_secondaries(target.name)[0])
        image = await with_retry_settings(resolve_image_task, settings)(primary, image_reference)
        if mode.storage is not None:
            # Confirming asks what the secondary serves under the reference, as verifying would.
            copies = await with_retry_settings(confirm_shared_task, settings)(target, mode.storage, image)
        else:
            copy_blob = with_retry_settings(copy_blob_task, settings)
            room = asyncio.Semaphore(settings.concurrency)
            copies = await asyncio.gather(
                *(bounded(room, copy_blob(primary, target, repository, blob)) for blob in image.blobs())
            )
            await with_retry_settings(put_manifests_task, settings)(target, image)
            await with_retry_settings(verify_replica_task, settings)(target, image)
        return {
            "secondary": target.name,
            "mode": mode.mode.value,
            "image": str(image_reference),
            "digest": image.digest,
            "manifests": len(image.manifests),
            **{f"blobs_{outcome.value}": sum(c.outcome is outcome for c in copies) for outcome in BlobOutcome},
            "bytes_copied": sum(c.bytes_sent for c in copies),
            "bytes_skipped": sum(c.bytes_skipped for c in copies),
            "seconds": round(time.monotonic() - started, 3),
        }

    async with event_outcomes(config) as outcomes:
        return await for_each_secondary(config, secondary, replicate_to)
