"""Jobs a dead worker took from its queue but never began: back to the queue, no retry used.

rq moves a job to the queue's intermediate list when a worker dequeues it and out again when
the work horse begins it; only a running worker of that queue ever cleans that list up. The
reaper calls these for workers that died in between (see :mod:`django_flyworkers.reaper`).
"""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import TYPE_CHECKING

from redis import Redis
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

from django_flyworkers import ledger
from django_flyworkers.queue import get_queue

if TYPE_CHECKING:
    from django_flyworkers.reaper import Recovery


def push_back(queue: str, recovery: Recovery, wip_key: str) -> str:
    """Return a job a dead Machine dequeued but never began to its queue (no retry used)."""
    rq_queue = get_queue(queue)
    conn = rq_queue.connection
    job = Job.fetch_many([recovery.job_id], connection=conn)[0]
    if job is None:
        gone = f"{recovery.reason}; its data is gone"
        ledger.record_reaped(recovery.job_id, recovery.attempt, "failed", gone)
        return "failed"
    if job.get_status(refresh=False) != JobStatus.QUEUED:
        return "skipped"  # rq got further after all: the registry path handles it next run
    with conn.pipeline() as pipe:
        pipe.lrem(rq_queue.intermediate_queue_key, 0, job.id)
        pipe.lrem(rq_queue.key, 0, job.id)
        for member in conn.zrange(wip_key, 0, -1):
            if member.decode().startswith(f"{job.id}:"):
                pipe.zrem(wip_key, member)
        pipe.execute()
    never = f"{recovery.reason}; it never began: requeued"
    ledger.record_reaped(recovery.job_id, recovery.attempt, "queued", never)
    rq_queue._enqueue_job(job)  # through FlyQueue: the ledger row and a wake-up follow
    return "requeued"


STUCK_DEQUEUE = 60.0
"""Seconds a job may sit dequeued but not begun before it goes back to its queue (rq's own rule
for its intermediate list)."""


def dequeued(queue: str) -> set[str]:
    """Ids in ``queue``'s intermediate list now: read them before the Machines are listed, for
    :func:`recover_stuck_dequeues`'s ``unserved``."""
    from rq.intermediate_queue import IntermediateQueue

    rq_queue = get_queue(queue)
    return set(IntermediateQueue(rq_queue.key, connection=rq_queue.connection).get_job_ids())


def recover_stuck_dequeues(
    queue: str, *, dry_run: bool = False, unserved: Collection[str] = ()
) -> list[Recovery]:
    """Push back jobs a worker dequeued and never began, judged from rq's state alone.

    A worker moves a job to the queue's intermediate list when it dequeues it; the horse takes
    it out when it begins. A worker killed in between leaves it there, still ``queued``, and
    the ledger may not name its Machine yet (workers write in batches). rq cleans that list up
    only inside a running worker; with every Machine stopped nothing would. So, under rq's
    maintenance lock and by rq's rule: a job first seen there more than a minute ago, not
    begun, and not held by a live execution goes back to its queue (no retry used).

    ``unserved`` names jobs that were in the list before a Machines list that showed no worker
    of the queue alive (see :func:`django_flyworkers.reaper.reap`): whoever dequeued them is
    gone, so they go back at once instead of a minute later.
    """
    from rq.intermediate_queue import IntermediateQueue

    from django_flyworkers.reaper import Recovery

    rq_queue = get_queue(queue)
    conn = rq_queue.connection
    stuck = IntermediateQueue(rq_queue.key, connection=conn)
    ids = stuck.get_job_ids()
    if not ids or not rq_queue.acquire_maintenance_lock():
        return []
    registry = StartedJobRegistry(queue, connection=conn)
    now = time.time()
    out = []
    try:
        live = {
            member.decode().partition(":")[0]
            for member, score in conn.zrange(registry.key, 0, -1, withscores=True)
            if score > now
        }
        for job_id, job in zip(ids, Job.fetch_many(ids, connection=conn), strict=True):
            if job is None:
                if not dry_run:
                    stuck.remove(job_id)
                continue
            if job.get_status(refresh=False) != JobStatus.QUEUED or job_id in live:
                continue
            seen_key = f"{stuck.key}:flyworkers_seen:{job_id}"
            reason = _stuck_reason(conn, seen_key, now, gone=job_id in unserved)
            if reason is None:
                continue
            recovery = Recovery(job_id, None, reason)
            out.append(recovery)
            if not dry_run:
                conn.delete(seen_key)
                recovery.outcome = push_back(queue, recovery, registry.key)
    finally:
        rq_queue.release_maintenance_lock()
    return out


def _stuck_reason(conn: Redis, seen_key: str, now: float, *, gone: bool) -> str | None:
    """Why a job sitting in the intermediate list goes back now, or None to leave it there."""
    if gone:
        return "dequeued by a worker that is gone (no worker of the queue is alive)"
    # Seen there by an earlier pass, a while ago: a passing job stays microseconds, and the
    # mark expires, so an old sighting of an earlier pass cannot count.
    if conn.set(seen_key, now, nx=True, ex=int(STUCK_DEQUEUE * 3)):
        return None
    seen = float(conn.get(seen_key) or now)
    if now - seen < STUCK_DEQUEUE:
        return None
    return f"dequeued {now - seen:.0f}s ago by a worker that never began it"
