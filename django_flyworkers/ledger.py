"""The one module that writes ``FlyJob``, ``WorkerMachine`` and ``ScaleEvent`` rows.

Writers run in several processes at once (web requests, worker parents, work horses, the
reaper), so every write is a single conditional statement that cannot move a row backwards:

* the enqueue side inserts with ``ignore_conflicts`` and only revives rows that are waiting or
  finished, never one a worker has started;
* a worker numbers each attempt when it starts a job and closes only that attempt, so a slow
  worker never overwrites a newer attempt on another Machine.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from datetime import datetime
from typing import Any

from django.db import IntegrityError, connections, router, transaction
from django.db.models import F, Q
from django.utils import timezone
from rq.job import Job

from django_flyworkers.models import FlyJob, ScaleEvent, WorkerMachine

ERROR_MAX_CHARS = 4000
"""Errors are truncated from the front: the end of a traceback says what went wrong."""

Status = FlyJob.Status
FINAL = (Status.FINISHED, Status.FAILED, Status.STOPPED, Status.CANCELED)

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


def _new_row(job: Job, queue: str, status: str, scheduled_for: datetime | None) -> FlyJob:
    return FlyJob(
        job_id=job.id,
        queue=queue,
        func_name=_func_name(job),
        description=str(job.description or "")[:300],
        status=status,
        enqueued_at=job.enqueued_at or job.created_at or timezone.now(),
        scheduled_for=scheduled_for,
    )


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
    # One row per job, the latest push winning: PostgreSQL rejects an upsert that touches a
    # row twice ("cannot affect row a second time"), and a batch may hold a job pushed twice.
    rows = list({job.id: _new_row(job, queue, status, scheduled_for) for job in jobs}.values())
    if not rows:
        return
    revive = [s.value for s in REVIVABLE if s != status]
    using = router.db_for_write(FlyJob)
    connection = connections[using]
    # Inside the caller's transaction (COMMIT_MODE "auto", an explicit pipeline) a failed
    # write must not poison it: a savepoint confines it.
    guard = transaction.atomic(using) if connection.in_atomic_block else nullcontext()
    with guard:
        for start in range(0, len(rows), UPSERT_BATCH):
            batch = rows[start : start + UPSERT_BATCH]
            if connection.vendor in ("sqlite", "postgresql"):
                # One statement on the enqueue path: an upsert whose update is conditional.
                _upsert(batch, revive, using)
            else:
                _insert_then_revive(batch, revive, status, queue, scheduled_for)


def _insert_then_revive(
    rows: list[FlyJob], revive: list[str], status: str, queue: str, scheduled_for: datetime | None
) -> None:
    FlyJob.objects.bulk_create(rows, ignore_conflicts=True)
    for row in rows:
        # A row that ended after this push was taken and finished by a fast worker already.
        FlyJob.objects.filter(
            Q(ended_at__isnull=True) | Q(ended_at__lt=row.enqueued_at),
            job_id=row.job_id,
            status__in=revive,
        ).update(
            status=status,
            queue=queue,
            scheduled_for=scheduled_for,
            enqueued_at=row.enqueued_at,
            ended_at=None,
        )


UPSERT_BATCH = 500
"""Rows per statement: 12 parameters a row stays far below SQLite's and Postgres' limits."""

_UPSERT_COLUMNS = (
    "job_id",
    "queue",
    "func_name",
    "description",
    "status",
    "enqueued_at",
    "scheduled_for",
    "attempts",
    "error",
    "worker_name",
    "created_at",
    "updated_at",
)
_REVIVED_COLUMNS = ("status", "queue", "scheduled_for", "enqueued_at", "updated_at")


def _upsert(rows: list[FlyJob], revive: list[str], using: str) -> None:
    connection = connections[using]
    now = timezone.now()
    fields = [FlyJob._meta.get_field(name) for name in _UPSERT_COLUMNS]
    params: list[Any] = []
    for row in rows:
        row.created_at = row.updated_at = now
        params += [
            field.get_db_prep_save(getattr(row, field.attname), connection)  # type: ignore[union-attr]
            for field in fields
        ]
    quote = connection.ops.quote_name
    table = quote(FlyJob._meta.db_table)
    columns = ", ".join(quote(name) for name in _UPSERT_COLUMNS)
    one = "(" + ", ".join(["%s"] * len(_UPSERT_COLUMNS)) + ")"
    updates = ", ".join(f"{quote(c)} = excluded.{quote(c)}" for c in _REVIVED_COLUMNS)
    sql = (
        f"INSERT INTO {table} ({columns}) VALUES {', '.join([one] * len(rows))} "
        f"ON CONFLICT ({quote('job_id')}) DO UPDATE SET {updates}, {quote('ended_at')} = NULL "
        f"WHERE {table}.{quote('status')} IN ({', '.join(['%s'] * len(revive))}) "
        # A row that ended after this push was taken and finished by a fast worker already:
        # this late notification must not send it back to queued.
        f"AND ({table}.{quote('ended_at')} IS NULL "
        f"OR {table}.{quote('ended_at')} < excluded.{quote('enqueued_at')})"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, *revive])


def record_started(job: Job, queue: str, machine_id: str | None, worker_name: str) -> int:
    """A worker took ``job``; returns the attempt number it must pass to :func:`record_ended`."""
    machine = WorkerMachine.objects.filter(machine_id=machine_id).first() if machine_id else None
    changes: dict[str, Any] = {
        "status": FlyJob.Status.STARTED,
        "started_at": timezone.now(),
        "ended_at": None,
        "machine": machine,
        "worker_name": worker_name[:100],
        "attempts": F("attempts") + 1,
        "error": "",
    }
    if not FlyJob.objects.filter(job_id=job.id).update(**changes):
        # Enqueued through a path that sent no signal (rq's plain Queue): create the row now.
        try:
            with transaction.atomic():
                _new_row(job, queue, FlyJob.Status.QUEUED, None).save()
        except IntegrityError:
            pass
        FlyJob.objects.filter(job_id=job.id).update(**changes)
    return int(FlyJob.objects.filter(job_id=job.id).values_list("attempts", flat=True).get())


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


def record_machine_boot(
    machine_id: str,
    *,
    queue: str,
    region: str = "",
    image: str = "",
    instance_id: str = "",
    memory_mb: int | None = None,
) -> None:
    """A worker started on ``machine_id`` (one boot)."""
    defaults = {"queue": queue, "region": region, "image": image, "instance_id": instance_id}
    defaults = {key: value for key, value in defaults.items() if value}
    machine, _ = WorkerMachine.objects.get_or_create(machine_id=machine_id, defaults=defaults)
    if memory_mb and not machine.guest:
        defaults["guest"] = {"memory_mb": memory_mb}  # type: ignore[assignment]
    WorkerMachine.objects.filter(pk=machine.pk).update(
        state="started", last_started_at=timezone.now(), boots=F("boots") + 1, **defaults
    )


def record_machine_exit(machine_id: str, run_seconds: float) -> None:
    """The worker on ``machine_id`` is leaving after ``run_seconds``; the Machine will stop."""
    WorkerMachine.objects.filter(machine_id=machine_id).update(
        state="stopping",
        last_stopped_at=timezone.now(),
        run_seconds=F("run_seconds") + max(0.0, run_seconds),
    )


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


def record_reaped(job_id: str, attempt: int | None, status: str, reason: str) -> bool:
    """The reaper recovered ``attempt`` of a job whose Machine died: ``queued`` or ``failed``.

    Only that attempt: if the requeued job already started again elsewhere, that newer
    attempt's row stands.
    """
    final = status == FlyJob.Status.FAILED
    rows = FlyJob.objects.filter(job_id=job_id, status=FlyJob.Status.STARTED)
    if attempt is not None:
        rows = rows.filter(attempts=attempt)
    return bool(
        rows.update(
            status=status,
            ended_at=timezone.now() if final else None,
            error=truncate_error(reason),
        )
    )


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


def record_job_machine(job_id: str, machine_id: str) -> bool:
    """A dedicated Machine was created for ``job_id``: link the job's row to it now, before
    it starts (``record_started`` links it again when it does). Only a waiting row."""
    machine = WorkerMachine.objects.filter(machine_id=machine_id).first()
    if machine is None:
        return False
    waiting = (FlyJob.Status.QUEUED, FlyJob.Status.SCHEDULED, FlyJob.Status.DEFERRED)
    return bool(FlyJob.objects.filter(job_id=job_id, status__in=waiting).update(machine=machine))
