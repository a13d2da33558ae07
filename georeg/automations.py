"""The Prefect automations that ship with georeg, applied by `georeg automations apply`.

They react to georeg's events (georeg.prefect_events) on the Prefect server's triggers service:

- **replication failing**: a repository whose replication failed `automations.failures_per_hour` times
  within an hour gets a `verify` flow run of that repository (and a notification, with a block);
- **backfill overdue**: no `georeg.backfill.completed` for a secondary within twice
  `automations.backfill_interval_seconds` sends a notification (with a block; without one the
  automation still fires, visible in the event feed as `prefect.automation.triggered`);
- with `dispatch.mode: events`, **replicate on push** / **delete on delete**: each tag pushed or
  reference deleted starts a `replicate-image` / `delete-image` flow run, Prefect's own webhook-to-run path.

Applying is declarative: every automation whose name starts with "georeg: " is replaced by the set
built from the config, so running it again after a config change is how to update them.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID

from georeg.config import GeoregConfig
from georeg.errors import ConfigError
from georeg.prefect_events import (
    BACKFILL_COMPLETED,
    MANIFEST_DELETED,
    MANIFEST_PUSHED,
    REFERENCE_KIND_LABEL,
    REPLICATION_FAILED,
    REPOSITORY_PREFIX,
    SECONDARY_PREFIX,
)

NAME_PREFIX = "georeg: "
REPLICATION_FAILING = f"{NAME_PREFIX}replication failing"
BACKFILL_OVERDUE = f"{NAME_PREFIX}backfill overdue"
REPLICATE_ON_PUSH = f"{NAME_PREFIX}replicate on push"
DELETE_ON_DELETE = f"{NAME_PREFIX}delete on delete"


def build_automations(config: GeoregConfig, deployments: dict[str, UUID], notify_block_id: UUID | None) -> list[Any]:
    """The automations for this config; `deployments` maps deployment names ("verify/verify") to ids."""
    from prefect.events.actions import DoNothing, RunDeployment, SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    settings = config.automations
    failing_actions: list[Any] = [
        RunDeployment(
            source="selected",
            deployment_id=deployments[settings.verify_deployment],
            parameters={"repositories": ["{{ event.payload.repository }}"]},
        )
    ]
    overdue_actions: list[Any] = [DoNothing()]
    if notify_block_id is not None:
        failing_actions.append(
            SendNotification(
                block_document_id=notify_block_id,
                subject="georeg: replication of {{ event.payload.repository }} keeps failing",
                body="{{ event.payload.repository }}:{{ event.payload.reference }} -> "
                "{{ event.payload.secondary }} failed {{ automation.trigger.threshold }} times within an hour; "
                "a verify of the repository was started. Last reason: {{ event.payload.reason }}",
            )
        )
        overdue_actions = [
            SendNotification(
                block_document_id=notify_block_id,
                subject="georeg: no backfill completed",
                body="No backfill of {{ event.resource['prefect.resource.name'] or 'a secondary' }} completed within "
                f"{_hours(2 * settings.backfill_interval_seconds)} (its last: "
                "{{ event.event }} at {{ event.occurred }}). Check the backfill deployment and its worker.",
            )
        ]
    automations = [
        AutomationCore(
            name=REPLICATION_FAILING,
            description=f"{settings.failures_per_hour} failed replications of one repository within an hour "
            "start a verify of it",
            trigger=EventTrigger(
                expect={REPLICATION_FAILED},
                match={"prefect.resource.id": f"{REPOSITORY_PREFIX}*"},
                for_each={"prefect.resource.id"},
                posture=Posture.Reactive,
                threshold=settings.failures_per_hour,
                within=timedelta(hours=1),
            ),
            actions=failing_actions,
        ),
        AutomationCore(
            name=BACKFILL_OVERDUE,
            description="no completed backfill of a secondary within twice the backfill's schedule",
            trigger=EventTrigger(
                after={BACKFILL_COMPLETED},
                expect={BACKFILL_COMPLETED},
                match={"prefect.resource.id": f"{SECONDARY_PREFIX}*"},
                for_each={"prefect.resource.id"},
                posture=Posture.Proactive,
                threshold=1,
                within=timedelta(seconds=2 * settings.backfill_interval_seconds),
            ),
            actions=overdue_actions,
        ),
    ]
    if config.dispatch.mode == "events":
        automations += [
            _run_on(REPLICATE_ON_PUSH, MANIFEST_PUSHED, deployments[config.dispatch.replicate_deployment], tag=True),
            _run_on(DELETE_ON_DELETE, MANIFEST_DELETED, deployments[config.dispatch.delete_deployment], tag=False),
        ]
    return automations


def wanted_deployments(config: GeoregConfig) -> list[str]:
    names = [config.automations.verify_deployment]
    if config.dispatch.mode == "events":
        names += [config.dispatch.replicate_deployment, config.dispatch.delete_deployment]
    return names


def _run_on(name: str, event: str, deployment_id: UUID, *, tag: bool) -> Any:
    """A run of the deployment for each registry event; the journal re-dispatches what no run settles."""
    from prefect.events.actions import RunDeployment
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    match = {"prefect.resource.id": f"{REPOSITORY_PREFIX}*"}
    if tag:  # a push by digest alone is most often an index's child: the index's run puts it
        match[REFERENCE_KIND_LABEL] = "tag"
    return AutomationCore(
        name=name,
        description=f"dispatch.mode events: {event} starts a flow run",
        trigger=EventTrigger(expect={event}, match=match, posture=Posture.Reactive, threshold=1, within=0),
        actions=[
            RunDeployment(
                source="selected",
                deployment_id=deployment_id,
                parameters={
                    "repository": "{{ event.payload.repository }}",
                    "reference": "{{ event.payload.reference }}",
                },
            )
        ],
    )


async def apply_automations(config: GeoregConfig) -> list[str]:
    """Replace georeg's automations on the Prefect server with those built from `config`; return their names."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        deployments = {}
        for name in wanted_deployments(config):
            try:
                deployments[name] = (await client.read_deployment_by_name(name)).id
            except ObjectNotFound:
                raise ConfigError(
                    f"deployment {name} is not on the Prefect server: run `prefect deploy --all`"
                ) from None
        block_id = await _notify_block_id(client, config.automations.notify_block)
        automations = build_automations(config, deployments, block_id)
        for existing in await client.read_automations():
            if existing.name.startswith(NAME_PREFIX):
                await client.delete_automation(existing.id)
        for automation in automations:
            await client.create_automation(automation)
    return [automation.name for automation in automations]


async def _notify_block_id(client: Any, slug: str | None) -> UUID | None:
    from prefect.exceptions import ObjectNotFound

    if slug is None:
        return None
    block_type, _, name = slug.partition("/")
    try:
        document = await client.read_block_document_by_name(name, block_type)
    except ObjectNotFound:
        raise ConfigError(
            f"automations.notify_block: no {block_type} block named {name!r} on the Prefect server"
        ) from None
    return document.id


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:g} h"
