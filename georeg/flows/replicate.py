"""The `replicate-image` flow: make one image on each secondary digest-equal to the primary's."""

from __future__ import annotations

from typing import Any

from prefect import flow

from georeg.config import load_config
from georeg.flows.common import event_outcomes, for_each_secondary
from georeg.references import ImageReference, validate_reference, validate_repository
from georeg.registry import RegistryClient
from georeg.sharing import decide_mode
from georeg.tasks.replication import copy_image_task
from georeg.tasks.retries import with_retry_settings


@flow(name="replicate-image", flow_run_name="replicate {repository}:{reference}")
async def replicate_image(repository: str, reference: str, secondary: str | None = None) -> list[dict[str, Any]]:
    """Copy `repository` at `reference` (a tag or a digest) from the primary to each secondary.

    Each secondary gets one `copy-image` task, the procedure the backfill uses too: resolve the image
    on the primary (an index with every child), make every blob present on the secondary (skip,
    mount or stream), put the manifests children first and the tag last, and make sure the secondary
    serves the primary's digest. A secondary that shares the primary's storage gets nothing copied:
    its manifests and blobs are confirmed instead.

    Args:
        repository: e.g. "group/app".
        reference: a tag ("1.0") or a digest ("sha256:...").
        secondary: the name of one secondary from the config; all of them when omitted.

    Returns:
        One summary per secondary: digest, blobs copied / present / mounted, bytes sent.
    """
    config = load_config()
    image = ImageReference(validate_repository(repository), validate_reference(reference))
    copy_image = with_retry_settings(copy_image_task, config.replication)

    async def replicate_to(primary: RegistryClient, target: RegistryClient) -> dict[str, Any]:
        mode = decide_mode(config, config.select_secondaries(target.name)[0])
        async with outcomes.recording(target.name, image):
            copied = await copy_image(primary, target, image, config.replication, mode.storage)
        return {"secondary": target.name, "mode": mode.mode.value, **copied.summary()}

    async with event_outcomes(config) as outcomes:
        return await for_each_secondary(config, secondary, replicate_to)
