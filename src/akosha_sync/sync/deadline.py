"""One time budget per sync, shared by the lock wait, the cloud attempt and the fallback.

A sync gets ``upload_timeout_seconds`` in all, counted from when it is asked for.
Each step runs within what remains. When a fallback is planned, the cloud attempt
leaves a reserve untouched (a quarter of the budget, at most 30 s) so the fallback
still has time after a cloud attempt that stalled; the fallback then gets all that
remains. A sync thus ends within its budget, plus the shielded cleanup of a failed
cloud attempt (at most 10 s).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from akosha_sync.config import AkoshaSyncConfig

__all__ = ["FALLBACK_RESERVE_MAX_S", "Deadline", "fallback_reserve"]

FALLBACK_RESERVE_FRACTION = 0.25
FALLBACK_RESERVE_MAX_S = 30.0


def fallback_reserve(budget: float) -> float:
    """Seconds of a budget the first method leaves for the fallback."""
    return min(FALLBACK_RESERVE_MAX_S, budget * FALLBACK_RESERVE_FRACTION)


class Deadline:
    """An end on the monotonic clock. Tests may build any budget (the configuration
    allows 30 s at least); production code uses ``for_config``."""

    def __init__(
        self, seconds: float, *, clock: Callable[[], float] = time.monotonic,
        end: float | None = None,
    ) -> None:
        self.seconds = float(seconds)  # the budget this deadline was given
        self._clock = clock
        self.end = clock() + self.seconds if end is None else end

    @classmethod
    def for_config(cls, config: AkoshaSyncConfig) -> Deadline:
        return cls(float(config.upload_timeout_seconds))

    def remaining(self) -> float:
        return max(0.0, self.end - self._clock())

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0.0

    def leaving(self, reserve: float) -> Deadline:
        """A deadline ``reserve`` seconds earlier than this one (never before now)."""
        end = max(self._clock(), self.end - reserve)
        return Deadline(end - self._clock(), clock=self._clock, end=end)

    def __repr__(self) -> str:
        return f"Deadline({self.seconds:g}s, {self.remaining():.1f}s left)"
