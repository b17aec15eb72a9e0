"""The dashboard's time windows: how long, cut into which buckets, ending now."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

DAY = 86400


@dataclass(frozen=True)
class Span:
    """A chart window: ``seconds`` long, cut into buckets of ``width`` seconds, ending now."""

    key: str
    seconds: int
    width: int
    now: float
    count: int = field(init=False)
    origin: float = field(init=False)
    """Start of the first bucket. Buckets line up with whole minutes, quarters or hours; the
    last one holds now."""
    end: float = field(init=False)

    def __post_init__(self) -> None:
        origin = (math.floor(self.now / self.width) + 1) * self.width - self.seconds
        object.__setattr__(self, "count", self.seconds // self.width)
        object.__setattr__(self, "origin", float(origin))
        object.__setattr__(self, "end", float(origin + self.seconds))

    @property
    def start(self) -> datetime:
        return datetime.fromtimestamp(self.origin, UTC)


WINDOWS = {"15m": (900, 10), "1h": (3600, 60), "24h": (DAY, 900), "7d": (7 * DAY, 3600)}
"""Window name: (seconds, bucket width in seconds)."""


def span(key: str, now: float | None = None) -> Span:
    """The window named ``key`` (``15m``, ``1h``, ``24h``, ``7d``; anything else is ``1h``)."""
    key = key if key in WINDOWS else "1h"
    seconds, width = WINDOWS[key]
    return Span(key, seconds, width, time.time() if now is None else now)


def clamp(value: float | None) -> float | None:
    """``value``, but never below 0 (None stays None)."""
    # A scheduled job taken a moment before its due time has a tiny negative wait.
    return None if value is None else max(0.0, value)
