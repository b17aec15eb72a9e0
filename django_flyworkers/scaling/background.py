"""``WAKE_MODE="thread"``: wake-ups run on one daemon thread per process, off the request path.

Requests for the same queue coalesce while a wake is pending. A wake that hit Machines API
errors is tried again after a backoff (1 s doubling to 60 s) for as long as the process lives
and the backlog is not covered, so jobs enqueued while Fly's API is down run once it is back.
The thread is restarted after a fork (gunicorn workers, rq work horses), and an ``atexit`` hook
drains what is pending so a short-lived process (a management command that enqueues and exits)
loses no wake-up.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time

from django.db import connections

logger = logging.getLogger("django_flyworkers.scaler")

RETRY_MIN = 1.0
RETRY_MAX = 60.0


class Waker:
    """Queues to wake now, queues to wake again later, and the thread that does it."""

    def __init__(self) -> None:
        self._forget()

    def _forget(self) -> None:
        self._cond = threading.Condition()
        self._pending: set[str] = set()
        self._later: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self._busy = 0
        self._pid = 0

    def _ensure_thread(self) -> None:
        # Called with the lock held. After a fork the parent's thread does not exist here.
        if self._pid != os.getpid():
            self._pending, self._later, self._backoff = set(), {}, {}
            self._busy = 0
            self._pid = os.getpid()
            threading.Thread(target=self._run, name="flyworkers-waker", daemon=True).start()

    def submit(self, queue: str) -> None:
        """Wake ``queue`` as soon as the thread is free."""
        with self._cond:
            self._ensure_thread()
            self._pending.add(queue)
            self._cond.notify_all()

    def retry_later(self, queue: str) -> float:
        """Wake ``queue`` again after a growing delay; returns the delay in seconds."""
        with self._cond:
            self._ensure_thread()
            delay = min(RETRY_MAX, self._backoff.get(queue, RETRY_MIN / 2) * 2)
            self._backoff[queue] = delay
            self._later[queue] = time.monotonic() + delay
            self._cond.notify_all()
            return delay

    def _next(self) -> str:
        with self._cond:
            while True:
                now = time.monotonic()
                for queue, due in list(self._later.items()):
                    if due <= now:
                        del self._later[queue]
                        self._pending.add(queue)
                if self._pending:
                    self._busy += 1
                    return self._pending.pop()
                timeout = min(self._later.values()) - now if self._later else None
                self._cond.wait(timeout)

    def _run(self) -> None:
        from django_flyworkers.scaling.scaler import wake

        while True:
            queue = self._next()
            try:
                outcome = wake(queue)
                if outcome is not None and outcome.errors:
                    delay = self.retry_later(queue)
                    logger.warning(
                        "flyworkers: wake-up of queue %s hit API errors; trying again in %.0fs",
                        queue,
                        delay,
                    )
                else:
                    with self._cond:
                        self._backoff.pop(queue, None)
            except Exception:
                logger.exception("flyworkers: wake-up for queue %s failed", queue)
                self.retry_later(queue)
            finally:
                connections.close_all()
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def cancel(self) -> None:
        """Forget pending wake-ups and retries (tests, between cases), then wait for the thread."""
        with self._cond:
            self._pending.clear()
            self._later.clear()
            self._backoff.clear()
        self.drain()

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until no wake is pending or running (retries due later do not count)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._pid != os.getpid():
                return True
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True


waker = Waker()
atexit.register(waker.drain)
# A fork may happen while another thread holds the condition's lock: start afresh in the child.
os.register_at_fork(after_in_child=waker._forget)
