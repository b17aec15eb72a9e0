"""What every part of the ledger shares: status groups, error truncation, and the
connection helpers its raw-SQL writes use.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from django.conf import settings as django_settings
from django.utils import timezone
from rq.job import Job

from django_flyworkers.models import FlyJob

ERROR_MAX_CHARS = 4000
"""Errors are truncated from the front: the end of a traceback says what went wrong."""


Status = FlyJob.Status


FINAL = (Status.FINISHED, Status.FAILED, Status.STOPPED, Status.CANCELED)


WAITING = (Status.QUEUED, Status.SCHEDULED, Status.DEFERRED)


RAN = (Status.FINISHED, Status.FAILED, Status.STOPPED)


REVIVABLE = (
    FlyJob.Status.SCHEDULED,
    FlyJob.Status.DEFERRED,
    FlyJob.Status.FAILED,
    FlyJob.Status.STOPPED,
    FlyJob.Status.CANCELED,
    FlyJob.Status.FINISHED,
)


def truncate_error(text: str | None) -> str:
    """Keep the last ``ERROR_MAX_CHARS`` characters of an error text."""
    if not text:
        return ""
    if len(text) <= ERROR_MAX_CHARS:
        return text
    return "…" + text[-(ERROR_MAX_CHARS - 1) :]


def _func_name(job: Job) -> str:
    try:
        return str(job.func_name)[:300]
    except Exception:
        return ""


def _commit_without_waiting(connection: Any) -> None:
    """PostgreSQL: let this bookkeeping transaction commit without waiting for its WAL flush.

    Safe by PostgreSQL's design (a crash can lose the last moments of commits, never leave
    them half-done), and harmless here: a lost row is recreated by the worker that starts the
    job, or settled from rq's state by the reaper. It spares the worker and the waker thread a
    disk flush per write. Other databases: nothing to do.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL synchronous_commit TO OFF")


def _datetimes(connection: Any) -> Callable[[datetime | None], Any]:
    """The database's adapter for datetime parameters, fast for SQLite's common case.

    Django's adapter costs microseconds per value, which a batch of thousands of rows feels.
    For aware values on SQLite (``USE_TZ``) this gives the same text Django stores.
    """
    adapt = connection.ops.adapt_datetimefield_value
    if connection.vendor != "sqlite" or not django_settings.USE_TZ:
        return adapt
    zone = connection.timezone

    def fast(value: datetime | None) -> Any:
        if value is None or value.tzinfo is None:
            return adapt(value)
        return str(value.astimezone(zone).replace(tzinfo=None))

    return fast


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and timezone.is_naive(value):
        return value.replace(tzinfo=UTC)  # rq 2 keeps naive UTC times
    return value
