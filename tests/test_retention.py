"""Retention policies (pure): restic's forget semantics over a hand-made series."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from akosha_sync.repository.retention import (
    Policy,
    RetentionError,
    apply_policy,
    subtract_duration,
)

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)  # a Monday


def _series() -> list[tuple[str, datetime]]:
    """Uploads every 20 minutes over 3 hours today, then one a day for 20 days back."""
    out = [(f"h{i:02d}", T0 + timedelta(minutes=20 * i)) for i in range(9)]
    out += [(f"d{i:02d}", T0 - timedelta(days=i, hours=1)) for i in range(1, 21)]
    return out


def _kept(policy: Policy, **kw: str) -> list[str]:
    return [d.upload_id for d in apply_policy(_series(), policy, **kw) if d.keep]


def test_empty_policy_is_refused() -> None:
    with pytest.raises(RetentionError, match="empty policy"):
        apply_policy(_series(), Policy())


def test_bad_duration_and_negative_counts_are_refused() -> None:
    with pytest.raises(RetentionError, match="not a duration"):
        apply_policy(_series(), Policy(keep_within="2 weeks"))
    with pytest.raises(RetentionError, match="keep_last is -1"):
        apply_policy(_series(), Policy(keep_last=-1))


def test_keep_last() -> None:
    assert _kept(Policy(keep_last=3)) == ["h08", "h07", "h06"]


def test_keep_hourly_keeps_the_newest_of_each_hour_with_uploads() -> None:
    # Hours 11 (h06..h08), 10 (h03..h05), 09 (h00..h02); then the day uploads at 08:00.
    assert _kept(Policy(keep_hourly=4)) == ["h08", "h05", "h02", "d01"]


def test_keep_daily_skips_days_without_uploads() -> None:
    series = [s for s in _series() if s[0] not in ("d02", "d03")]
    kept = [d.upload_id for d in apply_policy(series, Policy(keep_daily=3)) if d.keep]
    assert kept == ["h08", "d01", "d04"]


def test_keep_weekly_uses_iso_weeks() -> None:
    # T0 is Monday 2 March: d01 (Sun 1 March) is the newest of the week before.
    assert _kept(Policy(keep_weekly=3)) == ["h08", "d01", "d08"]


def test_keep_monthly() -> None:
    # d01 (1 March) shares March with h08; d02 (28 Feb) is the newest of February.
    assert _kept(Policy(keep_monthly=2)) == ["h08", "d02"]


def test_keep_within_counts_from_the_newest_upload_not_now() -> None:
    # Newest is 11:40 on 2 March; 2d back is 11:40 on 28 Feb: d01 (08:00 1 Mar) is in,
    # d02 (08:00 28 Feb) is out.
    kept = _kept(Policy(keep_within="2d"))
    assert kept == [f"h{i:02d}" for i in range(8, -1, -1)] + ["d01"]


@pytest.mark.parametrize("span", ["3000y", "99999999999d", "1" + "0" * 30 + "h"])
def test_keep_within_longer_than_the_calendar_keeps_everything(span: str) -> None:
    # It raised OverflowError, which the tools then blamed on the store.
    assert len(_kept(Policy(keep_within=span))) == len(_series())


def test_rules_combine_and_every_decision_has_reasons() -> None:
    decisions = apply_policy(_series(), Policy(keep_last=2, keep_daily=2))
    by_id = {d.upload_id: d for d in decisions}
    assert by_id["h08"].reasons == [
        "newest upload (always kept)", "last 2", "daily 2026-03-02"
    ]
    assert by_id["h07"].reasons == ["last 2"]
    assert by_id["d01"].reasons == ["daily 2026-03-01"]
    assert by_id["d05"].keep is False
    assert by_id["d05"].reasons == ["not kept by --keep-last 2 --keep-daily 2"]


def test_newest_and_newest_verified_open_are_never_forgotten() -> None:
    decisions = apply_policy(_series(), Policy(keep_daily=1), verified_open="d10")
    kept = {d.upload_id: d.reasons for d in decisions if d.keep}
    assert set(kept) == {"h08", "d10"}
    assert kept["d10"] == ["newest upload that passed verify --open (always kept)"]


def test_order_of_input_does_not_matter() -> None:
    series = _series()
    assert apply_policy(series[::-1], Policy(keep_hourly=2)) == apply_policy(
        series, Policy(keep_hourly=2)
    )


def test_subtract_duration_is_calendar_aware() -> None:
    moment = datetime(2026, 3, 31, 12, tzinfo=UTC)
    assert subtract_duration(moment, "1m") == datetime(2026, 2, 28, 12, tzinfo=UTC)
    assert subtract_duration(moment, "1y2w3h") == datetime(2025, 3, 17, 9, tzinfo=UTC)


def test_the_newest_upload_holding_each_database_is_never_forgotten() -> None:
    # reflection.duckdb went missing on the machine after u2: u3 and u4 hold only the
    # knowledge graph. keep_last=1 kept u4 alone, and prune then lost every reflection.
    uploads = [(f"u{i}", T0 + timedelta(hours=i)) for i in range(5)]
    both = ["reflection.duckdb", "knowledge_graph.duckdb"]
    holds = {"u0": both, "u1": both, "u2": both,
             "u3": ["knowledge_graph.duckdb"], "u4": ["knowledge_graph.duckdb"]}
    decisions = apply_policy(uploads, Policy(keep_last=1), holds=holds)
    kept = {d.upload_id: d.reasons for d in decisions if d.keep}
    assert kept == {
        "u4": ["newest upload (always kept)", "last 1"],
        "u2": ["newest upload holding reflection.duckdb (always kept)"],
    }
    # Without what they hold, the policy alone decides (as before).
    assert [d.upload_id for d in apply_policy(uploads, Policy(keep_last=1)) if d.keep] == ["u4"]


def test_uploads_in_the_same_second_are_ordered_by_their_suffix_as_a_number() -> None:
    # As text, "….h.10" sorts before "….h.9": keep_last=1 kept .9 and forgot .10 and .11.
    base = "20261125_120000_h"
    ids = [base] + [f"{base}.{n}" for n in range(2, 12)]
    decisions = apply_policy([(uid, T0) for uid in ids], Policy(keep_last=1))
    assert [d.upload_id for d in decisions] == ids[::-1]
    assert [d.upload_id for d in decisions if d.keep] == [f"{base}.11"]
