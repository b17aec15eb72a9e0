"""``WAKE_MODE="thread"``: wake-ups run on one daemon thread per process, off the request path.

Requests for the same queue coalesce while a wake is pending. The thread is restarted after a
fork (gunicorn workers, rq work horses), and an ``atexit`` hook drains what is pending so a
short-lived process (a management command that enqueues and exits) loses no wake-up.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time

from django.db import connections

logger = logging.getLogger("django_flyworkers.scaler")


class Waker:
    """A set of queues to wake and the thread that wakes them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: set[str] = set()
        self._busy = 0
        self._pid = 0

    def submit(self, queue: str) -> None:
        with self._cond:
            if self._pid != os.getpid():
                self._pending = set()
                self._busy = 0
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="flyworkers-waker", daemon=True).start()
            self._pending.add(queue)
            self._cond.notify_all()

    def _run(self) -> None:
        from django_flyworkers.scaling.scaler import wake

        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                queue = self._pending.pop()
                self._busy += 1
            try:
                wake(queue)
            except Exception:
                logger.exception("flyworkers: wake-up for queue %s failed", queue)
            finally:
                connections.close_all()
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until nothing is pending or running; False if ``timeout`` passed first."""
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
