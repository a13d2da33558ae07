"""georeg's Prefect automations: what `georeg automations apply` builds from a config."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from georeg.automations import (
    BACKFILL_OVERDUE,
    DELETE_ON_DELETE,
    REPLICATE_ON_PUSH,
    REPLICATION_FAILING,
    build_automations,
    wanted_deployments,
)
from georeg.config import GeoregConfig, parse_config
from georeg.errors import ConfigError

VERIFY, REPLICATE, DELETE = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
DEPLOYMENTS = {
    "verify/verify": VERIFY,
    "replicate-image/replicate-image": REPLICATE,
    "delete-image/delete-image": DELETE,
}


def config(tmp_path: Path, **extra: Any) -> GeoregConfig:
    return parse_config(
        {
            "primary": {"url": "http://127.0.0.1:1"},
            "secondaries": [{"name": "east", "url": "http://127.0.0.1:2"}],
            **extra,
        },
        base_dir=tmp_path,
    )


def by_name(automations: list[Any]) -> dict[str, Any]:
    return {automation.name: automation for automation in automations}


def test_failing_replications_start_a_verify_of_the_repository_and_notify(tmp_path: Path):
    block = uuid.uuid4()
    settings = config(tmp_path, automations={"failures_per_hour": 5, "notify_block": "custom-webhook/alerts"})
    failing = by_name(build_automations(settings, DEPLOYMENTS, block))[REPLICATION_FAILING]
    assert failing.trigger.expect == {"georeg.replication.failed"}
    assert failing.trigger.threshold == 5 and failing.trigger.within.total_seconds() == 3600
    assert failing.trigger.for_each == {"prefect.resource.id"}
    run, notify = failing.actions
    assert run.deployment_id == VERIFY and run.parameters == {"repositories": ["{{ event.payload.repository }}"]}
    assert notify.block_document_id == block


def test_an_overdue_backfill_is_twice_its_schedule_per_secondary(tmp_path: Path):
    settings = config(tmp_path, automations={"backfill_interval_seconds": 3600})
    overdue = by_name(build_automations(settings, DEPLOYMENTS, None))[BACKFILL_OVERDUE]
    assert overdue.trigger.posture == "Proactive"
    assert overdue.trigger.expect == overdue.trigger.after == {"georeg.backfill.completed"}
    assert overdue.trigger.within.total_seconds() == 7200
    assert [action.type for action in overdue.actions] == ["do-nothing"]  # no block: visible in the feed only


def test_events_mode_adds_the_triggers_that_start_runs(tmp_path: Path):
    assert REPLICATE_ON_PUSH not in by_name(build_automations(config(tmp_path), DEPLOYMENTS, None))
    settings = config(tmp_path, dispatch={"mode": "events"})
    assert set(wanted_deployments(settings)) == set(DEPLOYMENTS)
    automations = by_name(build_automations(settings, DEPLOYMENTS, None))
    push, delete = automations[REPLICATE_ON_PUSH], automations[DELETE_ON_DELETE]
    # Pushes by digest alone are left to the journal: the index's run puts them.
    assert push.trigger.match.get("georeg.reference.kind") == ["tag"]
    assert "georeg.reference.kind" not in delete.trigger.match
    assert push.actions[0].deployment_id == REPLICATE and delete.actions[0].deployment_id == DELETE
    assert push.actions[0].parameters["reference"] == "{{ event.payload.reference }}"


def test_a_notify_block_must_be_named_by_type_and_name(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"automations\.notify_block"):
        config(tmp_path, automations={"notify_block": "just-a-name"})
