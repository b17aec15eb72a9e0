"""FlyQueue: a django-rq queue that says when its jobs become visible in Redis.

Every path through which rq pushes a job id onto a queue list ends in
``Queue._enqueue_async_job``; scheduled jobs go through ``Queue.schedule_job``. FlyQueue
overrides both and sends :data:`~django_flyworkers.signals.job_enqueued` /
:data:`~django_flyworkers.signals.job_scheduled` exactly once per job, and only once the push is
visible: immediately when rq executed its own pipeline, otherwise after the caller's pipeline
``execute()`` succeeds. A pipeline that raises (``WatchError`` in rq's dependents loop) or is
reset without executing fires nothing; rq then retries and the retry fires once.

It keeps django-rq's ``COMMIT_MODE``: in ``on_db_commit`` mode (the default) ``enqueue_call``
waits for the surrounding transaction, and so, unlike plain django-rq, do ``enqueue_at``,
``enqueue_in`` and ``enqueue_many``: inside ``atomic()`` nothing reaches Redis before commit and
nothing at all on rollback.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import django_rq
from django.db import connection, transaction
from django.dispatch import Signal
from django_rq.queues import DjangoRQ
from redis.client import Pipeline
from rq.job import Job, JobStatus
from rq.queue import Queue

from django_flyworkers import release, signals
from django_flyworkers.exceptions import UnknownQueue

logger = logging.getLogger("django_flyworkers")

_PENDING = "_flyworkers_pending"

# (signal, queue name, job, extra keyword arguments for the signal)
_Pending = tuple[Signal, str, Job, dict[str, Any]]


def _send(pending: Iterable[_Pending]) -> None:
    """Send the signals for jobs that are now visible, one call per (signal, queue)."""
    groups: dict[tuple[Signal, str, tuple[tuple[str, Any], ...]], list[Job]] = defaultdict(list)
    for signal, queue, job, extra in pending:
        groups[(signal, queue, tuple(sorted(extra.items())))].append(job)
    for (signal, queue, items), jobs in groups.items():
        # A receiver failing must never turn a successful push into an error for the caller:
        # the job is in Redis and will run.
        for receiver, result in signal.send_robust(FlyQueue, queue=queue, jobs=jobs, **dict(items)):
            if isinstance(result, Exception):
                logger.error(
                    "flyworkers: job signal receiver %r failed for queue %s",
                    receiver,
                    queue,
                    exc_info=result,
                )


def _after_execute(pipeline: Pipeline, item: _Pending) -> None:
    """Queue ``item`` until ``pipeline`` executes successfully; drop it on error or reset."""
    pending: list[_Pending] | None = getattr(pipeline, _PENDING, None)
    if pending is None:
        pending = []
        setattr(pipeline, _PENDING, pending)
        original_execute = pipeline.execute
        original_reset = pipeline.reset

        def execute(*args: Any, **kwargs: Any) -> Any:
            # Snapshot first: execute() calls reset() in its finally block.
            snapshot = list(pending)
            pending.clear()
            result = original_execute(*args, **kwargs)
            _send(snapshot)
            return result

        def reset(*args: Any, **kwargs: Any) -> Any:
            pending.clear()
            return original_reset(*args, **kwargs)

        pipeline.execute = execute  # type: ignore[method-assign]
        pipeline.reset = reset  # type: ignore[method-assign]
    pending.append(item)


@functools.cache
def _ready_registry_class() -> type:
    from rq.registry import ReadyJobRegistry  # rq >= 3

    class FlyReadyJobRegistry(ReadyJobRegistry):  # type: ignore[misc,valid-type]
        def enqueue_jobs(self, job_ids: list[str]) -> list[Job]:
            jobs: list[Job] = super().enqueue_jobs(job_ids)
            # Each job was pushed by its own executed pipeline: all are visible now.
            _send([(signals.job_enqueued, self.name, job, {}) for job in jobs])
            return jobs

    return FlyReadyJobRegistry


class FlyQueue(DjangoRQ):
    """The queue class. Configure it globally::

        RQ = {"QUEUE_CLASS": "django_flyworkers.FlyQueue"}

    Per-queue ``QUEUE_CLASS`` is not enough: django-rq's admin and workers ignore it.
    """

    def _notify(self, signal: Signal, job: Job, pipeline: Pipeline | None, **extra: Any) -> None:
        item: _Pending = (signal, self.name, job, extra)
        if pipeline is None:
            _send([item])
        else:
            _after_execute(pipeline, item)

    def _enqueue_async_job(
        self,
        job: Job,
        pipeline: Pipeline | None = None,
        at_front: bool = False,
        unique: bool = False,
    ) -> Job:
        release.stamp(job, self.connection)  # into the job hash rq writes next: no round trip
        job = super()._enqueue_async_job(job, pipeline=pipeline, at_front=at_front, unique=unique)
        # unique=True runs an atomic Lua script that ignores the pipeline: already visible.
        self._notify(signals.job_enqueued, job, None if unique else pipeline)
        return job

    def schedule_job(
        self,
        job: Job,
        datetime: datetime,
        pipeline: Pipeline | None = None,
        unique: bool = False,
    ) -> Job:
        release.stamp(job, self.connection)
        job = super().schedule_job(job, datetime, pipeline=pipeline, unique=unique)
        self._notify(signals.job_scheduled, job, None if unique else pipeline, at=datetime)
        return job

    def enqueue_job(
        self,
        job: Job,
        pipeline: Pipeline | None = None,
        at_front: bool = False,
        unique: bool = False,
    ) -> Job:
        result = super().enqueue_job(job, pipeline=pipeline, at_front=at_front, unique=unique)
        if job.get_status(refresh=False) == JobStatus.DEFERRED:
            self._notify(signals.job_deferred, job, pipeline)
        return result

    @property
    def ready_job_registry(self) -> Any:
        # rq 3 moves met dependents through a ReadyJobRegistry that pushes them with a plain
        # Queue; wrap it so those pushes are announced too.
        return _ready_registry_class()(
            queue=self, job_class=self.job_class, serializer=self.serializer
        )

    # django-rq defers only enqueue_call to the commit; defer the other public entry points too.
    def _waits_for_commit(self) -> bool:
        return self._commit_mode == "on_db_commit" and connection.in_atomic_block

    def enqueue_at(self, datetime: datetime, f: Any, *args: Any, **kwargs: Any) -> Any:
        if self._waits_for_commit():
            transaction.on_commit(
                lambda: super(FlyQueue, self).enqueue_at(datetime, f, *args, **kwargs)
            )
            return None
        return super().enqueue_at(datetime, f, *args, **kwargs)

    def enqueue_many(  # type: ignore[override]
        self, job_datas: Any, pipeline: Pipeline | None = None, **kwargs: Any
    ) -> Any:
        if pipeline is None and self._waits_for_commit():
            transaction.on_commit(lambda: super(FlyQueue, self).enqueue_many(job_datas, **kwargs))
            return []
        return super().enqueue_many(job_datas, pipeline=pipeline, **kwargs)


_queues: dict[tuple[int, str], Queue] = {}


def get_queue(name: str) -> Queue:
    """The configured queue ``name``, or :class:`UnknownQueue` naming the configured ones.

    Cached per process: ``django_rq.get_queue`` builds a new Redis client (and TCP
    connection) on every call, which would cost more than the enqueue itself.
    """
    key = (os.getpid(), name)
    queue = _queues.get(key)
    if queue is not None:
        return queue
    try:
        queue = django_rq.get_queue(name)
    except KeyError:
        from django.conf import settings

        known = ", ".join(sorted(getattr(settings, "RQ_QUEUES", {}) or {})) or "none"
        raise UnknownQueue(f"queue {name!r} is not in RQ_QUEUES (configured: {known})") from None
    _queues[key] = queue
    return queue


def forget_queues(**kwargs: Any) -> None:
    """``setting_changed`` receiver: queues are rebuilt from the new RQ settings."""
    if kwargs.get("setting") in (None, "RQ_QUEUES", "RQ"):
        _queues.clear()
