"""The sync status of each secondary, as GitLab Geo's nodes dashboard shows it: from the state database,
without asking any registry. `georeg status --json` and `GET /status` emit `collect_status()`'s document."""

from __future__ import annotations

import datetime
import json
import time
from collections import Counter
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
        "generated_at": _iso(time.time()),
        "secondaries": [await _secondary_status(config, store, secondary) for secondary in config.secondaries],
    }


async def _secondary_status(config: GeoregConfig, store: StateStore, secondary: SecondaryConfig) -> dict[str, Any]:
    name = secondary.name
    states = list((await store.sync.repository_states(name)).values())
    count = Counter(state.state for state in states)
    verification = Counter(state.verification for state in states)
    oldest = await store.journal.oldest_owed_event(name)
    failing = sorted((s for s in states if s.state == FAILED), key=lambda s: s.updated_at, reverse=True)
    return {
        "name": name,
        "url": secondary.url,
        "mode": _mode(config, secondary),
        "repositories": {
            "total": len(states),
            "synced": count[SYNCED],
            "failed": count[FAILED],
            "pending": count[PENDING] + count[STARTED],
        },
        "synced_percent": round(100.0 * count[SYNCED] / len(states), 1) if states else None,
        "verification": {
            "verified": verification[VERIFIED],
            "failed": verification[MISMATCH],
            "unverified": len(states) - verification[VERIFIED] - verification[MISMATCH],
        },
        "oldest_unsynced_event": _iso(oldest),
        "last_backfill": _run(await store.runs.last("backfill", name)),
        "last_verification": _run(await store.runs.last("verify", name)),
        "failures": [
            {
                "repository": state.repository,
                "retry_count": state.retry_count,
                "retry_at": _iso(state.retry_at),
                "last_failure": state.last_failure,
            }
            for state in failing[:_FAILURES_SHOWN]
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
        "started_at": _iso(record.started_at),
        "finished_at": _iso(record.finished_at),
        "outcome": record.outcome,
        "summary": json.loads(record.summary or "{}"),
    }


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc).isoformat(timespec="seconds")
