"""What :class:`~django_flyworkers.worker.FlyWorker` keeps beside rq's work loop: its books.

* :class:`Books`: the ledger writes a worker has not made yet (job starts and ends), written
  together in one transaction at least every ``FLUSH_EVERY`` seconds (or ``FLUSH_RUNS`` runs);
* the process plumbing around the work horse: letting go of inherited database handles
  (:func:`release_inherited_connections`), waiting on a horse without reaping it
  (:func:`_exits_within`), sharing redis-py's driver info, and leaving a Machine fast;
* ``FLYWORKERS_FAULT_POINT`` (:data:`FAULT_ENV`): tests and soak runs make the worker SIGKILL
  itself at one of :data:`FAULT_POINTS`.

Bookkeeping never stops a worker from working: :func:`_quietly` logs and carries on.
"""

import atexit
import logging
import os
import select
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from django.db import connections
from rq.job import JobStatus

from django_flyworkers import ledger
from django_flyworkers.dispatch import CONTROL_FLOW
from django_flyworkers.ledger import JobRun

logger = logging.getLogger("django_flyworkers.worker")


T = TypeVar("T")


FAULT_ENV = "FLYWORKERS_FAULT_POINT"


FAULT_POINTS = ("horse-forked", "job-ended")


FLUSH_EVERY = 0.1
"""Seconds a job's start or end may wait in the worker before it is written."""


FLUSH_RUNS = 100
"""Most runs written in one transaction."""


MAX_UNWRITTEN = 1000
"""Runs kept for a database that keeps failing; older ones are left to the reaper."""


_STATUS = {
    JobStatus.FINISHED: "finished",
    JobStatus.FAILED: "failed",
    JobStatus.STOPPED: "stopped",
    JobStatus.CANCELED: "canceled",
    JobStatus.QUEUED: "queued",
    JobStatus.SCHEDULED: "scheduled",
    JobStatus.DEFERRED: "deferred",
}


_inherited: list[Any] = []
"""Database handles a horse inherited from its parent: referenced so they are never closed or
garbage-collected here (a PostgreSQL handle would say goodbye on the parent's socket)."""


def _quietly(what: str, fn: Callable[[], T]) -> T | None:
    # Bookkeeping must never stop a worker from working: log and carry on. rq's own control
    # flow (a stop request, a timeout) must reach rq.
    try:
        return fn()
    except CONTROL_FLOW:
        raise
    except Exception:
        logger.exception("flyworkers: could not record %s", what)
        return None


def release_inherited_connections() -> None:
    """In a freshly forked process: forget the parent's database connections, unclosed."""
    for conn in connections.all(initialized_only=True):
        if conn.connection is not None:
            _inherited.append(conn.connection)
            conn.connection = None


class Books:
    """A worker's ledger writes not made yet, written together in one transaction."""

    def __init__(self) -> None:
        self.runs: list[JobRun] = []
        self.due = 0.0
        """When the oldest unwritten change must be written (monotonic), 0 when none."""

    @property
    def unwritten(self) -> bool:
        return any(run.attempt is None or run.status is not None for run in self.runs)

    def overdue(self) -> bool:
        return bool(self.due) and (time.monotonic() >= self.due or len(self.runs) >= FLUSH_RUNS)

    def changed(self) -> None:
        """A run started or ended: it must be written within ``FLUSH_EVERY``."""
        self.due = self.due or time.monotonic() + FLUSH_EVERY

    def add(self, run: JobRun) -> None:
        self.runs.append(run)
        self.changed()
        if len(self.runs) > MAX_UNWRITTEN:
            dropped = self.runs.pop(0)
            logger.error("flyworkers: job %s not recorded (database unavailable)", dropped.job_id)

    def flush(self) -> None:
        if not self.unwritten:
            self.due = 0.0
            return
        ledger.record_runs(self.runs)
        # A written start of a job still running stays, for its end.
        self.runs = [run for run in self.runs if run.status is None]
        self.due = 0.0


def _resolve_driver_info_once(connection: Any) -> None:
    """Let every work horse's new Redis connection reuse the client's driver info.

    A horse cannot use its parent's sockets, so each job opens a new Redis connection. Since
    redis-py 6, each new connection looks up redis-py's version in the installed packages'
    metadata (milliseconds), unless the pool was given that driver info: give it once here.
    """
    try:
        from redis.driver_info import DriverInfo
    except ImportError:  # an older redis-py: the version is computed once, at import
        return
    pool = getattr(connection, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    if isinstance(kwargs, dict) and not {"driver_info", "lib_name", "lib_version"} & set(kwargs):
        kwargs["driver_info"] = DriverInfo()


def _exits_within(pid: int, seconds: float) -> bool:
    """Wait up to ``seconds`` for process ``pid`` to exit, without reaping it (Linux pidfd)."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return False  # no pidfd here: the caller writes now rather than wait blindly
    try:
        ready, _, _ = select.select([fd], [], [], seconds)
        return bool(ready)
    finally:
        os.close(fd)


def _exit_now() -> None:
    """End a worker Machine's process as soon as the work loop is over.

    The Machine stops when its process exits, and Python's teardown of a Django interpreter
    takes 0.3-1 s of billed CPU that serves nothing: flush, run the ``atexit`` hooks (the
    waker's last writes), and leave (benchmarks/cold_start.py: 0.73 s less per cold start).
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(0)
