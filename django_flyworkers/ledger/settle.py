"""rq's truth: rows a dead process left behind are set to the state rq keeps."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.utils import timezone
from rq.job import Job, JobStatus

from django_flyworkers.ledger.common import (
    FINAL,
    RAN,
    WAITING,
    truncate_error,
)
from django_flyworkers.models import FlyJob

if TYPE_CHECKING:
    from redis import Redis


RQ_STATUS = {
    JobStatus.FINISHED: FlyJob.Status.FINISHED,
    JobStatus.FAILED: FlyJob.Status.FAILED,
    JobStatus.STOPPED: FlyJob.Status.STOPPED,
    JobStatus.CANCELED: FlyJob.Status.CANCELED,
    JobStatus.QUEUED: FlyJob.Status.QUEUED,
    JobStatus.SCHEDULED: FlyJob.Status.SCHEDULED,
    JobStatus.DEFERRED: FlyJob.Status.DEFERRED,
    JobStatus.STARTED: FlyJob.Status.STARTED,
}


TRACEBACK_KEY = "flyworkers:traceback:{}"
"""Where a work horse leaves a failed attempt's traceback for its parent (an hour): rq keeps
none for an attempt it retries."""


def failure_reason(job: Job) -> str:
    """The error of ``job``'s latest failed execution: rq's, or the one its horse left."""
    try:
        result = job.latest_result()
    except Exception:
        result = None
    if result is not None and result.type == result.Type.FAILED and result.exc_string:
        return str(result.exc_string)
    try:
        kept = job.connection.get(TRACEBACK_KEY.format(job.id))
    except Exception:
        return ""
    return kept.decode() if isinstance(kept, bytes) else str(kept or "")


@dataclass
class Settled:
    """One row :func:`settle_from_rq` set (or, in a dry run, would set) to rq's state."""

    job_id: str
    before: str
    after: str
    attempt: int = 0
    error: str = ""
    ended_at: datetime | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return f"job {self.job_id}: {self.before} -> {self.after} (as rq says)"


SETTLE_LIMIT = 20_000
"""Most rows one :func:`settle_from_rq` pass looks at, oldest first."""


def settle_from_rq(
    queue: str, conn: Redis, *, rq_queue: Any = None, dry_run: bool = False
) -> list[Settled]:
    """Set rows of ``queue`` that disagree with rq to rq's state; returns what changed.

    A worker killed between a job's end and its ledger write leaves the row ``started`` (or
    ``queued``, if its start was not written either) while rq knows how the job ended. Rows
    not in a final state are compared with rq's job hashes, one pipelined read:

    * rq says finished, failed (with its reason), stopped or canceled: the row says so too;
    * rq says queued, scheduled or deferred and the job is in that list or registry while the
      row says ``started``: it was requeued (a retry): the row is waiting again;
    * rq says started, or queued but in no list (a dead Machine dequeued it and never began):
      left to the reaper's recovery, which knows whether the Machine is alive;
    * the job is gone from Redis while the row says ``started``: it finished and rq deleted it
      (``result_ttl=0``), as a worker records it too.

    Every write is conditional on the row (status and attempt) not having moved meanwhile, so
    a live worker writing at the same time wins.
    """
    from rq.queue import Queue

    rq_queue = rq_queue if rq_queue is not None else Queue(queue, connection=conn)
    rows = list(
        FlyJob.objects.filter(queue=queue, status__in=[*WAITING, FlyJob.Status.STARTED])
        .order_by("updated_at")
        .values_list("job_id", "status", "attempts")[:SETTLE_LIMIT]
    )
    if not rows:
        return []
    jobs = Job.fetch_many([job_id for job_id, _, _ in rows], connection=conn)
    out: list[Settled] = []
    for (job_id, before, attempt), job in zip(rows, jobs, strict=True):
        if job is None:
            if before == FlyJob.Status.STARTED:
                out.append(Settled(job_id, before, FlyJob.Status.FINISHED, attempt))
            continue
        after = RQ_STATUS.get(job.get_status(refresh=False))
        if after is None or after == before or after == FlyJob.Status.STARTED:
            continue
        if after in FINAL:
            error = failure_reason(job) if after == FlyJob.Status.FAILED else ""
            out.append(Settled(job_id, before, after, attempt, error, job.ended_at))
        elif before == FlyJob.Status.STARTED and _is_waiting(conn, rq_queue, job_id, after):
            # A retry: the reason it was retried is the failure rq recorded last.
            out.append(Settled(job_id, before, after, attempt, failure_reason(job)))
    if not dry_run:
        out = [item for item in out if _settle(item)]
    return out


def settle_queue(queue: str, *, dry_run: bool = False) -> list[Settled]:
    """:func:`settle_from_rq` for the configured queue ``queue`` (the reaper's entry point)."""
    from django_flyworkers.queue import get_queue

    rq_queue = get_queue(queue)
    return settle_from_rq(queue, rq_queue.connection, rq_queue=rq_queue, dry_run=dry_run)


def _is_waiting(conn: Redis, rq_queue: Any, job_id: str, status: str) -> bool:
    """Is ``job_id`` in the list or registry rq keeps its ``status`` in?"""
    if status == FlyJob.Status.QUEUED:
        return conn.lpos(rq_queue.key, job_id) is not None
    if status == FlyJob.Status.SCHEDULED:
        return conn.zscore(rq_queue.scheduled_job_registry.key, job_id) is not None
    return conn.zscore(rq_queue.deferred_job_registry.key, job_id) is not None


def _settle(item: Settled) -> bool:
    rows = FlyJob.objects.filter(job_id=item.job_id, status=item.before, attempts=item.attempt)
    final = item.after in FINAL
    changes: dict[str, Any] = {"status": item.after}
    if final:
        changes["ended_at"] = item.ended_at or timezone.now()
    if item.after in RAN:  # it ran, even if the worker never wrote its start
        changes["attempts"] = max(item.attempt, 1)
    if item.error:
        changes["error"] = truncate_error(item.error)
    return bool(rows.update(**changes))
