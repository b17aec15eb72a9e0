"""Who is serving a queue, as seen in Redis: the other half of the lost wake-up handshake.

Two sorted sets per queue, scored by expiry time (Unix seconds), so crashed members age out:

* ``flyworkers:active:<queue>``: workers ready for jobs. A worker announces itself at birth
  and on every heartbeat, and withdraws *before* its last look at the queue.
* ``flyworkers:booting:<queue>``: Machines we started or created and whose worker has not
  announced yet; they count as capacity so that a burst does not start them again.

The producer pushes, then reads these sets; the worker withdraws, then re-checks the queue.
Redis executes both in one order, so one of them sees the other: no job is left behind.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from redis import Redis
from rq.registry import ScheduledJobRegistry, StartedJobRegistry

from django_flyworkers.scaling.policy import QueueSnapshot


def active_key(queue: str) -> str:
    return f"flyworkers:active:{queue}"


def booting_key(queue: str) -> str:
    return f"flyworkers:booting:{queue}"


def queue_key(queue: str) -> str:
    return f"rq:queue:{queue}"


def announce(conn: Redis, queue: str, member: str, ttl: float) -> None:
    """Mark ``member`` (a Machine id, or a worker name off Fly) ready for ``ttl`` seconds."""
    with conn.pipeline() as pipe:
        pipe.zadd(active_key(queue), {member: time.time() + ttl})
        pipe.zrem(booting_key(queue), member)
        pipe.execute()


def withdraw(conn: Redis, queue: str, member: str) -> None:
    """``member`` takes no more jobs from ``queue``."""
    conn.zrem(active_key(queue), member)


def mark_booting(conn: Redis, queue: str, machine_id: str, ttl: float) -> None:
    """``machine_id`` was started for ``queue``; count it as capacity for ``ttl`` seconds."""
    conn.zadd(booting_key(queue), {machine_id: time.time() + ttl})


def covered(conn: Redis, queue: str, jobs_per_machine: int, max_machines: int) -> bool:
    """Cheap check on the enqueue path: do live and booting workers cover the backlog?

    Three Redis reads in one round trip, no Machines API call.
    """
    now = time.time()
    with conn.pipeline(transaction=False) as pipe:
        pipe.llen(queue_key(queue))
        pipe.zcount(active_key(queue), now, "+inf")
        pipe.zcount(booting_key(queue), now, "+inf")
        queued, live, booting = pipe.execute()
    serving = int(live) + int(booting)
    return serving > 0 and (serving >= max_machines or serving * jobs_per_machine >= int(queued))


def snapshot(conn: Redis, queue: str) -> QueueSnapshot:
    """Everything the policy needs to know about ``queue`` from Redis."""
    now = time.time()
    scheduled = ScheduledJobRegistry(queue, connection=conn)
    started = StartedJobRegistry(queue, connection=conn)
    with conn.pipeline(transaction=False) as pipe:
        pipe.zremrangebyscore(active_key(queue), "-inf", now)
        pipe.zremrangebyscore(booting_key(queue), "-inf", now)
        pipe.llen(queue_key(queue))
        pipe.zcount(scheduled.key, "-inf", now)
        pipe.zcard(started.key)
        pipe.zrange(active_key(queue), 0, -1)
        pipe.zrange(booting_key(queue), 0, -1)
        pipe.lindex(queue_key(queue), 0)
        _, _, queued, due, running, live, booting, oldest_id = pipe.execute()
    return QueueSnapshot(
        queue=queue,
        queued=int(queued),
        due_scheduled=int(due),
        started=int(running),
        live_workers=len(live),
        live_machines=frozenset(m.decode() for m in live),
        booting=frozenset(m.decode() for m in booting),
        oldest_age=_age(conn, oldest_id, now),
    )


def _age(conn: Redis, job_id: bytes | None, now: float) -> float | None:
    if not job_id:
        return None
    raw = conn.hget(f"rq:job:{job_id.decode()}", "enqueued_at")
    if not raw:
        return None
    try:
        stamp = datetime.fromisoformat(raw.decode().replace("Z", "+00:00"))
    except ValueError:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return max(0.0, now - stamp.timestamp())
