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
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import IntegrityError, connections, router, transaction
from django.db.models import F, Q
from django.utils import timezone
from rq.job import Job

from django_flyworkers.models import FlyJob, JobAttempt, MachineRun, ScaleEvent, WorkerMachine

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
