"""reap(): make the database, Redis and the Machines API agree, and recover what died.

RQ reaps the jobs of a dead worker only from inside a running worker, about 90 s after its last
heartbeat; with every Machine stopped, nothing reaps at all. ``reap()`` (``manage.py
flyworkers_reap``) closes that gap. This module holds what is about rq; the Machine side
(steps 1 and 3) is :mod:`django_flyworkers.scaling.tidy`. Per queue it:

1. syncs WorkerMachine rows with the API: new states, Machines gone, ours adopted;
2. recovers the jobs of dead Machines *now*, through RQ's own abandoned-job path (retried if
   they have retries left, else failed, dependents and callbacks included), then wakes the
   queue for the requeued ones. A Machine running a job that the list no longer shows is
   asked for by id: a dedicated Machine is destroyed as soon as it stops (``auto_destroy``).
   Jobs a dead worker dequeued but never began go back to their queue
   (:mod:`django_flyworkers.requeue`);
3. stops Machines that are ``started`` without a live worker for longer than ``stuck_after``
   (never one running a job), destroys Machines that failed or sit in ``created`` without
   having been created stopped on purpose, and destroys stopped surplus above MAX_MACHINES;
4. prunes finished history older than ``prune_after_days``.

Started jobs are read *before* the Machines are listed: a job that starts after the list was
taken cannot be judged by it, and is left for the next run.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.utils import timezone
from redis import Redis
from redis.exceptions import LockError
from redis.lock import Lock
from rq import worker_registration
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.worker import Worker

from django_flyworkers import ledger, presence
from django_flyworkers.api import get_client
from django_flyworkers.conf import get_settings
from django_flyworkers.exceptions import NotConfigured
from django_flyworkers.machines import (
    Machine,
    MachineNotFound,
    MachinesAPIError,
    MachinesClient,
    MachineState,
)
from django_flyworkers.models import FlyJob, ScaleEvent, WorkerMachine
from django_flyworkers.queue import get_queue
from django_flyworkers.requeue import dequeued, push_back, recover_stuck_dequeues
from django_flyworkers.scaling import fleet, scaler, spec, tidy

DEAD_STATES = frozenset(
    {
        MachineState.STOPPED,
        MachineState.CREATED,
        MachineState.FAILED,
        MachineState.DESTROYING,
        MachineState.DESTROYED,
    }
)
"""A job cannot be running on a Machine in one of these states. (Not ``suspended``: a
suspended Machine resumes mid-job.)"""

LOCK_WAIT = 5.0
"""How long to wait for rq's per-queue maintenance lock before leaving recovery to a later run."""
LOCK_TTL = 60.0
"""Seconds rq's maintenance lock lives while we hold it, renewed as recovery goes on."""

_OUR_WORKER_NAME = re.compile(r"^(?P<machine>[0-9a-z]+)-[0-9a-f]{8}$")


@dataclass(frozen=True)
class StartedJob:
    """A job some worker took: from rq's StartedJobRegistry, or only from the ledger."""

    job_id: str
    execution_id: str | None
    """None for a job in limbo: a worker dequeued it (the ledger says started) but rq has not
    started it yet; if that Machine dies there, rq's abandoned-job path never sees it."""
    expires: float
    worker_name: str
    machine_id: str | None
    """From the worker's name when it names a Machine we know; for limbo jobs, the ledger's."""
    attempt: int | None = None
    """The ledger's attempt number when read: the reaper closes only that attempt."""


@dataclass
class Recovery:
    job_id: str
    machine_id: str | None
    reason: str
    attempt: int | None = None
    outcome: str = "pending"
    """``requeued`` (it had retries left), ``failed``, or ``pending`` in a dry run."""


@dataclass
class QueueReap:
    """What one run did (or, with ``dry_run``, would do) for one queue."""

    queue: str
    synced: list[str] = field(default_factory=list)
    recovered: list[Recovery] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    destroyed: list[str] = field(default_factory=list)
    woke: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.synced or self.recovered or self.stopped or self.destroyed)


@dataclass
class ReapReport:
    queues: list[QueueReap]
    pruned_jobs: int = 0
    pruned_events: int = 0
    dry_run: bool = False
    errors: list[str] = field(default_factory=list)


def _list_failed(report: ReapReport, exc: Exception, *, dry_run: bool, user: str) -> None:
    """Nothing is known about the Machines: say so in the report and, for real, per queue."""
    report.errors.append(f"list Machines: {exc}")
    if dry_run:
        return
    for item in report.queues:
        ledger.record_event(
            item.queue,
            "list",
            reason="flyworkers_reap",
            outcome=ScaleEvent.Outcome.ERROR,
            detail=str(exc),
            user=user,
        )


def reap(
    queues: Sequence[str],
    *,
    dry_run: bool = False,
    stuck_after: float | None = None,
    prune_after_days: float | None = None,
    user: str = "",
) -> ReapReport:
    """One reaper run over ``queues``; see the module docstring.

    ``user`` names the operator (the admin's actions) in the ScaleEvents it records.
    """
    settings = get_settings()
    stuck_after = settings.stuck_after if stuck_after is None else stuck_after
    days = settings.prune_after_days if prune_after_days is None else prune_after_days
    report = ReapReport(queues=[QueueReap(queue) for queue in queues], dry_run=dry_run)

    for item in report.queues:  # rows a killed worker could not write, from rq's own state
        item.synced += [str(done) for done in ledger.settle_queue(item.queue, dry_run=dry_run)]
    known = set(WorkerMachine.objects.values_list("machine_id", flat=True))
    started = {queue: _started_jobs(queue, known) for queue in queues}
    taken = {queue: dequeued(queue) for queue in queues}  # also read before the list
    try:
        client = get_client()
        everything = fleet.listing(client, max_age=0.0)
    except (MachinesAPIError, NotConfigured) as exc:
        _list_failed(report, exc, dry_run=dry_run, user=user)
        return report
    app = {m.id: m for m in everything}
    app.update(_unlisted(client, started, app))

    for item in report.queues:
        machines = {m.id: m for m in everything if spec.queue_of(m) == item.queue}
        item.synced += tidy.sync(item.queue, machines, dry_run)
        _recover(item, started[item.queue], app, dry_run)
        running = {job.machine_id for job in started[item.queue] if job.machine_id}
        done = tidy.tidy(
            item.queue,
            machines,
            busy=running - {r.machine_id for r in item.recovered},
            stuck_after=stuck_after,
            dry_run=dry_run,
            client=client,
            user=user,
        )
        item.stopped += done.stopped
        item.destroyed += done.destroyed
        item.errors += done.errors
        unserved = taken[item.queue] if _no_live_worker(item.queue, machines, app) else set()
        item.recovered += recover_stuck_dequeues(item.queue, dry_run=dry_run, unserved=unserved)

    _prune(report, queues, days)
    return report


def _prune(report: ReapReport, queues: Sequence[str], days: float) -> None:
    before = timezone.now() - timedelta(days=days)
    if report.dry_run:
        jobs, events = ledger.prunable(before, queues)
        report.pruned_jobs, report.pruned_events = jobs.count(), events.count()
    else:
        report.pruned_jobs, report.pruned_events = ledger.prune(before, queues)
    ledger.prune_runs(before, queues, dry_run=report.dry_run)


def _started_jobs(queue: str, known_machines: set[str]) -> list[StartedJob]:
    conn = get_queue(queue).connection
    registry = StartedJobRegistry(queue, connection=conn)
    pairs = []
    for member, score in conn.zrange(registry.key, 0, -1, withscores=True):
        job_id, _, execution_id = member.decode().partition(":")
        pairs.append((job_id, execution_id, float(score)))
    rows = {
        job_id: (machine_id, attempts)
        for job_id, machine_id, attempts in FlyJob.objects.filter(
            queue=queue, status="started"
        ).values_list("job_id", "machine__machine_id", "attempts")
    }
    jobs = Job.fetch_many([job_id for job_id, _, _ in pairs], connection=conn)
    out = []
    running = set()
    for (job_id, execution_id, expires), job in zip(pairs, jobs, strict=True):
        if job is None or job.get_status(refresh=False) != JobStatus.STARTED:
            continue  # finished meanwhile, not started yet, or a leftover entry rq ignores too
        running.add(job_id)
        worker = job.worker_name or ""
        # The running worker names its Machine (FlyWorker: "<machine id>-<8 hex>"). Trust the
        # name only when it is a Machine we know, not any host name of that shape.
        match = _OUR_WORKER_NAME.match(worker)
        named = match.group("machine") if match else None
        machine_id = named if named in known_machines else None
        attempt = rows.get(job_id, (None, None))[1]
        out.append(StartedJob(job_id, execution_id, expires, worker, machine_id, attempt))
    for job_id, (machine_id, attempt) in rows.items():
        if job_id not in running and machine_id:
            out.append(StartedJob(job_id, None, float("inf"), "", machine_id, attempt))
    return out


def _no_live_worker(
    queue: str, machines: Mapping[str, Machine], app: Mapping[str, Machine]
) -> bool:
    """Can no worker of ``queue`` be alive? Every Machine of the queue is in a state that runs
    nothing (not ``suspended``: that one resumes where it was), and every worker rq has
    registered for the queue ran on such a Machine or has died. A worker that is not on one of
    our Machines (a local ``rqworker``) counts as alive."""
    if any(machine.state not in DEAD_STATES for machine in machines.values()):
        return False
    rq_queue = get_queue(queue)
    conn = rq_queue.connection
    for key in worker_registration.get_keys(rq_queue):
        match = _OUR_WORKER_NAME.match(key.removeprefix(Worker.redis_worker_namespace_prefix))
        machine = app.get(match.group("machine")) if match else None
        if machine is not None and machine.state in DEAD_STATES:
            continue
        if conn.exists(key) and not conn.hexists(key, "death"):
            return False
    return True


def _dead_reason(
    job: StartedJob, app: Mapping[str, Machine], conn: Redis, now: float
) -> str | None:
    """Why ``job`` cannot be running any more, or None if it may be."""
    key = f"{Worker.redis_worker_namespace_prefix}{job.worker_name}"
    worker_dead = bool(job.worker_name) and (
        not conn.exists(key) or bool(conn.hexists(key, "death"))
    )
    if job.machine_id is not None:
        machine = app.get(job.machine_id)
        if machine is not None and machine.state in DEAD_STATES:
            return f"Machine {job.machine_id} was {machine.state} while the job ran"
        if machine is None and (worker_dead or not job.worker_name):
            return f"Machine {job.machine_id} is gone (destroyed) while the job ran"
    if worker_dead:
        where = f" on Machine {job.machine_id}" if job.machine_id else ""
        return f"worker {job.worker_name}{where} died while the job ran"
    if job.expires < now:
        return f"worker {job.worker_name or '?'} stopped sending heartbeats"
    return None


def _recover(
    item: QueueReap, started: Iterable[StartedJob], app: Mapping[str, Machine], dry_run: bool
) -> None:
    rq_queue = get_queue(item.queue)
    conn = rq_queue.connection
    registry = StartedJobRegistry(item.queue, connection=conn)
    now = time.time()
    dead = []
    for job in started:
        reason = _dead_reason(job, app, conn, now)
        if reason:
            dead.append(job)
            item.recovered.append(Recovery(job.job_id, job.machine_id, reason, job.attempt))
    if dry_run or not dead:
        return
    # rq's maintenance lock keeps a booting worker's clean_registries and us from both
    # retrying the same abandoned job. rq takes it with SET NX, so a redis-py Lock on the
    # same key excludes rq, and can be renewed while recovery goes on.
    lock = conn.lock(rq_queue.registry_cleaning_key, timeout=LOCK_TTL, thread_local=False)
    if not lock.acquire(blocking=True, blocking_timeout=LOCK_WAIT):
        item.errors.append("rq's maintenance lock is held: recovery left for the next run")
        item.recovered.clear()
        return
    try:
        _recover_locked(item, dead, rq_queue, registry, renew=lambda: _renew(lock))
    finally:
        with contextlib.suppress(LockError):  # expired: rq may hold it now, leave it alone
            lock.release()


def _renew(lock: Lock) -> None:
    with contextlib.suppress(LockError):
        lock.extend(LOCK_TTL, replace_ttl=True)


def _recover_locked(
    item: QueueReap,
    dead: list[StartedJob],
    rq_queue: Any,
    registry: StartedJobRegistry,
    renew: Callable[[], None],
) -> None:
    conn = rq_queue.connection
    for machine_id in {job.machine_id for job in dead if job.machine_id}:
        presence.withdraw(conn, item.queue, machine_id)
    limbo = {job.job_id for job in dead if job.execution_id is None}
    # Mark exactly these executions expired and let rq's own cleanup handle them: retry or
    # fail, failure callbacks, dependents. A cutoff in the future would fail live jobs too.
    listed = [job for job in dead if job.execution_id is not None]
    with conn.pipeline() as pipe:
        for job in listed:
            pipe.zadd(registry.key, {f"{job.job_id}:{job.execution_id}": 0}, xx=True, ch=True)
        changed = pipe.execute()
    # An entry that vanished since we read it belongs to a job that ended on its own.
    vanished = {job.job_id for job, hit in zip(listed, changed, strict=True) if not hit}
    item.recovered = [r for r in item.recovered if r.job_id not in vanished]
    registry.cleanup()
    requeued = False
    for recovery in item.recovered:
        renew()
        if recovery.job_id in limbo:
            recovery.outcome = push_back(item.queue, recovery, registry.key)
            continue
        fetched = Job.fetch_many([recovery.job_id], connection=conn)[0]
        status = fetched.get_status(refresh=False) if fetched else JobStatus.FAILED
        if status in (JobStatus.QUEUED, JobStatus.SCHEDULED):
            recovery.outcome = "requeued"
            requeued = True
            reason = f"{recovery.reason}; retried"
            ledger.record_reaped(
                recovery.job_id, recovery.attempt, "queued", reason, ran_on=recovery.machine_id
            )
        else:
            recovery.outcome = "failed"
            ledger.record_reaped(
                recovery.job_id, recovery.attempt, "failed", recovery.reason,
                ran_on=recovery.machine_id,
            )  # fmt: skip
        ledger.record_attempt(
            recovery.job_id, recovery.attempt, "lost", queue=item.queue,
            machine_id=recovery.machine_id or "", error=recovery.reason,
        )  # fmt: skip
    if requeued:
        # rq requeued them on a plain Queue: nobody was told. Wake a worker for them.
        outcome = scaler.wake(item.queue, reason="flyworkers_reap requeued jobs")
        item.woke += outcome.actions if outcome else []


def _unlisted(
    client: MachinesClient, started: Mapping[str, list[StartedJob]], listed: Mapping[str, Machine]
) -> dict[str, Machine]:
    """The Machines of started jobs that the list does not show, asked for one by one.

    A dedicated Machine is destroyed (``auto_destroy``) as soon as it stops, so a crash mid-job
    leaves no stopped Machine in the list; a 404 means it is gone. One the API cannot tell
    about now is left for the next run."""
    wanted = {
        job.machine_id
        for jobs in started.values()
        for job in jobs
        if job.machine_id and job.machine_id not in listed
    }
    found: dict[str, Machine] = {}
    for machine_id in sorted(wanted):
        try:
            found[machine_id] = client.get(machine_id)
        except MachineNotFound:
            found[machine_id] = Machine(id=machine_id, name="", state=MachineState.DESTROYED)
        except MachinesAPIError:
            continue
    return found
