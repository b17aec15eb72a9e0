"""Releases: which code enqueued a job, and the rule that old code never runs a newer job.

Workers outlive deploys: a suspended worker wakes with the code it was frozen with, and a
worker with an ``IDLE_TIMEOUT`` keeps running while ``fly deploy`` changes ``FLY_IMAGE_REF``.
So every job carries its release, and a worker on an older one hands a newer job back.

* **A release is an image ref.** A producer's is the image it asks workers to run (``IMAGE``,
  which defaults to ``FLY_IMAGE_REF``); a worker's is the image it runs (``FLY_IMAGE_REF``,
  else ``IMAGE`` off Fly).
* **"Newer" is "first seen later".** Image refs are not ordered (tags, digests), so the hash
  ``flyworkers:releases`` maps each ref to the Redis server's clock when some process first
  met it (``HSETNX`` in one small script: the first writer wins, everyone reads the same
  time, and no process clock is involved). A process looks its own release up once and
  keeps the answer.
* **The stamp.** ``FlyQueue`` writes the ref and its first-seen time into ``job.meta`` before
  the push, so they travel in the job hash rq writes anyway: no extra round trip per
  ``.delay()`` (the first enqueue of a process pays one, to look its release up). A job
  that already has a stamp keeps it: a retry is still the enqueuer's job.
* **The rule.** A worker compares the job's first-seen time with its own release's. A newer
  job is handed back to the *front* of its queue and the worker leaves (see
  :func:`hand_back`); its Machine is then updated to the new image and started cold by the
  wake path, which runs the new code. Jobs of the same or an older release, and jobs without
  a stamp (enqueued some other way), run on any worker.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from redis import Redis
from rq.job import Job
from rq.queue import Queue

logger = logging.getLogger("django_flyworkers.release")

RELEASES_KEY = "flyworkers:releases"
"""Hash: image ref -> Redis server time (Unix seconds) when a process first met it."""
META_RELEASE = "flyworkers_release"
"""``job.meta`` key: the image ref of the release that enqueued the job."""
META_SEEN = "flyworkers_release_seen"
"""``job.meta`` key: that release's first-seen time, so a worker compares without a lookup."""

# TIME, then HSETNX: the first process to meet a release records the server's clock.
_FIRST_SEEN = """
local t = redis.call('TIME')
redis.call('HSETNX', KEYS[1], ARGV[1], t[1] .. '.' .. string.format('%06d', tonumber(t[2])))
return redis.call('HGET', KEYS[1], ARGV[1])
"""

_lock = threading.Lock()
_seen: dict[tuple[Any, ...], float] = {}


def _where(conn: Redis) -> tuple[Any, ...]:
    kwargs = conn.connection_pool.connection_kwargs
    return (kwargs.get("host"), kwargs.get("port"), kwargs.get("path"), kwargs.get("db", 0))


def first_seen(conn: Redis, ref: str) -> float:
    """When ``ref`` was first met (Redis server time), recording now if nobody has yet.

    One round trip the first time per process, Redis server and ref; cached afterwards.
    """
    key = (_where(conn), ref)
    with _lock:
        cached = _seen.get(key)
    if cached is not None:
        return cached
    raw = conn.eval(_FIRST_SEEN, 1, RELEASES_KEY, ref)  # type: ignore[no-untyped-call]
    seen = float(raw.decode() if isinstance(raw, bytes) else raw)
    with _lock:
        _seen[key] = seen
    return seen


def forget() -> None:
    """Drop the cached first-seen times (tests flush Redis between cases)."""
    with _lock:
        _seen.clear()


def producer_release() -> str | None:
    """The release a producer stamps: the image it asks workers to run (``IMAGE``)."""
    from django_flyworkers.conf import get_settings

    try:
        return get_settings().image or None
    except ImproperlyConfigured:
        return None  # reported by the system checks; an enqueue must not fail for it


def worker_release() -> str | None:
    """The release a worker runs: ``FLY_IMAGE_REF``, else ``IMAGE`` (off Fly)."""
    return os.environ.get("FLY_IMAGE_REF") or producer_release()


def stamp(job: Job, conn: Redis) -> None:
    """Write the producer's release into ``job.meta`` (before rq saves the job)."""
    if job.meta.get(META_RELEASE):
        return
    ref = producer_release()
    if ref:
        job.meta[META_RELEASE] = ref
        job.meta[META_SEEN] = first_seen(conn, ref)


def is_newer(job: Job, conn: Redis, own: str | None) -> bool:
    """Was ``job`` enqueued by a release newer than ``own`` (a worker's release)?

    False for a job without a stamp, of the same release, or of an older one. Looks the
    worker's own release up only the first time a job of another release comes by.
    """
    ref, seen = job.meta.get(META_RELEASE), job.meta.get(META_SEEN)
    if not own or not ref or ref == own or not isinstance(seen, int | float):
        return False
    return float(seen) > first_seen(conn, own)


def hand_back(job: Job, queue: Queue) -> None:
    """Put a dequeued job back at the front of its queue, as if it had never been taken.

    rq moved the id to the queue's intermediate list (one queue, Redis 6.2+) or popped it;
    both undo in one transaction, so the job is never in neither list nor in both.
    """
    with queue.connection.pipeline() as pipe:
        pipe.lrem(queue.intermediate_queue_key, 0, job.id)
        pipe.lpush(queue.key, job.id)
        pipe.execute()
    logger.info(
        "flyworkers: job %s of release %s is newer than this worker's: handed back to %s",
        job.id,
        job.meta.get(META_RELEASE),
        queue.name,
    )
