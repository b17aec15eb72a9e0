"""Backoff policy for Machines API calls.

Fly limits every action to about 1 request/s per Machine (burst 3) and sends no
``Retry-After``, and a start right after a stop can fail with 412 for a moment. The client
therefore retries, with jittered exponential backoff bounded by a total time budget:

- always: 429, connection errors before the request was sent, and the known transient 412s
  of ``start`` (``machine still active``, ``current state: 'created'/'replacing'/'stopping'``);
- for idempotent calls only (GET, wait, start/stop/suspend, destroy): 500/502/503/504 and
  ambiguous transport errors (read timeout, reset after sending);
- never blindly for create: after an ambiguous failure the client first looks the Machine up
  by name (see :meth:`MachinesClient.create`).

Delays grow ``base_delay * 2**n`` up to ``max_delay``; each is drawn uniformly from
``[delay * (1 - jitter), delay]`` so clients that collided on a 429 spread out. No sleep
ever runs past the deadline: the last one is cut short so one final attempt happens at the
deadline, and then the last error is raised.

Why hand-written rather than tenacity: the loop is ~40 lines, the retry decision depends on
parsed Fly errors and on create's look-up-by-name step (which does not fit a decorator), and
it keeps the client's only runtime dependency httpx. Clock, sleep and randomness are fields
of the policy so tests run the whole thing on a fake clock.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

__all__ = ["Backoff", "RetryPolicy"]


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often the client retries transient failures.

    Usage::

        RetryPolicy()                    # 30 s budget, 0.5 s -> 5 s backoff, 50 % jitter
        RetryPolicy(max_elapsed=0)       # never retry
        RetryPolicy(sleep=fake.sleep, clock=fake.time, rand=lambda: 1.0)   # tests
    """

    max_elapsed: float = 30.0
    """Total seconds one logical call may spend retrying (sleeps plus attempts)."""
    base_delay: float = 0.5
    """First backoff delay in seconds; doubles each retry."""
    max_delay: float = 5.0
    """Cap on a single backoff delay, in seconds."""
    jitter: float = 0.5
    """Fraction of each delay that is randomised (0 = fixed delays, 1 = full jitter)."""
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)
    """Sleep function; inject a fake in tests."""
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)
    """Monotonic clock in seconds; also used for :meth:`MachinesClient.wait` deadlines."""
    rand: Callable[[], float] = field(default=random.random, repr=False, compare=False)
    """Uniform [0, 1) source for jitter."""

    def __post_init__(self) -> None:
        if self.max_elapsed < 0 or self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("RetryPolicy durations must not be negative")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("RetryPolicy.jitter must be between 0 and 1")

    @classmethod
    def never(cls) -> RetryPolicy:
        """A policy that makes exactly one attempt."""
        return cls(max_elapsed=0.0)

    def with_budget(self, max_elapsed: float) -> RetryPolicy:
        """The same policy with another total time budget."""
        return replace(self, max_elapsed=max_elapsed)

    def delay(self, retry: int) -> float:
        """Backoff before retry number ``retry`` (0-based), jitter applied."""
        ceiling = min(self.max_delay, self.base_delay * (2.0 ** min(retry, 32)))
        return ceiling * (1.0 - self.jitter * self.rand())

    def start(self, budget: float | None = None) -> Backoff:
        """Begin one logical call; ``budget`` overrides ``max_elapsed``."""
        return Backoff(self, self.max_elapsed if budget is None else budget)


class Backoff:
    """The retry state of one logical call: attempt count and deadline."""

    def __init__(self, policy: RetryPolicy, budget: float) -> None:
        self.policy = policy
        self.deadline = policy.clock() + budget
        self.attempts = 1

    def remaining(self) -> float:
        """Seconds left before the deadline (may be negative)."""
        return self.deadline - self.policy.clock()

    def next_delay(self) -> float | None:
        """The delay before the next attempt, or ``None`` when the budget is spent."""
        remaining = self.remaining()
        if remaining <= 0:
            return None
        return min(self.policy.delay(self.attempts - 1), remaining)

    def sleep(self, delay: float) -> None:
        """Sleep ``delay`` seconds and count the attempt that follows."""
        if delay > 0:
            self.policy.sleep(delay)
        self.attempts += 1
