"""The one module that writes ``FlyJob``, ``WorkerMachine`` and ``ScaleEvent`` rows.

Writers run in several processes at once (web requests, worker parents, work horses, the
reaper), so every write is a single conditional statement that cannot move a row backwards:

* the enqueue side inserts, and only revives rows that are waiting or finished, never one a
  worker has started (:func:`write_notices`, one multi-row upsert per batch);
* a worker numbers each attempt when it starts a job and closes only that attempt, so a slow
  worker never overwrites a newer attempt on another Machine (:func:`record_runs`);
* the reaper settles rows a dead process left behind from rq's own state
  (:func:`settle_from_rq`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

from django.conf import settings as django_settings
from django.db import IntegrityError, connections, router, transaction
from django.db.models import F, Q
from django.utils import timezone
from rq.job import Job, JobStatus

from django_flyworkers.models import FlyJob, JobAttempt, MachineRun, ScaleEvent, WorkerMachine

if TYPE_CHECKING:
    from redis import Redis

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

UPSERT_ROWS = 2000
"""Most rows per enqueue upsert: 10,000 jobs are five statements. Fewer when the database
allows fewer parameters per statement."""

UPSERT_BATCH = UPSERT_ROWS  # the name earlier versions used


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


# -- the enqueue side ---------------------------------------------------------------------------


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
    # must not poison it: a savepoint confines it. Outside, the batch is its own transaction.
    own = not connection.in_atomic_block
    statements = 0
    with transaction.atomic(using):
        if own:
            _commit_without_waiting(connection)
        if connection.vendor in ("sqlite", "postgresql"):
            size = _rows_per_statement(connection, len(_UPSERT_COLUMNS))
            for start in range(0, len(rows), size):
                _upsert(rows[start : start + size], using)
                statements += 1
        else:
            statements += _insert_then_revive(rows)
    return statements


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


# -- the worker side ----------------------------------------------------------------------------


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


# -- rq's truth ---------------------------------------------------------------------------------

RQ_STATUS = {
    JobStatus.FINISHED: FlyJob.Status.FINISHED,
    JobStatus.FAILED: FlyJob.Status.FAILED,
    JobStatus.STOPPED: FlyJob.Status.STOPPED,
    JobStatus.CANCELED: FlyJob.Status.CANCELED,
    JobStatus.QUEUED: FlyJob.Status.QUEUED,
    JobStatus.SCHEDULED: FlyJob.Status.SCHEDULED,
    JobStatus.DEFERRED: FlyJob.Status.DEFERRED,
    JobStatus.STARTED: FlyJob.Status.STARTED,
}


def failure_reason(job: Job) -> str:
    """The error of ``job``'s latest failed execution, if rq kept one."""
    try:
        result = job.latest_result()
    except Exception:
        return ""
    if result is None or result.type != result.Type.FAILED:
        return ""
    return str(result.exc_string or "")


@dataclass
class Settled:
    """One row :func:`settle_from_rq` set (or, in a dry run, would set) to rq's state."""

    job_id: str
    before: str
    after: str
    attempt: int = 0
    error: str = ""
    ended_at: datetime | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return f"job {self.job_id}: {self.before} -> {self.after} (as rq says)"


SETTLE_LIMIT = 20_000
"""Most rows one :func:`settle_from_rq` pass looks at, oldest first."""


def settle_from_rq(
    queue: str, conn: Redis, *, rq_queue: Any = None, dry_run: bool = False
) -> list[Settled]:
    """Set rows of ``queue`` that disagree with rq to rq's state; returns what changed.

    A worker killed between a job's end and its ledger write leaves the row ``started`` (or
    ``queued``, if its start was not written either) while rq knows how the job ended. Rows
    not in a final state are compared with rq's job hashes, one pipelined read:

    * rq says finished, failed (with its reason), stopped or canceled: the row says so too;
    * rq says queued, scheduled or deferred and the job is in that list or registry while the
      row says ``started``: it was requeued (a retry): the row is waiting again;
    * rq says started, or queued but in no list (a dead Machine dequeued it and never began):
      left to the reaper's recovery, which knows whether the Machine is alive;
    * the job is gone from Redis while the row says ``started``: it finished and rq deleted it
      (``result_ttl=0``), as a worker records it too.

    Every write is conditional on the row (status and attempt) not having moved meanwhile, so
    a live worker writing at the same time wins.
    """
    from rq.queue import Queue

    rq_queue = rq_queue if rq_queue is not None else Queue(queue, connection=conn)
    rows = list(
        FlyJob.objects.filter(queue=queue, status__in=[*WAITING, FlyJob.Status.STARTED])
        .order_by("updated_at")
        .values_list("job_id", "status", "attempts")[:SETTLE_LIMIT]
    )
    if not rows:
        return []
    jobs = Job.fetch_many([job_id for job_id, _, _ in rows], connection=conn)
    out: list[Settled] = []
    for (job_id, before, attempt), job in zip(rows, jobs, strict=True):
        if job is None:
            if before == FlyJob.Status.STARTED:
                out.append(Settled(job_id, before, FlyJob.Status.FINISHED, attempt))
            continue
        after = RQ_STATUS.get(job.get_status(refresh=False))
        if after is None or after == before or after == FlyJob.Status.STARTED:
            continue
        if after in FINAL:
            error = failure_reason(job) if after == FlyJob.Status.FAILED else ""
            out.append(Settled(job_id, before, after, attempt, error, job.ended_at))
        elif before == FlyJob.Status.STARTED and _is_waiting(conn, rq_queue, job_id, after):
            # A retry: the reason it was retried is the failure rq recorded last.
            out.append(Settled(job_id, before, after, attempt, failure_reason(job)))
    if not dry_run:
        out = [item for item in out if _settle(item)]
    return out


def settle_queue(queue: str, *, dry_run: bool = False) -> list[Settled]:
    """:func:`settle_from_rq` for the configured queue ``queue`` (the reaper's entry point)."""
    from django_flyworkers.queue import get_queue

    rq_queue = get_queue(queue)
    return settle_from_rq(queue, rq_queue.connection, rq_queue=rq_queue, dry_run=dry_run)


def _is_waiting(conn: Redis, rq_queue: Any, job_id: str, status: str) -> bool:
    """Is ``job_id`` in the list or registry rq keeps its ``status`` in?"""
    if status == FlyJob.Status.QUEUED:
        return conn.lpos(rq_queue.key, job_id) is not None
    if status == FlyJob.Status.SCHEDULED:
        return conn.zscore(rq_queue.scheduled_job_registry.key, job_id) is not None
    return conn.zscore(rq_queue.deferred_job_registry.key, job_id) is not None


def _settle(item: Settled) -> bool:
    rows = FlyJob.objects.filter(job_id=item.job_id, status=item.before, attempts=item.attempt)
    final = item.after in FINAL
    changes: dict[str, Any] = {"status": item.after}
    if final:
        changes["ended_at"] = item.ended_at or timezone.now()
    if item.after in RAN:  # it ran, even if the worker never wrote its start
        changes["attempts"] = max(item.attempt, 1)
    if item.error:
        changes["error"] = truncate_error(item.error)
    return bool(rows.update(**changes))


# -- Machines -----------------------------------------------------------------------------------


def record_machine_boot(
    machine_id: str,
    *,
    queue: str,
    region: str = "",
    image: str = "",
    instance_id: str = "",
    memory_mb: int | None = None,
) -> int:
    """A worker started on ``machine_id`` (one boot); returns the row's key."""
    defaults = {"queue": queue, "region": region, "image": image, "instance_id": instance_id}
    defaults = {key: value for key, value in defaults.items() if value}
    machine, _ = WorkerMachine.objects.get_or_create(machine_id=machine_id, defaults=defaults)
    if memory_mb and not machine.guest:
        defaults["guest"] = {"memory_mb": memory_mb}  # type: ignore[assignment]
    WorkerMachine.objects.filter(pk=machine.pk).update(
        state="started", last_started_at=timezone.now(), boots=F("boots") + 1, **defaults
    )
    return int(machine.pk)


def record_machine_exit(machine_id: str, run_seconds: float, exit_code: int | None = 0) -> None:
    """The worker on ``machine_id`` is leaving after ``run_seconds``.

    With ``exit_code`` 0 it exits normally and its Machine (restart policy ``no``) stops with
    it: the row says ``stopped`` now rather than at the next sync. ``None``: it is leaving
    on an error; the row says ``stopping`` until the API says how it ended.
    """
    changes: dict[str, Any] = {
        "state": "stopped" if exit_code == 0 else "stopping",
        "last_stopped_at": timezone.now(),
        "run_seconds": F("run_seconds") + max(0.0, run_seconds),
    }
    if exit_code is not None:
        changes["last_exit_code"] = exit_code
    WorkerMachine.objects.filter(machine_id=machine_id).update(**changes)


def record_machine_seen(
    machine_id: str,
    *,
    queue: str,
    state: str,
    name: str = "",
    region: str = "",
    image: str = "",
    instance_id: str = "",
    guest: Mapping[str, Any] | None = None,
    last_exit_code: int | None = None,
) -> str | None:
    """Mirror what the Machines API says about one of our Machines.

    Returns what changed: ``"adopted"`` for a Machine we had no row for, ``"<old> -> <new>"``
    for a new state, None otherwise.
    """
    values: dict[str, Any] = {"queue": queue, "state": state}
    optional = {
        "name": name,
        "region": region,
        "image": image,
        "instance_id": instance_id,
        "guest": dict(guest) if guest else None,
        "last_exit_code": last_exit_code,
    }
    values.update({key: value for key, value in optional.items() if value not in (None, "")})
    before = WorkerMachine.objects.filter(machine_id=machine_id).values_list("state", flat=True)
    previous = before.first()
    if previous is None:
        try:
            with transaction.atomic():
                WorkerMachine.objects.create(machine_id=machine_id, **values)
            return "adopted"
        except IntegrityError:  # created concurrently (a worker booting): update instead
            pass
    WorkerMachine.objects.filter(machine_id=machine_id).update(**values)
    return f"{previous} -> {state}" if previous is not None and previous != state else None


def record_machines_gone(machine_ids: Iterable[str]) -> list[str]:
    """Machines the API no longer lists: mark their rows destroyed; returns those changed."""
    rows = WorkerMachine.objects.filter(machine_id__in=list(machine_ids)).exclude(state="destroyed")
    changed = list(rows.values_list("machine_id", flat=True))
    rows.update(state="destroyed")
    return changed


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


def prunable(before: datetime, queues: Iterable[str]) -> tuple[Any, Any]:
    """The FlyJob and ScaleEvent querysets :func:`prune` would delete (for ``--dry-run``)."""
    queues = list(queues)
    jobs = FlyJob.objects.filter(status__in=FINAL, updated_at__lt=before, queue__in=queues)
    events = ScaleEvent.objects.filter(created_at__lt=before, queue__in=queues)
    return jobs, events


def prune(before: datetime, queues: Iterable[str]) -> tuple[int, int]:
    """Delete history of ``queues`` older than ``before``: (jobs, scale events) deleted.

    Only jobs in a final state go; a job still waiting or running keeps its row however old.
    """
    jobs, events = prunable(before, queues)
    return jobs.delete()[0], events.delete()[0]


def record_scale_event(
    queue: str,
    action: str,
    *,
    machine_id: str = "",
    reason: str = "",
    outcome: str = ScaleEvent.Outcome.OK,
    detail: str = "",
    duration_ms: int = 0,
) -> ScaleEvent:
    """Remember one Machines API action and how it went (see :func:`record_event`)."""
    return record_event(
        queue,
        action,
        machine_id,
        reason=reason,
        outcome=outcome,
        detail=detail,
        duration_ms=duration_ms,
    )


def record_event(
    queue: str,
    action: str,
    machine_id: str = "",
    *,
    reason: str = "",
    outcome: str = ScaleEvent.Outcome.OK,
    detail: str = "",
    duration_ms: int = 0,
    user: str = "",
) -> ScaleEvent:
    """Remember one Machines API action (or a wake that was capped): who, why, how it went.

    ``user`` names the operator for actions taken from the admin; blank for automatic ones.
    """
    return ScaleEvent.objects.create(
        queue=queue,
        action=action,
        machine_id=machine_id,
        reason=reason[:300],
        outcome=outcome,
        detail=truncate_error(detail),
        duration_ms=max(0, int(duration_ms)),
        user=user[:150],
    )


# -- Machine runs, job attempts and operator actions (read by the dashboard) -----------------

RUN_END_STATES = {
    "stopped": "stopped",
    "suspended": "suspended",
    "failed": "failed",
    "destroying": "destroyed",
    "destroyed": "destroyed",
}
"""API states that end a run, and the run state each one leaves behind."""


def _run_guest(machine_guest: Mapping[str, Any] | None, queue: str) -> dict[str, Any]:
    """cpu_kind/cpus/memory_mb of a run: the Machine's recorded guest over its queue's GUEST."""
    from django_flyworkers.conf import get_settings

    profile = get_settings().profile(queue.split(",")[0])
    merged = {**dict(profile.guest if profile else {}), **dict(machine_guest or {})}
    return {
        "cpu_kind": str(merged.get("cpu_kind") or "shared"),
        "cpus": int(merged.get("cpus") or 1),
        "memory_mb": int(merged.get("memory_mb") or 256),
    }


def _close_run(run: MachineRun, at: datetime, state: str, exit_code: int | None = None) -> None:
    ended = max(at, run.started_at)
    changes: dict[str, Any] = {
        "stopped_at": ended,
        "state": state,
        "billed_seconds": (ended - run.started_at).total_seconds(),
    }
    if exit_code is not None:
        changes["exit_code"] = exit_code
    # Conditional on still being open: a concurrent closer (worker exit, reaper) wins once.
    MachineRun.objects.filter(pk=run.pk, stopped_at__isnull=True).update(**changes)


def record_run_started(
    machine_id: str,
    *,
    queue: str,
    guest: Mapping[str, Any] | None = None,
    at: datetime | None = None,
) -> None:
    """The scaler started (or created to boot) ``machine_id``: a billed run begins.

    A run still open is closed first: the Machine must have stopped without anyone seeing it.
    """
    at = at or timezone.now()
    row = WorkerMachine.objects.filter(machine_id=machine_id).values_list("pk", "guest").first()
    if row is None:
        return
    pk, machine_guest = row
    for run in MachineRun.objects.filter(machine_id=pk, stopped_at__isnull=True):
        _close_run(run, at, MachineRun.State.STOPPED)
    MachineRun.objects.create(
        machine_id=pk, queue=queue, started_at=at, **_run_guest(guest or machine_guest, queue)
    )


def record_run_booted(machine_id: str, *, queue: str) -> None:
    """The worker on ``machine_id`` announced itself: mark its run booted.

    A Machine started by something else than the scaler (``fly machine start``, Fly's
    autostart) has no open run yet; one is opened now, without its boot seconds.
    """
    now = timezone.now()
    row = WorkerMachine.objects.filter(machine_id=machine_id).values_list("pk", "guest").first()
    if row is None:
        return
    pk, machine_guest = row
    run = MachineRun.objects.filter(machine_id=pk, stopped_at__isnull=True).first()
    if run is not None and run.booted_at is None:
        MachineRun.objects.filter(pk=run.pk).update(booted_at=now)
        return
    if run is not None:  # booted before: a second boot means the first run ended unseen
        _close_run(run, now, MachineRun.State.STOPPED)
    MachineRun.objects.create(
        machine_id=pk,
        queue=queue,
        started_at=now,
        booted_at=now,
        **_run_guest(machine_guest, queue),
    )


def record_run_ended(
    machine_id: str,
    *,
    at: datetime | None = None,
    state: str = MachineRun.State.STOPPED,
    exit_code: int | None = None,
) -> bool:
    """``machine_id``'s run ended (its worker left, or the API shows it stopped). False if no
    run was open."""
    at = at or timezone.now()
    runs = list(MachineRun.objects.filter(machine__machine_id=machine_id, stopped_at__isnull=True))
    for run in runs:
        _close_run(run, at, state, exit_code)
    return bool(runs)


EXIT_SLACK = timedelta(seconds=60)
"""An exit event belongs to a run that its worker saw end up to this long before it."""


def record_runs_seen(
    seen: Iterable[tuple[str, str, Iterable[tuple[datetime, int | None]]]],
) -> int:
    """Match what the API shows of Machines against their runs; returns runs closed.

    ``seen`` holds ``(machine_id, api_state, exits)``, ``exits`` being the Machine's exit
    events as ``(time, exit code)``. A run still open on a Machine the API shows stopped (or
    suspended, failed, gone) ends at the first exit after its start, or now if there is none.
    A run without an exit code takes the code of the first exit after its start.
    """
    machines = {mid: (state, sorted(exits, key=lambda e: e[0])) for mid, state, exits in seen}
    if not machines:
        return 0
    now = timezone.now()
    firsts = [exits[0][0] for _, exits in machines.values() if exits]
    lacking = Q(exit_code__isnull=True, started_at__gte=min(firsts) - EXIT_SLACK) if firsts else Q()
    runs = (
        MachineRun.objects.filter(machine__machine_id__in=list(machines))
        .filter(Q(stopped_at__isnull=True) | lacking if firsts else Q(stopped_at__isnull=True))
        .select_related("machine")
        .order_by("started_at")
    )
    closed = 0
    for run in runs:
        state, exits = machines[run.machine.machine_id]
        latest = (run.stopped_at or now) + EXIT_SLACK
        exit_event = next((e for e in exits if run.started_at <= e[0] <= latest), None)
        code = exit_event[1] if exit_event else None
        if run.stopped_at is None:
            if state in RUN_END_STATES:
                _close_run(run, exit_event[0] if exit_event else now, RUN_END_STATES[state], code)
                closed += 1
        elif code is not None:
            MachineRun.objects.filter(pk=run.pk, exit_code__isnull=True).update(exit_code=code)
    return closed


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and timezone.is_naive(value):
        return value.replace(tzinfo=UTC)  # rq 2 keeps naive UTC times
    return value


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


def record_user_event(
    queue: str,
    action: str,
    *,
    user: str,
    machine_id: str = "",
    reason: str = "",
    outcome: str = ScaleEvent.Outcome.OK,
    detail: str = "",
    duration_ms: int = 0,
) -> ScaleEvent:
    """Remember an action an operator took from the dashboard, with their name."""
    return ScaleEvent.objects.create(
        queue=queue,
        action=action[:32],
        machine_id=machine_id[:32],
        reason=reason[:300],
        outcome=outcome,
        detail=truncate_error(detail),
        duration_ms=max(0, int(duration_ms)),
        user=user[:150],
    )


def prune_runs(before: datetime, queues: Iterable[str], *, dry_run: bool = False) -> int:
    """Delete Machine runs that ended, and job attempts, older than ``before``."""
    queues = list(queues)
    runs = MachineRun.objects.filter(stopped_at__lt=before, queue__in=queues)
    attempts = JobAttempt.objects.filter(ended_at__lt=before, queue__in=queues)
    if dry_run:
        return runs.count() + attempts.count()
    return runs.delete()[0] + attempts.delete()[0]


def record_machine_suspended(machine_id: str, run_seconds: float) -> None:
    """The worker on ``machine_id`` suspends its Machine after ``run_seconds`` awake."""
    WorkerMachine.objects.filter(machine_id=machine_id).update(
        state="suspended",
        last_stopped_at=timezone.now(),
        run_seconds=F("run_seconds") + max(0.0, run_seconds),
    )


def record_machine_resumed(machine_id: str) -> None:
    """The worker on ``machine_id`` was resumed where it was suspended (not a new boot)."""
    WorkerMachine.objects.filter(machine_id=machine_id).update(
        state="started", last_started_at=timezone.now()
    )


def record_job_machine(job_id: str, machine_id: str) -> bool:
    """A dedicated Machine was created for ``job_id``: link the job's row to it now, before
    it starts (``record_started`` links it again when it does). Only a waiting row."""
    machine = WorkerMachine.objects.filter(machine_id=machine_id).first()
    if machine is None:
        return False
    waiting = (FlyJob.Status.QUEUED, FlyJob.Status.SCHEDULED, FlyJob.Status.DEFERRED)
    return bool(FlyJob.objects.filter(job_id=job_id, status__in=waiting).update(machine=machine))
