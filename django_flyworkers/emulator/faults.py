"""What happens to an API call before it reaches the fleet: rate limits, faults, latency.

Both classes are pure (injectable clock, no locking); the emulator calls them under its lock.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .errors import JSON, ApiError, bad_request

ACTIONS = (
    "list",
    "create",
    "get",
    "update",
    "start",
    "stop",
    "suspend",
    "wait",
    "destroy",
    "lease",
    "restart",
    "signal",
    "ps",
    "cordon",
    "metadata",
    "events",
    "versions",
    "app",
)
"""Action names used for rate limits, faults, latency and the call counters in stats."""

APP_SCOPED = frozenset({"list", "create", "app"})
"""Actions limited per app; every other action is limited per Machine."""

DEFAULT_LIMIT = (1.0, 3)
LIMITS = {"get": (5.0, 10)}
"""(refill per second, burst) per action, from Fly's documented limits."""

RATE_LIMITED = ApiError(429, "resource_exhausted", "rate limit exceeded")

_CODES = {
    400: "invalid_argument",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    408: "deadline_exceeded",
    409: "aborted",
    412: "failed_precondition",
    422: "invalid_argument",
    429: "resource_exhausted",
    500: "internal",
    501: "unimplemented",
    502: "unavailable",
    503: "unavailable",
    504: "deadline_exceeded",
}


class TokenBucket:
    """Refills `rate` tokens per second up to `burst`; each call takes one."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class RateLimiter:
    """Token buckets keyed by (action, app) for list/create and (action, Machine id) otherwise.

    `speed` multiplies every refill rate: 1 (the default) is Fly's; a test may use 20 to see
    a bucket refill in a twentieth of the time, without changing the bursts.
    """

    def __init__(
        self,
        *,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
        speed: float = 1.0,
    ) -> None:
        self.enabled = enabled
        self.clock = clock
        self.speed = speed
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def allow(self, action: str, scope: str) -> bool:
        if not self.enabled:
            return True
        now = self.clock()
        bucket = self._buckets.get((action, scope))
        if bucket is None:
            rate, burst = LIMITS.get(action, DEFAULT_LIMIT)
            bucket = TokenBucket(rate * self.speed, burst, now)
            self._buckets[(action, scope)] = bucket
        return bucket.take(now)

    def reset(self) -> None:
        self._buckets.clear()


@dataclass
class Fault:
    """Fail the next `count` calls of `action` with `status` (before or after they take effect)."""

    action: str
    status: int = 500
    count: int = 1
    message: str | None = None
    after: bool = False
    """Apply the call, then answer with the error (e.g. a create that 'timed out' but happened)."""

    def error(self) -> ApiError:
        if self.status == 429 and self.message is None:
            return RATE_LIMITED
        if self.message and re.match(r"[a-z_]+: ", self.message):
            return ApiError(self.status, "", self.message)  # already "<code>: <message>"
        code = _CODES.get(self.status, "unknown")
        message = self.message or f"injected fault for action '{self.action}'"
        return ApiError(self.status, code, message)


class FaultPlan:
    """Injected faults (consumed one call at a time) and per-action latency."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self.latency: dict[str, float] = {}
        """Seconds a call of the action waits before it takes effect."""
        self.latency_after: dict[str, float] = {}
        """Seconds its answer waits after it took effect (the caller hears late of a done deed)."""

    def add(self, spec: JSON) -> Fault:
        action = _action(spec.get("action"))
        status, count = spec.get("status", 500), spec.get("count", 1)
        if not isinstance(status, int) or not 400 <= status <= 599:
            raise bad_request("fault status must be an HTTP error status between 400 and 599")
        if not isinstance(count, int) or count < 1:
            raise bad_request("fault count must be a positive integer")
        message = spec.get("message")
        if message is not None and not isinstance(message, str):
            raise bad_request("fault message must be a string")
        fault = Fault(action, status, count, message, bool(spec.get("after", False)))
        self._faults.append(fault)
        return fault

    def set_latency(self, spec: JSON) -> None:
        action = _action(spec.get("action"))
        seconds = spec.get("seconds")
        if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
            raise bad_request("latency seconds must be a non-negative number")
        after = spec.get("after", False)
        if not isinstance(after, bool):
            raise bad_request("latency after must be true or false")
        delays = self.latency_after if after else self.latency
        if seconds:
            delays[action] = float(seconds)
        else:
            delays.pop(action, None)

    def take(self, action: str, *, after: bool) -> ApiError | None:
        """Consume one matching fault, if any, and return its error."""
        for fault in self._faults:
            if fault.action == action and fault.after == after:
                fault.count -= 1
                if fault.count == 0:
                    self._faults.remove(fault)
                return fault.error()
        return None

    def clear(self) -> None:
        self._faults.clear()
        self.latency.clear()
        self.latency_after.clear()

    def snapshot(self) -> JSON:
        return {
            "faults": [asdict(f) for f in self._faults],
            "latency": dict(self.latency),
            "latency_after": dict(self.latency_after),
        }


def _action(value: object) -> str:
    if value not in ACTIONS:
        raise bad_request(f"unknown action {value!r}: use one of {', '.join(ACTIONS)}")
    assert isinstance(value, str)
    return value
