"""A queue's demand and presence, read from Redis in one round trip, and booting capacity
ended early when the Machines API shows a boot failed.

The scaler and the reaper assemble :class:`~django_flyworkers.scaling.policy.QueueSnapshot`
here from rq's own keys (``Queue.key``, the registries, ``Job.key_for``: a custom
``RQ_KEY_PREFIX`` keeps working) and the presence sets of :mod:`django_flyworkers.presence`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from redis import Redis
from rq.job import Job
from rq.queue import Queue
from rq.registry import ScheduledJobRegistry, StartedJobRegistry

from django_flyworkers import ledger, presence, signals
from django_flyworkers.conf import get_settings
from django_flyworkers.machines import Machine
from django_flyworkers.scaling import policy
from django_flyworkers.scaling.policy import QueueSnapshot

logger = logging.getLogger("django_flyworkers.scaler")


def snapshot(rq_queue: Queue) -> tuple[QueueSnapshot, dict[str, float]]:
    """Demand and presence for ``rq_queue`` from Redis, in one round trip.

    Returns the snapshot and the booting Machines with the time (Unix seconds) each was
    marked, which :func:`end_dead_boots` needs.
    """
    conn, name, now = rq_queue.connection, rq_queue.name, time.time()
    scheduled = ScheduledJobRegistry(name, connection=conn)
    started = StartedJobRegistry(name, connection=conn)
    with conn.pipeline(transaction=False) as pipe:
        pipe.llen(rq_queue.key)
        pipe.zcount(scheduled.key, "-inf", now)
        pipe.zcard(started.key)
        pipe.lindex(rq_queue.key, 0)
        presence.read_members(pipe, name, now)
        results = pipe.execute()
    queued, due, running, oldest_id = results[:4]
    live, booting = presence.members(results)
    boot_timeout = get_settings().boot_timeout
    snap = QueueSnapshot(
        queue=name,
        queued=int(queued),
        due_scheduled=int(due),
        started=int(running),
        live_workers=len(live),
        live_machines=live,
        booting=frozenset(booting),
        oldest_age=_age(conn, rq_queue, oldest_id, now),
    )
    return snap, {machine_id: expiry - boot_timeout for machine_id, expiry in booting.items()}


def _age(conn: Redis, rq_queue: Queue, job_id: bytes | None, now: float) -> float | None:
    if not job_id:
        return None
    job_class: type[Job] = getattr(rq_queue, "job_class", Job)
    return age_of(conn.hget(job_class.key_for(job_id.decode()), "enqueued_at"), now)


def age_of(enqueued_at: bytes | None, now: float) -> float | None:
    """Seconds since a job's ``enqueued_at`` as rq stores it in the job hash (None if unknown)."""
    if not enqueued_at:
        return None
    try:
        stamp = datetime.fromisoformat(enqueued_at.decode().replace("Z", "+00:00"))
    except ValueError:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return max(0.0, now - stamp.timestamp())


def end_dead_boots(
    conn: Redis,
    snap: QueueSnapshot,
    since: dict[str, float],
    machines: Sequence[Machine],
    *,
    reason: str,
    dry_run: bool = False,
) -> QueueSnapshot:
    """Stop counting booting Machines the list shows are no longer starting.

    A Machine whose worker crashed (or was killed) before announcing itself would otherwise
    count as capacity for ``BOOT_TIMEOUT`` while its queue's jobs wait. Their booting marks
    are removed and the ledger told, unless ``dry_run``; the snapshot returned leaves them out.
    """
    listed = {m.id: m for m in machines}
    dead = [
        listed[machine_id]
        for machine_id, marked_at in since.items()
        if machine_id in listed and policy.boot_over(listed[machine_id], marked_at)
    ]
    if not dead:
        return snap
    if dry_run:
        return dataclasses.replace(snap, booting=snap.booting - {m.id for m in dead})
    presence.end_booting(conn, snap.queue, [m.id for m in dead])
    for machine in dead:
        logger.warning(
            "flyworkers: Machine %s of queue %s is %s before its worker announced itself",
            machine.id,
            snap.queue,
            machine.state,
        )
        record_stopped(snap.queue, machine, f"{reason}: it stopped while booting")
    return dataclasses.replace(snap, booting=snap.booting - {m.id for m in dead})


STOPPED_STATES = frozenset({"stopped", "failed"})


def record_stopped(queue: str, machine: Machine, reason: str) -> None:
    """Mirror a Machine the API shows not running; tell ``machine_stopped`` listeners when
    the ledger learns from this that it stopped."""
    change = ledger.record_machine_seen(
        machine.id, queue=queue, state=machine.state, last_exit_code=machine.last_exit_code
    )
    stopped_now(queue, machine, change, reason)


def stopped_now(queue: str, machine: Machine, change: str | None, reason: str) -> None:
    """Send ``machine_stopped`` if ``change`` (from ``ledger.record_machine_seen``) says the
    ledger just learned that ``machine`` stopped."""
    if machine.state in STOPPED_STATES and change and change.endswith(f"-> {machine.state}"):
        signals.machine_stopped.send_robust(
            queue,
            queue=queue,
            machine_id=machine.id,
            exit_code=machine.last_exit_code,
            reason=reason,
        )
