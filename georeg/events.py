"""Registry notification envelopes: which events georeg keeps, which it acknowledges and drops.

The registry delivers events serially and retries a refused one forever, blocking all behind it
(see registry-facts: Notifications). So everything well-formed that georeg does not need (pulls,
mounts, blob pushes, unknown actions) is acknowledged and dropped, and only what is malformed or
hostile is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from georeg.errors import GeoregError, InvalidReference
from georeg.references import validate_digest, validate_repository, validate_tag
from georeg.registry.manifests import MANIFEST_MEDIA_TYPES

EVENTS_MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"
# What an accepted event asks of each secondary.
REPLICATE, DELETE = "replicate", "delete"


class InvalidEvents(GeoregError):
    """The envelope or one of its events is malformed; the message says where."""


@dataclass(frozen=True)
class AcceptedEvent:
    """A registry event the receiver keeps: a manifest push (replicate) or a delete."""

    event_id: str
    action: str  # REPLICATE or DELETE
    repository: str
    reference: str
    # As the registry sent them, for Prefect's event feed (georeg.prefect_events); the journal keeps only the above.
    tag: str | None = None
    digest: str | None = None
    media_type: str | None = None


@dataclass(frozen=True)
class Classified:
    accepted: list[AcceptedEvent]
    ignored: int


def classify(envelope: Any) -> Classified:
    """Split an envelope `{"events": [...]}` into events to act on and a count of those to drop."""
    if not isinstance(envelope, dict) or not isinstance(envelope.get("events"), list):
        raise InvalidEvents("the body must be a JSON object with an 'events' list")
    accepted: list[AcceptedEvent] = []
    ignored = 0
    for index, item in enumerate(envelope["events"]):
        try:
            event = _accept(item)
        except (InvalidEvents, InvalidReference) as error:
            raise InvalidEvents(f"events[{index}]: {error}") from None
        if event is None:
            ignored += 1
        else:
            accepted.append(event)
    return Classified(accepted, ignored)


def _accept(item: Any) -> AcceptedEvent | None:
    if not isinstance(item, dict):
        raise InvalidEvents("an event must be a JSON object")
    action, target, event_id = item.get("action"), item.get("target"), item.get("id")
    if not isinstance(action, str) or not isinstance(target, dict):
        raise InvalidEvents("an event needs an 'action' and a 'target' object")
    media_type, tag = target.get("mediaType"), target.get("tag")
    if action == "push" and (media_type in MANIFEST_MEDIA_TYPES or tag):
        kind = REPLICATE
    elif action == "delete":
        kind = DELETE
    else:
        return None  # pulls, mounts, blob pushes (application/octet-stream), actions we do not know
    if not isinstance(event_id, str) or not event_id or len(event_id) > 255:
        raise InvalidEvents("an event needs an 'id' string")
    repository = validate_repository(_text(target, "repository"))
    if tag is not None:
        reference = validate_tag(_text(target, "tag"))
    elif target.get("digest") is not None:
        reference = validate_digest(_text(target, "digest"))
    else:
        raise InvalidEvents(f"a {action} event needs target.tag or target.digest")
    digest = target.get("digest")
    return AcceptedEvent(
        event_id=event_id,
        action=kind,
        repository=repository,
        reference=reference,
        tag=tag if isinstance(tag, str) else None,
        digest=digest if isinstance(digest, str) else None,
        media_type=media_type if isinstance(media_type, str) else None,
    )


def _text(target: dict[str, Any], key: str) -> str:
    value = target.get(key)
    if not isinstance(value, str):
        raise InvalidEvents(f"target.{key} must be a string")
    return value
