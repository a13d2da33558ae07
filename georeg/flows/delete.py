"""The `delete-image` flow: remove from each secondary what the primary has deleted."""

from __future__ import annotations

from typing import Any

from prefect import flow

from georeg.config import load_config
from georeg.events import DELETE
from georeg.flows.common import event_outcomes, for_each_secondary
from georeg.references import ImageReference, validate_reference, validate_repository
from georeg.registry import RegistryClient
from georeg.tasks.replication import converge_deletion_task
from georeg.tasks.retries import with_retry_settings


@flow(name="delete-image", flow_run_name="delete {repository}:{reference}")
async def delete_image(repository: str, reference: str, secondary: str | None = None) -> list[dict[str, Any]]:
    """Make each secondary converge to the primary for one tag or digest that the primary deleted.

    If the primary still has the reference (it was pushed again), nothing is removed. A removed tag
    takes only itself: other tags on the secondary that share its digest are put back.
    """
    config = load_config()
    image_reference = ImageReference(validate_repository(repository), validate_reference(reference))
    converge_deletion = with_retry_settings(converge_deletion_task, config.replication)

    async def delete_from(primary: RegistryClient, target: RegistryClient) -> dict[str, Any]:
        async with outcomes.recording(target.name, image_reference, action=DELETE) as outcome:
            deletion = await converge_deletion(primary, target, image_reference)
            outcome.deleted(deletion)
        return {
            "secondary": target.name,
            "image": str(image_reference),
            "outcome": deletion.outcome.value,
            "digest": deletion.digest,
            "restored_tags": list(deletion.restored_tags),
        }

    async with event_outcomes(config) as outcomes:
        return await for_each_secondary(config, secondary, delete_from)
