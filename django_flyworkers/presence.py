"""Who is serving a queue, as seen in Redis: the other half of the lost wake-up handshake.

Two sorted sets per queue, scored by expiry time (Unix seconds), so crashed members age out:

* ``flyworkers:active:<queue>``: workers ready for jobs. A worker announces itself at birth
  and on every heartbeat, and withdraws *before* its last look at the queue.
* ``flyworkers:booting:<queue>``: Machines we started or created and whose worker has not
  announced yet; they count as capacity so that a burst does not start them again. A booting
  entry ends when the worker announces, when the boot timeout passes, or as soon as the
  Machines API shows the Machine is no longer starting (see ``policy.boot_over``).

The producer pushes, then reads these sets; the worker withdraws, then re-checks the queue.
Redis executes both in one order, so one of them sees the other: no job is left behind.

rq's own keys are built with rq's helpers (``Queue.redis_queue_namespace_prefix``), so a
custom ``RQ_KEY_PREFIX`` (rq 3) keeps working.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from redis import Redis
from redis.client import Pipeline
from rq.queue import Queue


def active_key(queue: str) -> str:
    return f"flyworkers:active:{queue}"


def booting_key(queue: str) -> str:
    return f"flyworkers:booting:{queue}"


def queue_key(queue: str) -> str:
    """rq's list of queued job ids for ``queue`` (with rq's key prefix)."""
    return f"{Queue.redis_queue_namespace_prefix}{queue}"


def announce(conn: Redis | Pipeline, queues: str | Iterable[str], member: str, ttl: float) -> None:
    """Mark ``member`` (a Machine id, or a worker name off Fly) ready for ``ttl`` seconds.

    ``conn`` may be a pipeline (a worker's heartbeat): the commands then join it.
    """
    names = [queues] if isinstance(queues, str) else list(queues)
    expires = time.time() + ttl
    if isinstance(conn, Pipeline):
        _announce(conn, names, member, expires)
        return
    with conn.pipeline() as pipe:
        _announce(pipe, names, member, expires)
        pipe.execute()


def _announce(pipe: Pipeline, queues: list[str], member: str, expires: float) -> None:
    for queue in queues:
        pipe.zadd(active_key(queue), {member: expires})
        pipe.zrem(booting_key(queue), member)


def withdraw(conn: Redis, queue: str, member: str) -> None:
    """``member`` takes no more jobs from ``queue``."""
    conn.zrem(active_key(queue), member)


def mark_booting(conn: Redis, queue: str, machine_id: str, ttl: float) -> None:
    """``machine_id`` was started for ``queue``; count it as capacity for ``ttl`` seconds."""
    conn.zadd(booting_key(queue), {machine_id: time.time() + ttl})


def end_booting(conn: Redis, queue: str, machine_ids: Iterable[str]) -> None:
    """These Machines are no longer starting (they crashed or stopped): stop counting them."""
    ids = list(machine_ids)
    if ids:
        conn.zrem(booting_key(queue), *ids)


def covered(
    conn: Redis,
    queue: str,
    jobs_per_machine: int,
    max_machines: int,
    *,
    key: str | None = None,
) -> bool:
    """Cheap check on the enqueue path: do live and booting workers cover the backlog?

    Three Redis reads in one round trip, no Machines API call. ``key`` is the rq
    queue's key (``Queue.key``) when the caller has the queue at hand.
    """
    now = time.time()
    with conn.pipeline(transaction=False) as pipe:
        pipe.llen(key or queue_key(queue))
        pipe.zcount(active_key(queue), now, "+inf")
        pipe.zcount(booting_key(queue), now, "+inf")
        queued, live, booting = pipe.execute()
    serving = int(live) + int(booting)
    return serving > 0 and (serving >= max_machines or serving * jobs_per_machine >= int(queued))


def read_members(pipe: Pipeline, queue: str, now: float) -> None:
    """Queue on ``pipe``: drop expired members, then read both sets.

    The pipeline's results end with ``[dropped, dropped, live, booting]``; parse those
    with :func:`members`.
    """
    pipe.zremrangebyscore(active_key(queue), "-inf", now)
    pipe.zremrangebyscore(booting_key(queue), "-inf", now)
    pipe.zrange(active_key(queue), 0, -1)
    pipe.zrange(booting_key(queue), 0, -1, withscores=True)


def members(results: list[Any]) -> tuple[frozenset[str], dict[str, float]]:
    """Live members, and booting ones with their expiry, from :func:`read_members`' results."""
    live, booting = results[-2], results[-1]
    return (
        frozenset(m.decode() for m in live),
        {m.decode(): float(score) for m, score in booting},
    )
