"""The sync status of each secondary, as GitLab Geo's nodes dashboard shows it: from the state database,
without asking any registry. `georeg status --json` and `GET /status` emit `collect_status()`'s document."""

from __future__ import annotations

import asyncio
import datetime
import json
import textwrap
import time
from typing import Any

from georeg.config import GeoregConfig, SecondaryConfig
from georeg.errors import GeoregError
from georeg.sharing import decide_mode
from georeg.state import RunRecord, StateStore
from georeg.state.sync import FAILED, MISMATCH, PENDING, STARTED, SYNCED, VERIFIED

STATUS_VERSION = 1
_FAILURES_SHOWN = 10


async def collect_status(config: GeoregConfig, store: StateStore) -> dict[str, Any]:
    """A stable JSON document: `version`, `generated_at`, and one entry per secondary."""
    return {
        "version": STATUS_VERSION,
        "generated_at": iso_time(time.time()),
        "secondaries": [await secondary_status(config, store, secondary) for secondary in config.secondaries],
    }


async def secondary_status(
    config: GeoregConfig, store: StateStore, secondary: SecondaryConfig, *, failures_shown: int = _FAILURES_SHOWN
) -> dict[str, Any]:
    """One secondary's entry of the document, with its `failures_shown` most recent failures. The counts
    come from the database's own aggregates, so its cost hardly grows with the number of repositories."""
    name = secondary.name
    # Counted and picked by the database: at 10^5 repositories, loading every row takes seconds.
    (count, verification), failing, oldest = await asyncio.gather(
        store.sync.counts(name),
        store.sync.latest_failures(name, failures_shown),
        store.journal.oldest_owed_event(name),
    )
    total = sum(count.values())
    return {
        "name": name,
        "url": secondary.url,
        "mode": _mode(config, secondary),
        "repositories": {
            "total": total,
            "synced": count[SYNCED],
            "failed": count[FAILED],
            "pending": count[PENDING] + count[STARTED],
        },
        "synced_percent": round(100.0 * count[SYNCED] / total, 1) if total else None,
        "verification": {
            "verified": verification[VERIFIED],
            "failed": verification[MISMATCH],
            "unverified": total - verification[VERIFIED] - verification[MISMATCH],
        },
        "oldest_unsynced_event": iso_time(oldest),
        "last_backfill": _run(await store.runs.last("backfill", name)),
        "last_verification": _run(await store.runs.last("verify", name)),
        "failures": [
            {
                "repository": state.repository,
                "retry_count": state.retry_count,
                "retry_at": iso_time(state.retry_at),
                "last_failure": state.last_failure,
            }
            for state in failing
        ],
    }


def _mode(config: GeoregConfig, secondary: SecondaryConfig) -> dict[str, str]:
    """shared or copy, and why (as the flows decide it)."""
    try:
        decision = decide_mode(config, secondary)
    except GeoregError as error:
        return {"mode": "error", "reason": str(error)}
    return {"mode": decision.mode.value, "reason": decision.reason}


def _run(record: RunRecord | None) -> dict[str, Any] | None:
    if record is None:
        return None
    return {
        "started_at": iso_time(record.started_at),
        "finished_at": iso_time(record.finished_at),
        "outcome": record.outcome,
        "summary": json.loads(record.summary or "{}"),
    }


def iso_time(timestamp: float | None) -> str | None:
    """A Unix time as ISO 8601 in UTC to the second, as every document and page of georeg shows times."""
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc).isoformat(timespec="seconds")


# --- as text, for `georeg status` -----------------------------------------------------------------

_STATUS_INDENT = "  "


def format_status(document: dict[str, Any], width: int) -> str:
    """One block of `key: value` lines per secondary, wrapped at `width` (the CLI gives its terminal's,
    80 columns when piped), never cut: it must read the same in a pipe, a log or a narrow terminal.
    `georeg status --json` prints the document itself, for programs."""
    lines = [f"georeg status at {document['generated_at']}"]
    for entry in document["secondaries"]:
        repositories, verification = entry["repositories"], entry["verification"]
        percent = "-" if entry["synced_percent"] is None else f"{entry['synced_percent']:.1f}%"
        lines += ["", f"secondary: {entry['name']}"]
        fields = [
            ("url", entry["url"]),
            ("mode", f"{entry['mode']['mode']} ({entry['mode']['reason']})"),
            ("repositories", str(repositories["total"])),
            ("synced", f"{repositories['synced']} ({percent})"),
            ("failed", str(repositories["failed"])),
            ("pending", str(repositories["pending"])),
            ("verified", str(verification["verified"])),
            ("verification failed", str(verification["failed"])),
            ("oldest unsynced event", entry["oldest_unsynced_event"] or "none"),
            ("last backfill", _describe_run(entry["last_backfill"])),
            ("last verification", _describe_run(entry["last_verification"])),
        ]
        lines += [_wrapped(f"{key}: {value}", width, _STATUS_INDENT) for key, value in fields]
        if entry["failures"]:
            lines.append(f"{_STATUS_INDENT}failing repositories:")
        for failure in entry["failures"]:
            text = (
                f"{failure['repository']}: failed {failure['retry_count']}x, next try "
                f"{failure['retry_at'] or 'at the next backfill'}: {failure['last_failure'] or 'no reason recorded'}"
            )
            lines.append(_wrapped(text, width, _STATUS_INDENT * 2))
        hidden = repositories["failed"] - len(entry["failures"])
        if hidden > 0:
            lines.append(_wrapped(f"and {hidden} more (the most recent failures are shown)", width, _STATUS_INDENT * 2))
    return "\n".join(lines)


def _describe_run(run: dict[str, Any] | None) -> str:
    if run is None:
        return "never"
    return f"{run['finished_at'] or 'started ' + str(run['started_at'])} ({run['outcome'] or 'running'})"


def _wrapped(text: str, width: int, indent: str) -> str:
    """`text` wrapped at `width`, its continuation lines indented further. Long words (URLs, repository
    names, digests) are never broken, so that they can be copied: such a line may run past `width`."""
    return textwrap.fill(
        text,
        width=width,
        initial_indent=indent,
        subsequent_indent=indent + "    ",
        break_long_words=False,
        break_on_hyphens=False,
    )
