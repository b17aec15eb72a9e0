"""``WAKE_MODE="thread"``: the enqueue bookkeeping runs on one daemon thread per process.

A ``.delay()`` pays for its Redis push and for handing two things to this thread: the job's
``FlyJob`` row and a wake-up for its queue. The thread collects them for ``BATCH_DELAY`` seconds,
then writes every row it holds in one multi-row upsert and wakes each queue once: the coverage
check (a Redis read, always after the push it answers, which keeps the lost wake-up handshake in
order) and, only when the backlog is not covered, the Machines API. A burst of enqueues thus
costs a handful of statements and Redis reads, not one of each per job.

A wake that hit Machines API errors is tried again after a backoff (1 s doubling to 60 s) for
as long as the process lives and the backlog is not covered, so jobs enqueued while Fly's API is
down run once it is back. The thread keeps its database connection between batches (it
reconnects after an error). It is started afresh after a fork (gunicorn workers, rq work
horses); an ``atexit`` hook, and a work horse before its ``os._exit``, drain what is pending, so
a short-lived process loses neither a row nor a wake-up. A process killed before that loses
neither its jobs (they are in Redis) nor their rows: a worker creates a missing row when it
starts the job, and ``flyworkers_scale`` wakes queues nobody woke.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from django.db import DatabaseError, connections

from django_flyworkers.ledger import Notice, write_notices

logger = logging.getLogger("django_flyworkers.scaler")

RETRY_MIN = 1.0
RETRY_MAX = 60.0
BATCH_DELAY = 0.05
"""Seconds the thread collects rows and wake-ups before it writes and wakes: a row exists in
the database about this long after its push (plus the write itself)."""


class Waker:
    """Rows to write, queues to wake now or again later, and the thread that does it."""

    def __init__(self) -> None:
        self._forget()

    def _forget(self) -> None:
        self._cond = threading.Condition()
        self._pending: set[str] = set()
        self._notices: list[Notice] = []
        self._due = 0.0
        self._urgent = False
        self._later: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self._busy = 0
        self._pid = 0
        self._held: list[Any] = getattr(self, "_held", [])

    def _ensure_thread(self) -> None:
        # Called with the lock held. After a fork the parent's thread does not exist here.
        if self._pid != os.getpid():
            self._pending, self._notices, self._later, self._backoff = set(), [], {}, {}
            self._busy, self._due, self._urgent = 0, 0.0, False
            self._pid = os.getpid()
            threading.Thread(target=self._run, name="flyworkers-waker", daemon=True).start()

    def enqueued(self, queue: str, notices: Sequence[Notice], *, wake: bool = True) -> None:
        """Write ``notices`` and (if ``wake``) wake ``queue`` in the next batch."""
        with self._cond:
            self._ensure_thread()
            self._notices.extend(notices)
            if wake:
                self._pending.add(queue)
            if not self._due:  # the first item of a batch starts its clock
                self._due = time.monotonic() + BATCH_DELAY
                self._cond.notify_all()

    def submit(self, queue: str) -> None:
        """Wake ``queue`` in the next batch."""
        self.enqueued(queue, (), wake=True)

    def retry_later(self, queue: str) -> float:
        """Wake ``queue`` again after a growing delay; returns the delay in seconds."""
        with self._cond:
            self._ensure_thread()
            delay = min(RETRY_MAX, self._backoff.get(queue, RETRY_MIN / 2) * 2)
            self._backoff[queue] = delay
            self._later[queue] = time.monotonic() + delay
            self._cond.notify_all()
            return delay

    def _next(self) -> tuple[list[Notice], list[str]]:
        """Wait for a batch that is due; take all of it."""
        with self._cond:
            while True:
                now = time.monotonic()
                for queue, due in list(self._later.items()):
                    if due <= now:
                        del self._later[queue]
                        self._pending.add(queue)
                        self._due = self._due or now
                waiting = self._pending or self._notices
                if waiting and (self._urgent or now >= self._due):
                    batch, queues = self._notices, sorted(self._pending)
                    self._notices, self._pending, self._due = [], set(), 0.0
                    self._busy += 1
                    return batch, queues
                deadlines = [*self._later.values(), *([self._due] if waiting else [])]
                self._cond.wait(max(0.0, min(deadlines) - now) if deadlines else None)

    def _run(self) -> None:
        while True:
            batch, queues = self._next()
            try:
                self._write(batch)
                for queue in queues:
                    self._wake(queue)
            finally:
                with self._cond:
                    self._busy -= 1
                    if not (self._pending or self._notices):
                        self._urgent = False
                    self._cond.notify_all()

    def _write(self, batch: list[Notice]) -> None:
        if not batch:
            return
        for attempt in (1, 2):
            try:
                write_notices(batch)
                # Hold this thread's connections from the module: a fork copies no thread, and
                # a child freeing a dead thread's PostgreSQL handle would close our session.
                self._held = list(connections.all(initialized_only=True))
                return
            except DatabaseError:
                # Kept between batches, the connection may have gone stale: start afresh once.
                connections.close_all()
                if attempt == 2:
                    # The jobs are in Redis; a worker creates each missing row when it starts.
                    logger.exception("flyworkers: could not write %d FlyJob rows", len(batch))
            except Exception:
                logger.exception("flyworkers: could not write %d FlyJob rows", len(batch))
                return

    def _wake(self, queue: str) -> None:
        from django_flyworkers.scaling.scaler import wake

        try:
            outcome = wake(queue)
        except Exception:
            logger.exception("flyworkers: wake-up for queue %s failed", queue)
            self.retry_later(queue)
            return
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

    def cancel(self) -> None:
        """Forget pending rows, wake-ups and retries (tests, between cases); wait for the thread."""
        with self._cond:
            self._pending.clear()
            self._notices.clear()
            self._later.clear()
            self._backoff.clear()
            self._due = 0.0
        self.drain()

    def drain(self, timeout: float = 30.0) -> bool:
        """Write and wake what is pending now, and wait for it (retries due later do not count)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._pid != os.getpid():
                return True
            self._urgent = True
            self._cond.notify_all()
            while self._pending or self._notices or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            self._urgent = False
        return True

    def close_connections(self) -> None:
        """Close the database connections the thread keeps between batches.

        For a test run's end, before the test database is dropped: PostgreSQL refuses to drop
        a database another session is using. The thread reconnects if it writes again.
        """
        self.drain()
        held, self._held = self._held, []
        for connection in held:
            # Django's connections belong to the thread that opened them: allow this one close.
            connection.inc_thread_sharing()
            try:
                connection.close()
            finally:
                connection.dec_thread_sharing()

    @property
    def pending(self) -> int:
        """Rows not written yet (for tests and benchmarks)."""
        with self._cond:
            return len(self._notices)


waker = Waker()
atexit.register(waker.drain)
# A fork may happen while another thread holds the condition's lock: start afresh in the child.
os.register_at_fork(after_in_child=waker._forget)
