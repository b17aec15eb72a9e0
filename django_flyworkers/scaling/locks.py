"""The Redis locks a scaling pass holds, renewed before every Machines API call.

redis-py's ``Lock`` (a token checked on release and on extend), so a pass that outlives its
lock never deletes another process's, and a pass against a slow API renews its lock instead
of losing it halfway: a second pass could otherwise plan against the same headroom and
exceed ``MAX_MACHINES``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from redis import Redis
from redis.exceptions import LockError
from redis.lock import Lock

from django_flyworkers.conf import FlySettings

logger = logging.getLogger("django_flyworkers.scaler")

LONGEST_WAIT = 30.0
"""The longest Machines ``wait`` a pass makes (a restart waits for a leaving Machine)."""


def lock_ttl(settings: FlySettings) -> float:
    """Seconds a lock lives unless renewed: longer than any single API call can take."""
    return max(60.0, 2 * (settings.http_timeout + settings.api_retry_seconds) + LONGEST_WAIT)


class Locks:
    """The Redis locks one pass holds; ``renew()`` extends them all (before each API call)."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.held: list[Lock] = []

    def renew(self) -> None:
        for lock in self.held:
            try:
                lock.extend(self.ttl, replace_ttl=True)
            except LockError:
                logger.warning("flyworkers: lost scaling lock %s", lock.name)

    @contextmanager
    def hold(self, conn: Redis, key: str, wait: float | None) -> Iterator[bool]:
        """Hold ``key`` (waiting up to ``wait`` s; None: do not wait); yields whether held."""
        lock = conn.lock(key, timeout=self.ttl, sleep=0.05, thread_local=False)
        if wait is None:
            got = lock.acquire(blocking=False)
        else:
            got = lock.acquire(blocking=True, blocking_timeout=wait)
        if not got:
            yield False
            return
        self.held.append(lock)
        try:
            yield True
        finally:
            self.held.remove(lock)
            with _suppress_lock_error():
                lock.release()


@contextmanager
def _suppress_lock_error() -> Iterator[None]:
    try:
        yield
    except LockError:  # expired meanwhile: someone else may hold it now, leave theirs alone
        logger.warning("flyworkers: a scaling lock expired before it was released")
