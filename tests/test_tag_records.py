"""georeg's record of what it wrote to a secondary (pure logic: encoding, re-check schedule, event changes)."""

from __future__ import annotations

import statistics

from georeg.tag_records import changed, decode, encode, recheck_due, written_tags

DAY = 86400.0
A, B = "sha256:" + "a" * 64, "sha256:" + "b" * 64


def test_a_record_round_trips_and_unreadable_ones_count_as_none() -> None:
    assert decode(encode({"v2": B, "v1": A})) == {"v1": A, "v2": B}
    assert decode(None) is None
    assert decode("not json") is None
    assert decode('["v1"]') is None


def test_every_repository_is_rechecked_within_the_period_and_the_rechecks_spread() -> None:
    names = [f"group/app{number}" for number in range(2000)]
    # Never checked: due at once. Checked a full period ago: due, whoever it is.
    assert all(recheck_due(name, None, 0.0, 7 * DAY) for name in names)
    assert all(recheck_due(name, 0.0, 7 * DAY, 7 * DAY) for name in names)
    assert not any(recheck_due(name, 0.0, 3.4 * DAY, 7 * DAY) for name in names)
    # Each repository's own time between half and all of the period: spread, not all at one pass.
    due_after = [
        next(day / 4 for day in range(14, 29) if recheck_due(name, 0.0, day / 4 * DAY, 7 * DAY)) for name in names
    ]
    assert len(set(due_after)) >= 10
    assert 4.5 < statistics.mean(due_after) < 6.0
    # Deterministic: the same repository is due at the same time in every process.
    assert [recheck_due(name, 0.0, 5 * DAY, 7 * DAY) for name in names] == [
        recheck_due(name, 0.0, 5 * DAY, 7 * DAY) for name in names
    ]


def test_a_record_is_trusted_until_its_recheck_is_due() -> None:
    stored = (encode({"v1": A}), 0.0)
    assert written_tags("group/app", stored, 1.0, 7 * DAY).trusted  # type: ignore[union-attr]
    assert not written_tags("group/app", stored, 7 * DAY, 7 * DAY).trusted  # type: ignore[union-attr]
    assert written_tags("group/app", (None, 0.0), 1.0, 7 * DAY) is None
    assert written_tags("group/app", None, 1.0, 7 * DAY) is None


def test_events_change_the_record_as_they_changed_the_secondary() -> None:
    record = encode({"v1": A, "latest": A, "v2": B})

    assert decode(changed(record, wrote={"v3": B}, removed=None)) == {"v1": A, "latest": A, "v2": B, "v3": B}
    assert decode(changed(record, wrote={"v1": B}, removed=None)) == {"v1": B, "latest": A, "v2": B}
    assert decode(changed(record, wrote={}, removed="v1")) == {"latest": A, "v2": B}  # a tag: only itself
    assert decode(changed(record, wrote={}, removed=A)) == {"v2": B}  # a digest: every tag on it
    assert changed(None, wrote={"v1": A}, removed=None) is None  # no record: the next backfill makes one
