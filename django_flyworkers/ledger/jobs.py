"""The worker side: attempts of a job, started and closed, and what the reaper recovers.

A worker numbers each attempt when it starts a job and closes only that attempt, so a slow
worker never overwrites a newer attempt on another Machine (:func:`record_runs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import IntegrityError, connections, router, transaction
from django.db.models import F
from django.utils import timezone
from rq.job import Job

from django_flyworkers.ledger.common import (
    FINAL,
    WAITING,
    _aware,
    _commit_without_waiting,
    _datetimes,
    _func_name,
    truncate_error,
)
from django_flyworkers.models import FlyJob, JobAttempt, WorkerMachine


@dataclass
class JobRun:
    """One attempt of a job on one worker, from start to end, as the worker saw it."""

    job_id: str
    queue: str
    func_name: str
    description: str
    enqueued_at: datetime | None
    started_at: datetime
    worker_name: str
    machine_pk: int | None = None
    attempt: int | None = None
    """Set once the start is written: the attempt number this run closes."""
    status: str | None = None
    """Set when the job ended: finished, failed, stopped, queued (retried), scheduled ..."""
    error: str = ""
    ended_at: datetime | None = None

    @classmethod
    def of(cls, job: Job, queue: str, worker_name: str, machine_pk: int | None) -> JobRun:
        now = timezone.now()
        return cls(
            job_id=job.id,
            queue=queue,
            func_name=_func_name(job),
            description=str(job.description or "")[:300],
            enqueued_at=job.enqueued_at or job.created_at or now,
            started_at=now,
            worker_name=worker_name[:100],
            machine_pk=machine_pk,
        )

    def end(self, status: str, error: str | None = None, ended_at: datetime | None = None) -> None:
        self.status = status
        self.error = truncate_error(error)
        self.ended_at = (ended_at or timezone.now()) if status in FINAL else None


def record_runs(runs: Sequence[JobRun], using: str | None = None) -> None:
    """Write what ``runs`` did since their last write, in one transaction.

    A run not written yet is started (its attempt numbered; if it has ended too, its row gets
    the end in the same statement); a started run that ended is closed, only its own attempt.
    Runs are written in order, so a job retried and taken again by the same worker ends its
    old attempt before the new one starts.
    """
    todo = [run for run in runs if run.attempt is None or run.status is not None]
    if not todo:
        return
    using = using or router.db_for_write(FlyJob)
    connection = connections[using]
    own = not connection.in_atomic_block
    # One statement needs no transaction of its own, except to commit without waiting.
    needed = len(todo) > 1 or (own and connection.vendor == "postgresql")
    with transaction.atomic(using) if needed else nullcontext():
        if own and needed:
            _commit_without_waiting(connection)
        for run in todo:
            if run.attempt is None:
                run.attempt = _start(run, using)
            elif run.status is not None:
                _close(run, using)


def _start(run: JobRun, using: str) -> int:
    connection = connections[using]
    status = run.status or FlyJob.Status.STARTED
    if connection.vendor in ("sqlite", "postgresql") and (
        connection.features.can_return_columns_from_insert
    ):
        return _start_returning(run, status, using)
    changes: dict[str, Any] = {
        "status": status,
        "started_at": run.started_at,
        "ended_at": run.ended_at,
        "machine_id": run.machine_pk,
        "worker_name": run.worker_name,
        "attempts": F("attempts") + 1,
        "error": run.error,
    }
    rows = FlyJob.objects.using(using)
    if not rows.filter(job_id=run.job_id).update(**changes):
        # Enqueued through a path that sent no signal, or the producer's row is not written
        # yet: create the row now.
        try:
            with transaction.atomic(using):
                rows.create(
                    job_id=run.job_id,
                    queue=run.queue,
                    func_name=run.func_name,
                    description=run.description,
                    enqueued_at=run.enqueued_at,
                )
        except IntegrityError:
            pass
        rows.filter(job_id=run.job_id).update(**changes)
    return int(rows.filter(job_id=run.job_id).values_list("attempts", flat=True).get())


_START_COLUMNS = (
    "job_id",
    "queue",
    "func_name",
    "description",
    "status",
    "enqueued_at",
    "started_at",
    "ended_at",
    "machine_id",
    "worker_name",
    "error",
    "created_at",
    "updated_at",
)


_STARTED_COLUMNS = (
    "status",
    "started_at",
    "ended_at",
    "machine_id",
    "worker_name",
    "error",
    "updated_at",
)


def _start_returning(run: JobRun, status: str, using: str) -> int:
    """One statement: create or update the row for a new attempt, and read its number."""
    connection = connections[using]
    adapt = _datetimes(connection)
    now = adapt(timezone.now())
    params = [
        run.job_id,
        run.queue,
        run.func_name,
        run.description,
        status,
        adapt(run.enqueued_at),
        adapt(run.started_at),
        adapt(run.ended_at),
        run.machine_pk,
        run.worker_name,
        run.error,
        now,
        now,
    ]
    quote = connection.ops.quote_name
    table = quote(FlyJob._meta.db_table)
    columns = ", ".join(quote(name) for name in _START_COLUMNS)
    updates = ", ".join(f"{quote(c)} = excluded.{quote(c)}" for c in _STARTED_COLUMNS)
    attempts = quote("attempts")
    sql = (
        f"INSERT INTO {table} ({columns}, {attempts}) "
        f"VALUES ({', '.join(['%s'] * len(_START_COLUMNS))}, 1) "
        f"ON CONFLICT ({quote('job_id')}) DO UPDATE SET {updates}, "
        f"{attempts} = {table}.{attempts} + 1 RETURNING {attempts}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return int(cursor.fetchone()[0])


def _close(run: JobRun, using: str) -> None:
    """Close the run's own attempt, if it is still the one started (raw SQL: a hot path)."""
    assert run.status is not None and run.attempt is not None
    connection = connections[using]
    quote = connection.ops.quote_name
    table = quote(FlyJob._meta.db_table)
    adapt = _datetimes(connection)
    sql = (
        f"UPDATE {table} SET {quote('status')} = %s, {quote('ended_at')} = %s, "
        f"{quote('error')} = %s, {quote('updated_at')} = %s "
        f"WHERE {quote('job_id')} = %s AND {quote('attempts')} = %s AND {quote('status')} = %s"
    )
    params = [
        run.status,
        adapt(run.ended_at),
        run.error,
        adapt(timezone.now()),
        run.job_id,
        run.attempt,
        FlyJob.Status.STARTED.value,
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def record_started(job: Job, queue: str, machine_id: str | None, worker_name: str) -> int:
    """A worker took ``job``; returns the attempt number it must pass to :func:`record_ended`."""
    machine_pk = (
        WorkerMachine.objects.filter(machine_id=machine_id).values_list("pk", flat=True).first()
        if machine_id
        else None
    )
    run = JobRun.of(job, queue, worker_name, machine_pk)
    record_runs([run])
    assert run.attempt is not None
    return run.attempt


def record_ended(
    job_id: str,
    attempt: int,
    status: str,
    *,
    error: str | None = None,
    ended_at: datetime | None = None,
) -> bool:
    """Close ``attempt`` of a job. False when a newer attempt (or the reaper) got there first."""
    final = status in FINAL
    return bool(
        FlyJob.objects.filter(job_id=job_id, attempts=attempt, status=FlyJob.Status.STARTED).update(
            status=status,
            ended_at=(ended_at or timezone.now()) if final else None,
            error=truncate_error(error),
        )
    )


def record_reaped(
    job_id: str,
    attempt: int | None,
    status: str,
    reason: str,
    *,
    ran_on: str | None = None,
) -> bool:
    """The reaper recovered ``attempt`` of a job whose Machine died: ``queued`` or ``failed``.

    Only that attempt: if the requeued job already started again elsewhere, that newer
    attempt's row stands. ``ran_on`` (the dead Machine's id) says the job did start there:
    when its worker died before writing that start (its books are batched), the row is still
    waiting, and the lost attempt is counted on it now.
    """
    final = status == FlyJob.Status.FAILED
    changes: dict[str, Any] = {
        "status": status,
        "ended_at": timezone.now() if final else None,
        "error": truncate_error(reason),
    }
    rows = FlyJob.objects.filter(job_id=job_id, status=FlyJob.Status.STARTED)
    if attempt is not None:
        rows = rows.filter(attempts=attempt)
    if rows.update(**changes):
        return True
    if attempt is not None or ran_on is None:
        return False
    machine = WorkerMachine.objects.filter(machine_id=ran_on).values_list("pk", flat=True).first()
    if machine is not None:
        changes["machine_id"] = machine
    waiting = FlyJob.objects.filter(job_id=job_id, status__in=WAITING)
    return bool(waiting.update(attempts=F("attempts") + 1, **changes))


def record_attempt(
    job_id: str,
    number: int | None,
    outcome: str,
    *,
    queue: str = "",
    machine_id: str = "",
    worker_name: str = "",
    started_at: datetime | None = None,
    ended_at: datetime | None = None,
    error: str | None = None,
) -> None:
    """Keep attempt ``number`` of a job that did not succeed (failed, retried, stopped, lost).

    Missing details come from the job's row, which still describes that attempt.
    """
    row = (
        FlyJob.objects.filter(job_id=job_id)
        .values("queue", "attempts", "started_at", "worker_name", "machine__machine_id")
        .first()
    )
    if row is not None:
        number = number or row["attempts"]
        queue = queue or row["queue"]
        started_at = started_at or row["started_at"]
        worker_name = worker_name or row["worker_name"]
        machine_id = machine_id or row["machine__machine_id"] or ""
    if not number:
        return
    values = {
        "queue": queue[:100],
        "outcome": outcome[:16],
        "machine_id": (machine_id or "")[:32],
        "worker_name": worker_name[:100],
        "started_at": _aware(started_at),
        "ended_at": _aware(ended_at) or timezone.now(),
    }
    if error:  # a later, less informed call keeps the traceback an earlier one stored
        values["error"] = truncate_error(error)
    JobAttempt.objects.update_or_create(job_id=job_id, number=number, defaults=values)


def delete_job(job_id: str) -> int:
    """Forget a job an operator deleted: its row and its attempts. Returns rows deleted."""
    attempts = JobAttempt.objects.filter(job_id=job_id).delete()[0]
    return FlyJob.objects.filter(job_id=job_id).delete()[0] + attempts


def record_job_machine(job_id: str, machine_id: str) -> bool:
    """A dedicated Machine was created for ``job_id``: link the job's row to it now, before
    it starts (``record_started`` links it again when it does). Only a waiting row."""
    machine = WorkerMachine.objects.filter(machine_id=machine_id).first()
    if machine is None:
        return False
    waiting = (FlyJob.Status.QUEUED, FlyJob.Status.SCHEDULED, FlyJob.Status.DEFERRED)
    return bool(FlyJob.objects.filter(job_id=job_id, status__in=waiting).update(machine=machine))
