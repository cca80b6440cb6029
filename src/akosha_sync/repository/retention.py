"""Which uploads a retention policy keeps: restic's ``forget --keep-*`` semantics, pure.

* ``keep_last N``: the N newest uploads.
* ``keep_hourly/daily/weekly/monthly/yearly N``: walking from the newest upload to the
  oldest, the first (so the newest) upload of each calendar bucket is kept, for the
  N newest buckets that have an upload at all (empty hours/days do not count).
  Buckets are UTC (upload ids and manifests are UTC); weeks are ISO weeks.
* ``keep_within D`` (``1y2m3w4d5h``): every upload newer than the newest upload's time
  minus D (counted from the newest upload, not from now, so a machine that stopped
  syncing keeps its last history).

Whatever the policy, the newest upload, the newest upload that passed
``verify --open`` and, for each database any upload holds, the newest upload holding
it are never forgotten (a policy must not leave a repository without a known-good
restore point, nor forget the last copy of a database that went missing on the
machine while later syncs went on with the other one). An empty policy is refused:
forgetting is never implied. Every decision carries the reasons that kept it (or why
it goes). Uploads are ordered by time, then by id in upload order (``..._host.10``
after ``..._host.9``, which a text sort gets wrong).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta

import msgspec

from akosha_sync.repository.manifest import upload_id_order

__all__ = [
    "Decision",
    "Policy",
    "RetentionError",
    "apply_policy",
    "parse_duration",
    "subtract_duration",
]


class RetentionError(ValueError):
    """The policy cannot be applied (empty, negative counts, a bad duration)."""


class Policy(msgspec.Struct, frozen=True, kw_only=True):
    """A retention policy; 0 / "" means the rule is not used."""

    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0
    keep_within: str = ""

    @property
    def empty(self) -> bool:
        return not (
            self.keep_last or self.keep_hourly or self.keep_daily or self.keep_weekly
            or self.keep_monthly or self.keep_yearly or self.keep_within
        )

    def problems(self) -> list[str]:
        """Every reason this policy cannot be used, as sentences."""
        out: list[str] = []
        for name in ("keep_last", "keep_hourly", "keep_daily", "keep_weekly",
                     "keep_monthly", "keep_yearly"):
            if getattr(self, name) < 0:
                out.append(f"{name} is {getattr(self, name)}; use a count of 0 or more.")
        if self.keep_within:
            try:
                parse_duration(self.keep_within)
            except RetentionError as exc:
                out.append(str(exc))
        return out

    def describe(self) -> str:
        parts = [
            f"--{name.replace('_', '-')} {value}"
            for name, value in msgspec.structs.asdict(self).items()
            if value
        ]
        return " ".join(parts) or "(empty)"


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """The verdict on one upload."""

    upload_id: str
    time: str  # ISO 8601 UTC
    keep: bool
    reasons: list[str]


_DURATION_RE = re.compile(r"(\d+)([ymwdh])")


def parse_duration(text: str) -> tuple[int, int, int, int]:
    """``1y2m3w4d5h`` -> (years, months, days, hours); weeks count as 7 days."""
    cleaned = text.strip().lower()
    if not cleaned or _DURATION_RE.sub("", cleaned):
        raise RetentionError(
            f"keep_within {text!r} is not a duration; write it like restic: '2d', '12h', "
            "'1y6m', '3w' (y years, m months, w weeks, d days, h hours)."
        )
    years = months = days = hours = 0
    for number, unit in _DURATION_RE.findall(cleaned):
        n = int(number)
        if unit == "y":
            years += n
        elif unit == "m":
            months += n
        elif unit == "w":
            days += 7 * n
        elif unit == "d":
            days += n
        else:
            hours += n
    return years, months, days, hours


def subtract_duration(moment: datetime, text: str) -> datetime:
    """``moment`` minus the duration, calendar-wise for years and months (as restic)."""
    years, months, days, hours = parse_duration(text)
    total_months = moment.year * 12 + (moment.month - 1) - (years * 12 + months)
    year, month = divmod(total_months, 12)
    month += 1
    earliest = datetime.min.replace(tzinfo=UTC)  # a longer span than the calendar: keep all
    if year < 1:
        return earliest
    # Clamp the day (31 March minus one month is the last day of February).
    day = min(moment.day, _days_in_month(year, month))
    shifted = moment.replace(year=year, month=month, day=day)
    try:
        return shifted - timedelta(days=days, hours=hours)
    except OverflowError:
        return earliest


def _days_in_month(year: int, month: int) -> int:
    following = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=UTC)
    return (following - timedelta(days=1)).day


_BUCKETS: list[tuple[str, str, Callable[[datetime], tuple[int, ...]]]] = [
    ("keep_hourly", "hourly", lambda t: (t.year, t.month, t.day, t.hour)),
    ("keep_daily", "daily", lambda t: (t.year, t.month, t.day)),
    ("keep_weekly", "weekly", lambda t: tuple(t.isocalendar()[:2])),
    ("keep_monthly", "monthly", lambda t: (t.year, t.month)),
    ("keep_yearly", "yearly", lambda t: (t.year,)),
]

_BUCKET_LABEL: dict[str, Callable[[datetime], str]] = {
    "hourly": lambda t: t.strftime("%Y-%m-%d %H:00"),
    "daily": lambda t: t.strftime("%Y-%m-%d"),
    "weekly": lambda t: "{}-W{:02d}".format(*t.isocalendar()[:2]),
    "monthly": lambda t: t.strftime("%Y-%m"),
    "yearly": lambda t: t.strftime("%Y"),
}


def apply_policy(
    uploads: Sequence[tuple[str, datetime]],
    policy: Policy,
    *,
    verified_open: str | None = None,
    holds: Mapping[str, Collection[str]] | None = None,
) -> list[Decision]:
    """Decide, newest first, which of ``uploads`` (id, UTC time) the policy keeps.

    ``verified_open``: the newest upload that passed ``verify --open`` (always kept).
    ``holds``: upload id -> the databases it holds; for each database, the newest
    upload holding it is always kept (without it, no upload is kept for what it holds).
    Raises ``RetentionError`` for an empty or invalid policy.
    """
    if policy.empty:
        raise RetentionError(
            "refusing to forget with an empty policy: give at least one of --keep-last, "
            "--keep-hourly, --keep-daily, --keep-weekly, --keep-monthly, --keep-yearly "
            "or --keep-within."
        )
    problems = policy.problems()
    if problems:
        raise RetentionError("; ".join(problems))
    ordered = sorted(
        ((uid, at.astimezone(UTC)) for uid, at in uploads),
        key=lambda item: (item[1], upload_id_order(item[0])),
        reverse=True,
    )
    if not ordered:
        return []
    last_holder = _last_holders([uid for uid, _ in ordered], holds or {})
    newest_time = ordered[0][1]
    within_since = (
        subtract_duration(newest_time, policy.keep_within) if policy.keep_within else None
    )
    remaining = {field: getattr(policy, field) for field, _, _ in _BUCKETS}
    last_bucket: dict[str, tuple[int, ...] | None] = {field: None for field, _, _ in _BUCKETS}
    decisions: list[Decision] = []
    for position, (uid, at) in enumerate(ordered):
        reasons: list[str] = []
        if position == 0:
            reasons.append("newest upload (always kept)")
        if verified_open is not None and uid == verified_open:
            reasons.append("newest upload that passed verify --open (always kept)")
        reasons.extend(
            f"newest upload holding {name} (always kept)" for name in last_holder.get(uid, [])
        )
        if position < policy.keep_last:
            reasons.append(f"last {policy.keep_last}")
        for field, name, bucket_of in _BUCKETS:
            bucket = bucket_of(at)
            if remaining[field] > 0 and bucket != last_bucket[field]:
                remaining[field] -= 1
                last_bucket[field] = bucket
                reasons.append(f"{name} {_BUCKET_LABEL[name](at)}")
        if within_since is not None and at > within_since:
            reasons.append(f"within {policy.keep_within} of the newest upload")
        keep = bool(reasons)
        if not keep:
            reasons = [f"not kept by {policy.describe()}"]
        decisions.append(
            Decision(
                upload_id=uid,
                time=at.isoformat().replace("+00:00", "Z"),
                keep=keep,
                reasons=reasons,
            )
        )
    return decisions


def _last_holders(
    newest_first: Sequence[str], holds: Mapping[str, Collection[str]]
) -> dict[str, list[str]]:
    """Upload id -> the databases (sorted) of which it is the newest holder, leaving out
    those the newest upload holds: it is kept anyway, and saying so for every database
    on every run would only bury the reasons that matter."""
    if not newest_first:
        return {}
    seen = set(holds.get(newest_first[0], ()))
    out: dict[str, list[str]] = {}
    for uid in newest_first[1:]:
        new = sorted(set(holds.get(uid, ())) - seen)
        if new:
            out[uid] = new
            seen.update(new)
    return out
