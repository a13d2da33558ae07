"""georeg's Prefect automations: what `georeg automations apply` builds from a config."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

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
from tests.support.images import Pusher, build_image
from tests.support.registry import RegistryProcess, free_port
from tests.support.services import (
    GeoregServe,
    PrefectServer,
    clean_environment,
    deploy_georeg,
    georeg_cli,
    prefect_events,
    wait_until,
)
from tests.support.webhook import Delivery, WebhookSink
from tests.test_serve import SECRET, deployments_notifications, write_georeg_config

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


# --- end to end: a real Prefect server's triggers service, a real notification block, a local endpoint ---


@dataclass
class AutomationSite:
    primary: RegistryProcess
    secondary: RegistryProcess  # read-only: every replication to it fails
    server: PrefectServer
    receiver: GeoregServe
    sink: WebhookSink
    environment: dict[str, str]

    def deliveries_naming(self, text: str) -> list[Delivery]:
        return [delivery for delivery in list(self.sink.deliveries) if text in delivery.body.decode()]

    def events(self, resource_id: str, name: str) -> list[dict[str, Any]]:
        return prefect_events(self.server.api_url, resource_id, [name])

    def verify_runs(self) -> list[dict[str, Any]]:
        response = httpx.post(
            f"{self.server.api_url}/flow_runs/filter",
            json={"flows": {"name": {"any_": ["verify"]}}},
            timeout=10,
        )
        response.raise_for_status()
        return list(response.json())


FAILURES_PER_HOUR = 2
BACKFILL_INTERVAL = 10  # seconds: "overdue" after 20 s


@pytest.fixture(scope="module")
def automation_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AutomationSite]:
    root = tmp_path_factory.mktemp("automations")
    receiver_port = free_port()
    notifications = deployments_notifications(f"http://127.0.0.1:{receiver_port}", SECRET)
    read_only = {"storage": {"maintenance": {"readonly": {"enabled": True}}}}
    with (
        WebhookSink() as sink,
        RegistryProcess(root / "primary", notifications=notifications) as primary,
        RegistryProcess(root / "secondary", extra_config=read_only) as secondary,
        PrefectServer(root / "prefect-home") as server,
        contextlib.ExitStack() as stack,
    ):
        config = write_georeg_config(root / "georeg.yaml", primary.url, secondary.url, max_attempts=1)
        settings = yaml.safe_load(config.read_text())
        settings["replication"].update(task_retries=0)
        settings["automations"] = {
            "failures_per_hour": FAILURES_PER_HOUR,
            "backfill_interval_seconds": BACKFILL_INTERVAL,
            "notify_block": "custom-webhook/georeg-alerts",
        }
        config.write_text(yaml.safe_dump(settings))
        environment = clean_environment(
            PREFECT_API_URL=server.api_url, PREFECT_HOME=str(root / "prefect-home"), GEOREG_CONFIG=str(config)
        )
        deploy_georeg(environment)
        # The block an operator makes once (UI or code): Prefect's own webhook notification, to this test's endpoint.
        run_python(
            environment,
            "from prefect.blocks.notifications import CustomWebhookNotificationBlock as B\n"
            f"B(name='georeg', url='{sink.url}/alerts', json_data={{'subject': '{{{{subject}}}}', "
            "'body': '{{body}}'}).save('georeg-alerts')",
        )
        applied = georeg_cli(environment, "automations", "apply")
        assert "applied: georeg: replication failing" in applied and "applied: georeg: backfill overdue" in applied
        receiver = stack.enter_context(GeoregServe(config, root / "serve.log", environment, port=receiver_port))
        yield AutomationSite(primary, secondary, server, receiver, sink, environment)


def run_python(environment: dict[str, str], code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"{code}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def occurred(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["occurred"]).timestamp()


def test_repeated_replication_failures_start_a_verify_of_the_repository_and_notify(automation_site, repo_name):
    site = automation_site
    with Pusher(site.primary.url) as pusher:
        pusher.push_image(repo_name, build_image("oci"), "v1")
        pusher.push_image(repo_name, build_image("oci"), "v2")

    wait_until(lambda: site.deliveries_naming(repo_name), deadline=120, what=f"a notification naming {repo_name}")
    [notification, *_] = site.deliveries_naming(repo_name)
    assert notification.path == "/alerts"
    assert json.loads(notification.body)["subject"] == f"georeg: replication of {repo_name} keeps failing"

    resource = f"georeg.repository.{repo_name}"
    # Prefect's triggers see an event before its event persister has stored it: poll the feed.
    failed = wait_until_found(lambda: site.events(resource, "georeg.replication.failed"), at_least=FAILURES_PER_HOUR)
    failures = sorted(failed, key=occurred)
    assert all("secondary" in event["payload"]["reason"] for event in failures)
    crossing = occurred(failures[FAILURES_PER_HOUR - 1])
    print(f"\nautomation fired: notification {notification.received_at - crossing:.2f} s after the failure event")
    # The receiver's own events, for the same repository:
    pushed = wait_until_found(lambda: site.events(resource, "georeg.registry.manifest.pushed"), at_least=2)
    assert {event["payload"]["tag"] for event in pushed} >= {"v1", "v2"}

    wait_until(
        lambda: any(run["parameters"].get("repositories") == [repo_name] for run in site.verify_runs()),
        deadline=30,
        what=f"a verify flow run of {repo_name}",
    )


def test_no_completed_backfill_within_twice_its_schedule_raises_an_alert(automation_site, repo_name):
    site = automation_site
    secondary = repo_name.replace("/", "-")  # a secondary of its own: the trigger's window is per secondary
    run_python(
        site.environment,
        "from georeg.prefect_events import emit_backfill\n"
        "from prefect.events.worker import EventsWorker\n"
        f"emit_backfill('{secondary}', {{'synced': 3, 'failed': 0}}, failed=False)\n"
        "EventsWorker.drain_all(timeout=30)",
    )
    [completed] = wait_until_found(lambda: site.events(f"georeg.secondary.{secondary}", "georeg.backfill.completed"))
    wait_until(lambda: site.deliveries_naming(secondary), deadline=2 * BACKFILL_INTERVAL + 60, what="the overdue alert")
    [alert] = site.deliveries_naming(secondary)
    assert json.loads(alert.body)["subject"] == "georeg: no backfill completed"
    waited = alert.received_at - occurred(completed)
    print(f"\noverdue alert: {waited:.1f} s after the last completed backfill (window {2 * BACKFILL_INTERVAL} s)")
    assert waited >= 2 * BACKFILL_INTERVAL - 1  # not before the window closed


def wait_until_found(read: Any, *, at_least: int = 1, deadline: float = 30) -> list[Any]:
    found: list[Any] = []

    def check() -> bool:
        found[:] = read()
        return len(found) >= at_least

    wait_until(check, deadline=deadline, what="the event in Prefect's feed")
    return found
