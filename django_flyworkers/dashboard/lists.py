"""The short lists: failed jobs still in rq's registry, and the latest scaling events."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from django_flyworkers.conf import get_settings
from django_flyworkers.models import FlyJob, ScaleEvent
from django_flyworkers.queue import get_queue

LIST_ROWS = 10


@dataclass
class FailedJob:
    pk: int
    job_id: str
    queue: str
    func_name: str
    ended_at: datetime | None
    error: str
    retryable: bool
    """Still in rq's failed registry: Retry and Delete can act on it."""


def failed_jobs(queues: Iterable[str] | None = None) -> list[FailedJob]:
    """The latest failed jobs, and whether rq still holds each in its failed registry."""
    names = list(queues) if queues is not None else list(get_settings().queues)
    rows = list(
        FlyJob.objects.filter(queue__in=names, status="failed")
        .order_by("-ended_at")
        .values_list("pk", "job_id", "queue", "func_name", "ended_at", "error")[:LIST_ROWS]
    )
    held = in_failed_registry([(queue, job_id) for _, job_id, queue, *_ in rows])
    return [
        FailedJob(pk, job_id, queue, func, ended, _last_line(error), (queue, job_id) in held)
        for pk, job_id, queue, func, ended, error in rows
    ]


def in_failed_registry(pairs: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
    """Which ``(queue, job_id)`` pairs rq's failed registry holds (one pipeline per queue)."""
    by_queue: dict[str, list[str]] = defaultdict(list)
    for queue, job_id in pairs:
        by_queue[queue].append(job_id)
    held = set()
    for queue, ids in by_queue.items():
        rq_queue = get_queue(queue)
        with rq_queue.connection.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.zscore(rq_queue.failed_job_registry.key, job_id)
            scores = pipe.execute()
        held |= {(queue, job_id) for job_id, score in zip(ids, scores, strict=True) if score}
    return held


def _last_line(error: str) -> str:
    lines = [line for line in error.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def recent_events(queues: Iterable[str] | None = None) -> list[ScaleEvent]:
    names = list(queues) if queues is not None else list(get_settings().queues)
    return list(ScaleEvent.objects.filter(queue__in=names).order_by("-created_at")[:LIST_ROWS])
