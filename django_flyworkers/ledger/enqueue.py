"""The enqueue side: a job became visible in Redis, its row is inserted or revived.

One multi-row upsert per batch (:func:`write_notices`); only rows that are waiting or finished
are revived, never one a worker has started.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from datetime import datetime
from typing import Any, NamedTuple

from django.db import connections, router, transaction
from django.db.models import Q
from django.utils import timezone
from rq.job import Job

from django_flyworkers.ledger.common import (
    REVIVABLE,
    WAITING,
    _commit_without_waiting,
    _datetimes,
    _func_name,
    truncate_error,
)
from django_flyworkers.models import FlyJob

UPSERT_ROWS = 2000
"""Most rows per enqueue upsert: 10,000 jobs are five statements. Fewer when the database
allows fewer parameters per statement."""


UPSERT_BATCH = UPSERT_ROWS  # the name earlier versions used


class Notice(NamedTuple):
    """A job became visible in Redis as ``status``: what its row needs (cheap to build)."""

    job_id: str
    queue: str
    func_name: str
    description: str
    status: str
    enqueued_at: datetime
    scheduled_for: datetime | None


def notices(
    queue: str,
    jobs: Iterable[Job],
    status: str = FlyJob.Status.QUEUED,
    scheduled_for: datetime | None = None,
) -> list[Notice]:
    """The notices for ``jobs`` pushed to ``queue`` as ``status`` (read from the jobs now)."""
    return [
        Notice(
            job.id,
            queue,
            _func_name(job),
            str(job.description or "")[:300],
            status,
            job.enqueued_at or job.created_at or timezone.now(),
            scheduled_for,
        )
        for job in jobs
    ]


def record_enqueued(
    queue: str,
    jobs: Iterable[Job],
    *,
    status: str = FlyJob.Status.QUEUED,
    scheduled_for: datetime | None = None,
) -> None:
    """Jobs are visible in Redis as ``status`` (queued, scheduled or deferred).

    New rows are inserted; existing rows are revived only from a waiting or final status,
    never from ``started`` (a worker may have taken the job already).
    """
    write_notices(notices(queue, jobs, status, scheduled_for))


def write_notices(batch: Sequence[Notice], using: str | None = None) -> int:
    """Write enqueue notices in as few statements as the database allows; returns statements.

    Of several notices for one job only the last counts (they arrive in push order).
    """
    latest = {notice.job_id: notice for notice in batch}
    rows = list(latest.values())
    if not rows:
        return 0
    using = using or router.db_for_write(FlyJob)
    connection = connections[using]
    # Inside the caller's transaction (COMMIT_MODE "auto", WAKE_MODE "sync") a failed write
    # must not poison it: a savepoint confines it. Several statements are one transaction.
    upsert = connection.vendor in ("sqlite", "postgresql")
    size = _rows_per_statement(connection, len(_UPSERT_COLUMNS)) if upsert else len(rows)
    chunks = [rows[start : start + size] for start in range(0, len(rows), size)]
    own = not connection.in_atomic_block
    several = len(chunks) > 1 or not upsert
    statements = 0
    with transaction.atomic(using) if several or not own else nullcontext():
        if own and several:
            _commit_without_waiting(connection)
        if not upsert:
            return _insert_then_revive(rows)
        for chunk in chunks:
            _upsert(chunk, using)
            statements += 1
    return statements


def _rows_per_statement(connection: Any, columns: int) -> int:
    limit = 999
    if connection.vendor == "postgresql":
        limit = 65535
    elif connection.vendor == "sqlite":
        connection.ensure_connection()
        try:
            limit = connection.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        except (AttributeError, sqlite3.Error):
            limit = connection.features.max_query_params or 999
    return max(1, min(UPSERT_ROWS, limit // columns))


def _insert_then_revive(rows: list[Notice]) -> int:
    FlyJob.objects.bulk_create(
        [
            FlyJob(
                job_id=row.job_id,
                queue=row.queue,
                func_name=row.func_name,
                description=row.description,
                status=row.status,
                enqueued_at=row.enqueued_at,
                scheduled_for=row.scheduled_for,
            )
            for row in rows
        ],
        ignore_conflicts=True,
    )
    for row in rows:
        # A row that ended after this push was taken and finished by a fast worker already.
        FlyJob.objects.filter(
            Q(ended_at__isnull=True) | Q(ended_at__lt=row.enqueued_at),
            job_id=row.job_id,
            status__in=[s for s in REVIVABLE if s != row.status],
        ).update(
            status=row.status,
            queue=row.queue,
            scheduled_for=row.scheduled_for,
            enqueued_at=row.enqueued_at,
            ended_at=None,
        )
    return 1 + len(rows)


_UPSERT_COLUMNS = (
    "job_id",
    "queue",
    "func_name",
    "description",
    "status",
    "enqueued_at",
    "scheduled_for",
    "created_at",
    "updated_at",
)


_REVIVED_COLUMNS = ("status", "queue", "scheduled_for", "enqueued_at", "updated_at")


def _upsert(rows: list[Notice], using: str) -> None:
    connection = connections[using]
    adapt = _datetimes(connection)
    now = adapt(timezone.now())
    params: list[Any] = []
    for row in rows:
        params += [
            row.job_id,
            row.queue,
            row.func_name,
            row.description,
            row.status,
            adapt(row.enqueued_at),
            adapt(row.scheduled_for),
            now,
            now,
        ]
    quote = connection.ops.quote_name
    table = quote(FlyJob._meta.db_table)
    columns = ", ".join(quote(name) for name in _UPSERT_COLUMNS)
    # attempts, error and worker_name are NOT NULL with defaults Django keeps in Python only.
    one = "(" + ", ".join(["%s"] * len(_UPSERT_COLUMNS)) + ", 0, '', '')"
    updates = ", ".join(f"{quote(c)} = excluded.{quote(c)}" for c in _REVIVED_COLUMNS)
    status = f"{table}.{quote('status')}"
    sql = (
        f"INSERT INTO {table} ({columns}, {quote('attempts')}, {quote('error')}, "
        f"{quote('worker_name')}) VALUES {', '.join([one] * len(rows))} "
        f"ON CONFLICT ({quote('job_id')}) DO UPDATE SET {updates}, {quote('ended_at')} = NULL "
        # Revive only a waiting or finished row, never a started one, and never into the
        # status it has already.
        f"WHERE {status} IN ({', '.join(['%s'] * len(REVIVABLE))}) "
        f"AND {status} <> excluded.{quote('status')} "
        # A row that ended after this push was taken and finished by a fast worker already:
        # this late notification must not send it back to queued.
        f"AND ({table}.{quote('ended_at')} IS NULL "
        f"OR {table}.{quote('ended_at')} < excluded.{quote('enqueued_at')})"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, *(s.value for s in REVIVABLE)])


def record_enqueue_failed(queue: str, jobs: Iterable[tuple[str, str]], reason: str) -> None:
    """Pushes of ``(job id, function)`` to ``queue`` failed after their transaction committed.

    The row says so (status failed, the reason as its error) unless a worker got further.
    """
    now = timezone.now()
    for job_id, func_name in jobs:
        row, created = FlyJob.objects.get_or_create(
            job_id=job_id,
            defaults={
                "queue": queue,
                "func_name": func_name[:300],
                "status": FlyJob.Status.FAILED,
                "enqueued_at": now,
                "ended_at": now,
                "error": truncate_error(reason),
            },
        )
        if not created:
            FlyJob.objects.filter(pk=row.pk, status__in=WAITING).update(
                status=FlyJob.Status.FAILED, ended_at=now, error=truncate_error(reason)
            )
