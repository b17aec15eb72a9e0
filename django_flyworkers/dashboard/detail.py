"""What the job and Machine detail pages show, and what a job or a Machine cost.

A job's cost is its share of the Machine run it ran in: the run's billed seconds (boot and idle
included) times the guest's price, split between the jobs of that run in proportion to their
run time (equally when they all took no measurable time).
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db.models import Count, F, Q, Sum
from django.urls import NoReverseMatch, reverse
from django.utils import timezone
from rq.job import Job

from django_flyworkers.conf import get_settings
from django_flyworkers.dashboard.sql import EpochSeconds
from django_flyworkers.models import FlyJob, JobAttempt, MachineRun, WorkerMachine
from django_flyworkers.queue import get_queue

RUNS_SHOWN = 50
JOBS_SHOWN = 50

_repr = reprlib.Repr()
_repr.maxstring = 120
_repr.maxother = 120
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 8
_repr.maxlevel = 3


@dataclass
class Attempt:
    number: int
    machine_id: str
    machine_pk: int | None
    worker_name: str
    started_at: datetime | None
    ended_at: datetime | None
    outcome: str
    error: str

    @property
    def seconds(self) -> float | None:
        if self.started_at and self.ended_at:
            return (self.ended_at - self.started_at).total_seconds()
        return None


@dataclass
class JobCost:
    """A job's share of its run: ``share`` of ``run_cost`` (``jobs`` jobs ran in that run)."""

    run: MachineRun
    run_seconds: float
    run_cost: float
    share: float
    jobs: int

    @property
    def cost(self) -> float:
        return self.run_cost * self.share

    @property
    def percent(self) -> float:
        return 100 * self.share


@dataclass
class JobDetail:
    job: FlyJob
    attempts: list[Attempt]
    arguments: str
    in_redis: bool
    rq_url: str
    retryable: bool
    cost: JobCost | None
    wait: float | None


def _rq_url(queue: str, job_id: str) -> str:
    try:
        from django_rq.settings import get_queues_map

        index = get_queues_map()[queue]
        return reverse("admin:django_rq_job_detail", args=[index, job_id])
    except (ImportError, KeyError, NoReverseMatch):
        return ""


def _arguments(job: FlyJob) -> tuple[str, bool, bool]:
    """(truncated repr of the call, whether rq still has the job, whether it is retryable)."""
    try:
        queue = get_queue(job.queue)
        rq_job = Job.fetch(job.job_id, connection=queue.connection, serializer=queue.serializer)
    except Exception:
        return "(rq no longer holds this job)", False, False
    try:
        args = ", ".join(
            [_repr.repr(a) for a in rq_job.args]
            + [f"{k}={_repr.repr(v)}" for k, v in rq_job.kwargs.items()]
        )
        call = f"{rq_job.func_name}({args})"
    except Exception as exc:  # a class the web process cannot import, a changed pickle
        call = f"(cannot be read here: {type(exc).__name__})"
    held = queue.connection.zscore(queue.failed_job_registry.key, job.job_id) is not None
    return call, True, held


def job_detail(job: FlyJob) -> JobDetail:
    """Everything the job page shows."""
    kept = {a.number: a for a in JobAttempt.objects.filter(job_id=job.job_id)}
    machine_ids = {a.machine_id for a in kept.values() if a.machine_id}
    pks = dict(
        WorkerMachine.objects.filter(machine_id__in=machine_ids).values_list("machine_id", "pk")
    )
    attempts = [
        Attempt(n, a.machine_id, pks.get(a.machine_id), a.worker_name, a.started_at,
                a.ended_at, a.outcome, a.error)
        for n, a in sorted(kept.items())
    ]  # fmt: skip
    latest_done = job.status in ("finished", "started") or job.attempts not in kept
    if job.attempts and latest_done:
        machine = job.machine
        current = Attempt(
            job.attempts,
            machine.machine_id if machine else "",
            machine.pk if machine else None,
            job.worker_name,
            job.started_at,
            job.ended_at,
            job.status if job.status != "queued" else "retrying",
            job.error,
        )
        attempts = [a for a in attempts if a.number != job.attempts] + [current]
    arguments, in_redis, retryable = _arguments(job)
    since = job.scheduled_for or job.enqueued_at
    wait = (job.started_at - since).total_seconds() if job.started_at and since else None
    return JobDetail(
        job=job,
        attempts=attempts,
        arguments=arguments,
        in_redis=in_redis,
        rq_url=_rq_url(job.queue, job.job_id) if in_redis else "",
        retryable=retryable and job.status == "failed",
        cost=job_cost(job),
        wait=max(0.0, wait) if wait is not None else None,
    )


def job_cost(job: FlyJob) -> JobCost | None:
    """The job's share of the run it (its latest attempt) ran in; None if no run is known."""
    if job.machine_id is None or job.started_at is None:
        return None
    run = (
        MachineRun.objects.filter(machine_id=job.machine_id, started_at__lte=job.started_at)
        .order_by("-started_at")
        .first()
    )
    if run is None or (run.stopped_at is not None and run.stopped_at < job.started_at):
        return None
    now = timezone.now()
    until = run.stopped_at or now
    seconds = EpochSeconds(F("ended_at")) - EpochSeconds(F("started_at"))
    inside = FlyJob.objects.filter(
        machine_id=job.machine_id, started_at__gte=run.started_at, started_at__lte=until
    ).aggregate(total=Sum(seconds, filter=Q(ended_at__isnull=False)), jobs=Count("id"))
    total, count = inside["total"] or 0.0, max(1, inside["jobs"])
    mine = job.run_seconds or 0.0
    share = mine / total if total > 0 else 1 / count
    run_seconds = run.billed_seconds or (until - run.started_at).total_seconds()
    rate = get_settings().prices.started_per_second(run.cpu_kind, run.cpus, run.memory_mb)
    return JobCost(run, run_seconds, run_seconds * rate, min(1.0, share), count)


@dataclass
class RunRow:
    run: MachineRun
    seconds: float
    boot: float | None
    cost: float
    jobs: int = 0


@dataclass
class MachineDetail:
    machine: WorkerMachine
    runs: list[RunRow]
    jobs: list[FlyJob]
    billed_seconds: float
    run_cost: float
    stopped_cost: float
    busy: list[str] = field(default_factory=list)

    @property
    def cost(self) -> float:
        return self.run_cost + self.stopped_cost


def machine_detail(machine: WorkerMachine) -> MachineDetail:
    """Runs (newest first), the jobs it ran, what it cost: runs plus its stopped root fs."""
    prices, now = get_settings().prices, timezone.now()
    rows = []
    for run in MachineRun.objects.filter(machine=machine).order_by("-started_at")[:RUNS_SHOWN]:
        seconds = run.billed_seconds
        if seconds is None:
            seconds = (now - run.started_at).total_seconds()
        boot = (run.booted_at - run.started_at).total_seconds() if run.booted_at else None
        rate = prices.started_per_second(run.cpu_kind, run.cpus, run.memory_mb)
        rows.append(RunRow(run, seconds, boot, seconds * rate))
    totals: dict[tuple[str, int, int], float] = {}
    for kind, cpus, memory, billed in (
        MachineRun.objects.filter(machine=machine)
        .values_list("cpu_kind", "cpus", "memory_mb")
        .annotate(billed=Sum("billed_seconds"))
    ):
        totals[(kind, cpus, memory)] = billed or 0.0
    for row in rows:  # a run still going has no billed_seconds yet
        if row.run.stopped_at is None:
            key = (row.run.cpu_kind, row.run.cpus, row.run.memory_mb)
            totals[key] = totals.get(key, 0.0) + row.seconds
    billed = sum(totals.values())
    run_cost = sum(s * prices.started_per_second(*key) for key, s in totals.items())
    end = machine.updated_at if machine.state == "destroyed" else now
    lifetime = max(0.0, (end - machine.created_at).total_seconds())
    stopped_cost = max(0.0, lifetime - billed) * prices.stopped_per_second
    jobs = list(FlyJob.objects.filter(machine=machine).order_by("-started_at")[:JOBS_SHOWN])
    for row in rows:
        until = row.run.stopped_at or now
        row.jobs = sum(
            1 for j in jobs if j.started_at and row.run.started_at <= j.started_at <= until
        )
    return MachineDetail(machine, rows, jobs, billed, run_cost, stopped_cost)


def guest_text(guest: dict[str, Any] | None) -> str:
    """``shared-cpu-1x, 512 MB`` from a guest mapping."""
    guest = guest or {}
    kind = "performance" if guest.get("cpu_kind") == "performance" else "shared-cpu"
    memory = guest.get("memory_mb")
    size = f"{kind}-{guest.get('cpus', 1)}x"
    return f"{size}, {memory} MB" if memory else size
