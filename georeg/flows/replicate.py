"""The `replicate-image` flow: make one image on each secondary digest-equal to the primary's."""

from __future__ import annotations

import asyncio
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from georeg.concurrency import bounded
from georeg.config import load_config
from georeg.errors import GeoregError, ReplicationError
from georeg.events import DELETE
from georeg.flows.common import event_outcomes, for_each_secondary
from georeg.references import ImageReference, is_digest, validate_reference, validate_repository
from georeg.registry import RegistryClient
from georeg.sharing import decide_mode
from georeg.tasks.replication import converge_deletion_task, copy_image_task
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
        async with outcomes.recording(target.name, image) as outcome:
            copied = await copy_image(primary, target, image, config.replication, mode.storage)
            outcome.copied(copied)
        return {"secondary": target.name, "mode": mode.mode.value, **copied.summary()}

    async with event_outcomes(config) as outcomes:
        return await for_each_secondary(config, secondary, replicate_to)


@flow(name="replicate-images", flow_run_name=lambda: f"replicate {len(flow_run.parameters['items'])} images")
async def replicate_images(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The journal's due work in one run, when a burst of pushes has more of it than there are runs.

    Each item is a work row the receiver claimed (an image to copy to, or a reference to delete from,
    one secondary) and gets its own `copy-image` or `converge-deletion` task, so each image stays
    visible with its outcome; the run settles each item in the journal itself, and fails naming the
    items that failed once every item has had its turn.

    Args:
        items: the claims, as the dispatcher hands them over (`georeg.state.journal.Claim` fields).
    """
    from georeg.state.journal import Claim  # the state database is opened for the outcomes anyway

    config = load_config()
    claims = [Claim(**item) for item in items]
    copy_image = with_retry_settings(copy_image_task, config.replication)
    converge_deletion = with_retry_settings(converge_deletion_task, config.replication)
    room = asyncio.Semaphore(config.dispatch.concurrency)

    covered: set[tuple[str, str, str]] = set()  # (secondary, repository, digest) an index of this run put

    async def settle(primary: RegistryClient, target: RegistryClient, claim: Claim) -> dict[str, Any]:
        image = ImageReference(claim.repository, claim.reference)
        try:
            async with outcomes.recording(target.name, image, claim) as outcome:
                if (target.name, claim.repository, claim.reference) in covered:
                    return {"secondary": target.name, "image": str(image), "outcome": "put with its index"}
                if claim.action == DELETE:
                    deleted = await converge_deletion(primary, target, image)
                    outcome.deleted(deleted)
                    return {"secondary": target.name, "image": str(image), "outcome": deleted.outcome.value}
                mode = decide_mode(config, config.select_secondaries(target.name)[0])
                copied = await copy_image(primary, target, image, config.replication, mode.storage)
                outcome.copied(copied)
                covered.update((target.name, claim.repository, child) for child in copied.children)
                return {"secondary": target.name, "mode": mode.mode.value, **copied.summary()}
        except GeoregError as error:
            return {"secondary": target.name, "image": str(image), "failed": str(error)}

    async def settle_all(primary: RegistryClient, target: RegistryClient) -> list[dict[str, Any]]:
        mine = [claim for claim in claims if claim.secondary == target.name]
        # Pushes by digest last: most are children of an index in the same run, which puts them.
        by_digest = [claim for claim in mine if claim.action != DELETE and is_digest(claim.reference)]
        others = [claim for claim in mine if claim not in by_digest]
        results = await asyncio.gather(*(bounded(room, settle(primary, target, claim)) for claim in others))
        return results + await asyncio.gather(*(bounded(room, settle(primary, target, claim)) for claim in by_digest))

    async with event_outcomes(config) as outcomes:
        results = [
            result for per_secondary in await for_each_secondary(config, None, settle_all) for result in per_secondary
        ]
    failed = [result for result in results if "failed" in result]
    if failed:
        named = "; ".join(f"{r['image']} -> {r['secondary']}: {r['failed']}" for r in failed[:3])
        raise ReplicationError(f"{len(failed)} of {len(results)} items failed: {named}")
    return results
