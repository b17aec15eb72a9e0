"""A scaling pass for a dedicated queue (``MODE: "dedicated"``): one fresh Machine per job.

The scaler hands a dedicated queue's pass to :func:`reconcile` (under the same per-queue and
global locks as a pool's pass), which

1. moves scheduled jobs that came due onto the queue (no worker runs rq's scheduler for a
   dedicated queue), unless another process holds rq's scheduler lock for it;
2. reads the head of the queue and which jobs already have a Machine (the ``flyworkers_job``
   metadata of the listed Machines, and a short-lived record in Redis for a create the list
   does not show yet);
3. plans with the pure :func:`~django_flyworkers.scaling.dedicated_policy.plan_dedicated`,
   not counting Machines that handed their place over (:func:`hand_over`) and are exiting;
4. creates one Machine per chosen job through :mod:`~django_flyworkers.scaling.actions`, with
   the job's own guest (``.using(guest=...)``, kept in ``job.meta``) and the command
   ``manage.py flyworkers_run <job id>``, ``auto_destroy`` and restart policy ``no``; counts
   it as booting, links the job's ledger row to it and tells ``machine_created`` listeners.

A create that fails leaves the job queued; the failure is in the result's ``errors``, so the
waker tries again after a backoff and ``flyworkers_scale`` on its next pass.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection, Sequence
from typing import Any

from redis import Redis
from rq.job import Job
from rq.queue import Queue
from rq.registry import ScheduledJobRegistry
from rq.scheduler import RQScheduler

from django_flyworkers import ledger, presence, signals
from django_flyworkers.conf import FlySettings, QueueProfile
from django_flyworkers.dedicated import GUEST_META
from django_flyworkers.guest import Guest, validate_guest
from django_flyworkers.machines import Machine
from django_flyworkers.scaling import actions, fleet, spec
from django_flyworkers.scaling.apply import Pass, ReconcileResult
from django_flyworkers.scaling.dedicated_policy import ENDED, DedicatedPlan, plan_dedicated
from django_flyworkers.scaling.policy import Plan

logger = logging.getLogger("django_flyworkers.scaler")

JOB_KEY = "flyworkers_job"
"""Metadata on a dedicated Machine: the id of the one job it runs."""

JOB_ENV = "FLYWORKERS_JOB_ID"
"""Environment of a dedicated Machine: the id of its job."""

RUN_COMMAND = ("python", "manage.py", "flyworkers_run")
"""What a dedicated Machine runs, followed by its job's id (``CMD`` replaces this part)."""

LOOK_AHEAD = 3
"""The pass reads ``LOOK_AHEAD x MAX_MACHINES`` job ids from the head of the queue: enough
to skip the ones whose Machine is still booting."""


def run_command(profile: QueueProfile, job_id: str) -> list[str]:
    """The command of the Machine that runs ``job_id``."""
    return [*(profile.cmd or RUN_COMMAND), job_id]


def machine_config(
    profile: QueueProfile, settings: FlySettings, job_id: str, guest: Guest
) -> dict[str, Any]:
    """The config of a Machine that runs only ``job_id`` and is destroyed when it exits."""
    config = spec.machine_config(profile, settings)
    config["init"] = {"cmd": run_command(profile, job_id)}
    config["guest"] = dict(guest)
    config["auto_destroy"] = True
    config["metadata"] = {**config["metadata"], JOB_KEY: job_id}
    config["env"] = {**config["env"], JOB_ENV: job_id}
    return config


def job_guest(job: Job | None, profile: QueueProfile) -> Guest:
    """The guest a job asked for (``.using(guest=...)``), else its queue's ``GUEST``."""
    wanted = (job.meta or {}).get(GUEST_META) if job is not None else None
    if not wanted:
        return profile.guest
    try:
        return validate_guest(wanted, base=profile.guest)
    except ValueError as exc:  # checked at enqueue; only a hand-edited meta gets here
        logger.warning("flyworkers: job %s has a bad guest (%s); using the queue's", job, exc)
        return profile.guest


LEAVING_SECONDS = 60.0
"""How long a Machine that handed its place over is not counted, while it exits."""


def _assigned_key(queue: str, job_id: str) -> str:
    return f"flyworkers:dedicated:{queue}:{job_id}"


def _leaving_key(queue: str) -> str:
    return f"flyworkers:dedicated:{queue}:leaving"


def hand_over(conn: Redis, queue: str, machine_id: str) -> None:
    """``machine_id`` has ended its job and is exiting: no pass counts it from now on, so two
    Machines finishing at once each leave their place to a waiting job."""
    conn.zadd(_leaving_key(queue), {machine_id: time.time() + LEAVING_SECONDS})


def leaving(conn: Redis, queue: str) -> set[str]:
    """Machines of ``queue`` that handed their place over and may still be exiting."""
    now = time.time()
    with conn.pipeline(transaction=False) as pipe:
        pipe.zremrangebyscore(_leaving_key(queue), "-inf", now)
        pipe.zrange(_leaving_key(queue), 0, -1)
        _, members = pipe.execute()
    return {member.decode() for member in members}


def covered(conn: Redis, rq_queue: Queue, profile: QueueProfile) -> bool:
    """Cheap check on the enqueue path, no API call: does every queued job have a booting
    Machine, or are ``MAX_MACHINES`` Machines busy or booting already?"""
    now = time.time()
    with conn.pipeline(transaction=False) as pipe:
        pipe.llen(rq_queue.key)
        pipe.zcount(presence.booting_key(rq_queue.name), now, "+inf")
        pipe.zcount(presence.active_key(rq_queue.name), now, "+inf")
        queued, booting, live = (int(n) for n in pipe.execute())
    return queued == 0 or booting >= queued or live + booting >= profile.max_machines


def promote_due(rq_queue: Queue) -> list[str]:
    """Move scheduled jobs that came due onto the queue, as rq's scheduler would; returns
    their ids. Skipped while an rq scheduler holds this queue's lock: it does the same."""
    conn: Redis = rq_queue.connection
    registry = ScheduledJobRegistry(rq_queue.name, connection=conn)
    if not conn.zcount(registry.key, "-inf", time.time()):
        return []
    lock = RQScheduler.get_locking_key(rq_queue.name)
    if not conn.set(lock, "flyworkers", nx=True, ex=60):
        return []
    try:
        job_ids = registry.get_jobs_to_schedule(int(time.time()))
        jobs = [job for job in Job.fetch_many(job_ids, connection=conn) if job is not None]
        plain = Queue(rq_queue.name, connection=conn, serializer=rq_queue.serializer)
        with conn.pipeline() as pipe:
            for job in jobs:
                plain._enqueue_job(job, pipeline=pipe)
            for job_id in job_ids:
                registry.remove(job_id, pipeline=pipe)
            pipe.execute()
    finally:
        conn.delete(lock)
    # A plain Queue sends no signal (FlyQueue's would wake this very pass again): the ledger
    # learns here that they are queued.
    ledger.record_enqueued(rq_queue.name, jobs)
    return [job.id for job in jobs]


def _assignments(
    conn: Redis, queue: str, job_ids: Sequence[str], machines: Sequence[Machine]
) -> dict[str, str]:
    assigned = {m.metadata[JOB_KEY]: m.id for m in machines if m.metadata.get(JOB_KEY)}
    recorded = conn.mget([_assigned_key(queue, job_id) for job_id in job_ids]) if job_ids else []
    for job_id, machine_id in zip(job_ids, recorded, strict=True):
        if machine_id and job_id not in assigned:
            assigned[job_id] = machine_id.decode()
    return assigned


def plan(
    rq_queue: Queue,
    profile: QueueProfile,
    machines: Sequence[Machine],
    *,
    booting: Collection[str],
    exclude: Collection[str],
    global_active: int,
    global_cap: int,
) -> DedicatedPlan:
    """Read the head of the queue and its Machines' jobs, and plan (no API call)."""
    conn: Redis = rq_queue.connection
    head = [raw.decode() for raw in conn.lrange(rq_queue.key, 0, LOOK_AHEAD * profile.max_machines)]
    return plan_dedicated(
        profile,
        head,
        machines,
        assigned=_assignments(conn, rq_queue.name, head, machines),
        booting=booting,
        exclude=exclude,
        global_active=global_active,
        global_cap=global_cap,
    )


def as_plan(dedicated: DedicatedPlan) -> Plan:
    """The dedicated plan in the scaler's terms, for ``flyworkers_scale``'s report."""
    return Plan(
        queue=dedicated.queue,
        create=len(dedicated.create_for),
        reason=dedicated.reason,
        desired=len(dedicated.running) + len(dedicated.create_for),
        serving=len(dedicated.running),
        capped=dedicated.capped,
    )


def create_for(p: Pass, job_ids: Sequence[str], why: str) -> list[actions.ActionResult]:
    """Create one Machine per job of ``job_ids``, each with the job's guest."""
    conn: Redis = p.conn
    jobs = Job.fetch_many(list(job_ids), connection=conn, serializer=p.rq_queue.serializer)
    region = p.profile.region or p.settings.region
    done = []
    for job_id, job in zip(job_ids, jobs, strict=True):
        if job is None:
            # Its data expired or was deleted: rq's own dequeue drops such ids too.
            conn.lrem(p.rq_queue.key, 1, job_id)
            continue
        guest = job_guest(job, p.profile)
        config = machine_config(p.profile, p.settings, job_id, guest)
        result = actions.create(
            p.client(),
            p.queue,
            config,
            reason=f"{why}; job {job_id}",
            name=spec.machine_name(p.queue),
            region=region,
            user=p.user,
        )
        done.append(result)
        if result.machine is not None:
            _launched(p, job_id, result.machine, guest, why)
    return done


def _launched(p: Pass, job_id: str, machine: Machine, guest: Guest, why: str) -> None:
    conn: Redis = p.conn
    boot_timeout = p.settings.boot_timeout
    presence.mark_booting(conn, p.queue, machine.id, boot_timeout)
    conn.set(_assigned_key(p.queue, job_id), machine.id, ex=max(1, math.ceil(boot_timeout)))
    fleet.note(machine, state=machine.state or "created")
    ledger.record_machine_seen(
        machine.id,
        queue=p.queue,
        state=machine.state or "created",
        name=machine.name,
        region=machine.region,
        image=machine.image or p.settings.image or "",
        guest=dict(guest),
    )
    ledger.record_job_machine(job_id, machine.id)
    signals.machine_created.send_robust(p.queue, queue=p.queue, machine_id=machine.id, reason=why)


def reconcile(
    p: Pass,
    result: ReconcileResult,
    *,
    global_active: int,
    exclude: Collection[str] = (),
    dry_run: bool = False,
) -> None:
    """One dedicated pass, inside the scaler's ``_reconcile`` under its locks. ``result``
    comes with the snapshot and this queue's Machines; the plan and every create go into it.
    ``global_active`` is the scaler's count of running Machines across queues."""
    if not dry_run:
        promoted = promote_due(p.rq_queue)
        if promoted:
            logger.info("flyworkers: %d scheduled job(s) of %s came due", len(promoted), p.queue)
    gone = {*exclude, *leaving(p.conn, p.queue)}
    excluded = {m.id for m in result.machines if m.id in gone and m.state not in ENDED}
    dedicated = plan(
        p.rq_queue,
        p.profile,
        result.machines,
        booting=result.snapshot.booting,
        exclude=gone,
        global_active=max(0, global_active - len(excluded)),
        global_cap=p.settings.global_max_machines,
    )
    result.plan = as_plan(dedicated)
    if dry_run or dedicated.is_empty:
        return
    for outcome in create_for(p, dedicated.create_for, f"{p.reason}: {dedicated.reason}"):
        result.add(outcome)
