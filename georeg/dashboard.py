"""A dashboard per secondary in the Prefect UI: a markdown artifact under one key per secondary, so the
UI keeps every version of it as its history. Each backfill and verification publishes it at its end,
from `georeg status`'s data (`secondary_status`), so the UI and `georeg status` always agree."""

from __future__ import annotations

import hashlib
import logging
import re
import time
from typing import Any

import httpx
from sqlalchemy.exc import SQLAlchemyError

from georeg.config import GeoregConfig
from georeg.errors import GeoregError
from georeg.progress import artifact_key
from georeg.state import StateStore
from georeg.status import iso_time, secondary_status

logger = logging.getLogger("georeg.dashboard")

# The failing repositories listed by name; the rest are counted. A table of 10^5 rows helps nobody and
# would cost the database, the API and the browser.
FAILURES_LISTED = 20

_SUMMARY_FIELDS = (
    ("repositories", "repositories"),
    ("synced", "synced"),
    ("failed", "failed"),
    ("deferred", "left for their next retry"),
    ("tags_replicated", "tags replicated"),
    ("tags_removed", "tags removed"),
    ("bytes_copied", "bytes copied"),
    ("verified", "verified"),
    ("mismatched", "differing"),
    ("blobs_checked", "blobs checked"),
)
# Backslash-escaped so that text from registries (error messages, repository names) cannot add markup,
# links or HTML to the page: CommonMark's punctuation that can start or end an element.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>()#+!|~&])")


def dashboard_key(secondary: str) -> str:
    """The artifact key of `secondary`'s dashboard: lowercase letters, digits and dashes, as Prefect
    requires, and different for every secondary name the config accepts."""
    key = artifact_key("dashboard", secondary)
    if key != f"dashboard-{secondary}":
        # The mapping lost something ("East" and "east", "a_b" and "a.b" map alike): the name's own hash
        # keeps two such secondaries' dashboards apart.
        key += "-" + hashlib.sha256(secondary.encode()).hexdigest()[:8]
    return key


def render_dashboard(entry: dict[str, Any], generated_at: str) -> str:
    """The markdown of one secondary's dashboard, from its entry of the status document."""
    repositories, verification = entry["repositories"], entry["verification"]
    percent = "-" if entry["synced_percent"] is None else f"{entry['synced_percent']:.1f}%"
    lines = [
        f"# Secondary {_text(entry['name'])}: {percent} synced",
        "",
        f"{_text(_without_credentials(entry['url']))}, {_text(entry['mode']['mode'])} mode "
        f"({_text(entry['mode']['reason'])}). As of {generated_at}.",
        "",
        "| synced | failed | pending | repositories | synced % |",
        "|---:|---:|---:|---:|---:|",
        f"| {repositories['synced']} | {repositories['failed']} | {repositories['pending']} "
        f"| {repositories['total']} | {percent} |",
        "",
        f"- **Oldest unsynced event:** {entry['oldest_unsynced_event'] or 'none, every event is replicated'}",
        f"- **Last backfill:** {_describe_run(entry['last_backfill'])}",
        f"- **Last verification:** {_describe_run(entry['last_verification'])}",
        f"- **Verification:** {verification['verified']} verified, {verification['failed']} differing, "
        f"{verification['unverified']} not verified yet",
        "",
    ]
    failures = entry["failures"]
    lines.append(f"## Failing repositories ({repositories['failed']})")
    lines.append("")
    if not failures:
        lines.append("None.")
        return "\n".join(lines) + "\n"
    # A list, not a table: the UI keeps a table's rows on one line each, and a reason is a long line.
    for failure in failures:
        lines.append(
            f"- **{_text(failure['repository'])}**: failed {failure['retry_count']}x, "
            f"next retry {failure['retry_at'] or 'at the next backfill'}: "
            f"{_text(failure['last_failure'] or 'no reason recorded')}"
        )
    hidden = repositories["failed"] - len(failures)
    if hidden > 0:
        lines += [
            "",
            f"And {hidden} more, not listed: the most recent failures are shown. `georeg status` counts them too.",
        ]
    return "\n".join(lines) + "\n"


async def publish_dashboard(config: GeoregConfig, store: StateStore, secondary: str) -> None:
    """Create a new version of `secondary`'s dashboard artifact (inside a flow run, attached to it).

    A dashboard that cannot be published is a warning, not a failure: the backfill or verification did
    its work, and `georeg status` reads the same state."""
    from prefect.artifacts import acreate_markdown_artifact

    [target] = config.select_secondaries(secondary)
    try:
        entry = await secondary_status(config, store, target, failures_shown=FAILURES_LISTED)
        await acreate_markdown_artifact(
            markdown=render_dashboard(entry, iso_time(time.time()) or ""),
            key=dashboard_key(secondary),
            description=f"georeg dashboard of the secondary {secondary}",
        )
    except (httpx.HTTPError, SQLAlchemyError, GeoregError) as error:
        logger.warning("the dashboard of %s was not published: %s: %s", secondary, type(error).__name__, error)


def _describe_run(run: dict[str, Any] | None) -> str:
    if run is None:
        return "never"
    when = f"finished {run['finished_at']}" if run["finished_at"] else f"started {run['started_at']}"
    counts = [f"{run['summary'][key]} {label}" for key, label in _SUMMARY_FIELDS if run["summary"].get(key) is not None]
    return f"{when}, {_text(run['outcome'] or 'running')}" + (f": {', '.join(counts)}" if counts else "")


def _without_credentials(url: str) -> str:
    """`url` without a user:password in it: every user of the Prefect UI reads the dashboard."""
    parsed = httpx.URL(url)
    return str(parsed.copy_with(userinfo=b"")) if parsed.userinfo else url


def _text(value: str) -> str:
    """`value` as literal text on one line of markdown (a list item must not end early)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(value.split()))
