"""Which registry events georeg keeps, which it acknowledges and drops, which it refuses."""

from __future__ import annotations

import pytest

from georeg.events import DELETE, REPLICATE, AcceptedEvent, InvalidEvents, classify
from georeg.registry.manifests import DOCKER_MANIFEST, OCI_INDEX

DIGEST = "sha256:" + "c" * 64


def event(action: str, event_id: str = "e1", **target: object) -> dict:
    return {"id": event_id, "action": action, "target": {"repository": "group/app", **target}}


def test_manifest_pushes_and_deletes_are_kept():
    classified = classify(
        {
            "events": [
                event("push", "1", mediaType=DOCKER_MANIFEST, digest=DIGEST, tag="1.0"),
                event("push", "2", mediaType=OCI_INDEX, digest=DIGEST),  # by digest: an index child or untagged
                event("delete", "3", digest=DIGEST),
                event("delete", "4", tag="1.0"),
            ]
        }
    )
    assert classified.accepted == [
        AcceptedEvent("1", REPLICATE, "group/app", "1.0", tag="1.0", digest=DIGEST, media_type=DOCKER_MANIFEST),
        AcceptedEvent("2", REPLICATE, "group/app", DIGEST, digest=DIGEST, media_type=OCI_INDEX),
        AcceptedEvent("3", DELETE, "group/app", DIGEST, digest=DIGEST),
        AcceptedEvent("4", DELETE, "group/app", "1.0", tag="1.0"),
    ]
    assert classified.ignored == 0


def test_pulls_mounts_blob_pushes_and_unknown_actions_are_dropped():
    classified = classify(
        {
            "events": [
                event("pull", mediaType=DOCKER_MANIFEST, digest=DIGEST, tag="1.0"),
                event("mount", mediaType="application/octet-stream", digest=DIGEST),
                event("push", mediaType="application/octet-stream", digest=DIGEST),
                event("teleport", digest=DIGEST),
            ]
        }
    )
    assert classified.accepted == [] and classified.ignored == 4


@pytest.mark.parametrize(
    ("envelope", "message"),
    [
        ([], "JSON object with an 'events' list"),
        ({"events": {}}, "'events' list"),
        ({"events": ["x"]}, r"events\[0\]: an event must be a JSON object"),
        ({"events": [{"action": "push"}]}, r"events\[0\]: an event needs an 'action' and a 'target'"),
        ({"events": [event("push", tag="1.0", repository="../../etc")]}, r"events\[0\]: invalid repository"),
        ({"events": [event("delete", digest="sha256:1234")]}, r"events\[0\]: invalid digest"),
        ({"events": [event("push", tag="-bad")]}, "invalid tag"),
        ({"events": [event("delete")]}, "needs target.tag or target.digest"),
        ({"events": [{"action": "delete", "target": {"repository": "a", "tag": "x"}}]}, "needs an 'id'"),
        ({"events": [event("push", tag=7)]}, "target.tag must be a string"),
    ],
)
def test_malformed_events_are_refused_saying_where(envelope, message):
    with pytest.raises(InvalidEvents, match=message):
        classify(envelope)
