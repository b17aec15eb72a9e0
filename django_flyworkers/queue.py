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

Signals are dispatched receiver by receiver: an error in one receiver is logged and contained (the
job is in Redis and will run), except rq's control-flow exceptions (:data:`CONTROL_FLOW`: a stop
request, a job timeout, an imminent shutdown), which must reach rq and so propagate.

A push deferred to the commit cannot fail into the caller: the transaction has committed. If Redis
refuses it, the job's ``FlyJob`` row says the enqueue failed and an ERROR log names the job.
"""

from __future__ import annotations

import functools
import inspect
import logging
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from django.db import connection, transaction
from django.dispatch import Signal
from django_rq.queues import DjangoRQ
from redis.client import Pipeline
from rq.job import Job, JobStatus
from rq.queue import Queue

from django_flyworkers import release, signals
from django_flyworkers.dispatch import CONTROL_FLOW, dispatch
from django_flyworkers.exceptions import UnknownQueue
from django_flyworkers.queue_lookup import forget_queues as forget_queues  # imported from here
from django_flyworkers.queue_lookup import get_queue as get_queue
from django_flyworkers.queue_lookup import unknown_queue_message
from django_flyworkers.serializable import check_serializable

logger = logging.getLogger("django_flyworkers")

_PENDING = "_flyworkers_pending"

# (signal, queue name, job, extra keyword arguments for the signal)
_Pending = tuple[Signal, str, Job, dict[str, Any]]


def _send(pending: Iterable[_Pending]) -> None:
    """Send the signals for jobs that are now visible, one call per (signal, queue)."""
    pending = list(pending)
    if len(pending) == 1:  # the common case: one .delay()
        signal, queue, job, extra = pending[0]
        dispatch(signal, FlyQueue, queue=queue, jobs=[job], **extra)
        return
    groups: dict[tuple[Signal, str, tuple[tuple[str, Any], ...]], list[Job]] = defaultdict(list)
    for signal, queue, job, extra in pending:
        groups[(signal, queue, tuple(sorted(extra.items())))].append(job)
    for (signal, queue, items), jobs in groups.items():
        dispatch(signal, FlyQueue, queue=queue, jobs=jobs, **dict(items))


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

    def create_job(self, *args: Any, **kwargs: Any) -> Job:
        """rq's ``create_job``, plus: arguments a worker could not load are refused here."""
        job: Job = super().create_job(*args, **kwargs)
        check_serializable(job, self.serializer)
        return job

    def enqueue_call(self, *args: Any, **kwargs: Any) -> Any:
        """rq's ``enqueue_call``, also when called with positional options (``rq enqueue``).

        django-rq adds ``result_ttl`` by keyword, which clashes with a positional one: bind
        positional arguments to their names first.
        """
        if len(args) > 1:
            kwargs = _bind_enqueue_call(args, kwargs)
            args = ()
        if self._waits_for_commit():
            self._known()
            # The job id is chosen now, so that a push the commit cannot make names its job.
            kwargs["job_id"] = kwargs.get("job_id") or str(uuid.uuid4())
            func = kwargs["func"] if "func" in kwargs else args[0]
            what = _callable_name(func)
            job_id = kwargs["job_id"]
            push_on_commit(
                self.name,
                lambda: self.original_enqueue_call(*args, **kwargs),
                jobs=[(job_id, what)],
            )
            return None
        return super().enqueue_call(*args, **kwargs)

    def original_enqueue_call(self, *args: Any, **kwargs: Any) -> Any:
        self._known()  # django-rq looks the queue up in RQ_QUEUES: a bare KeyError otherwise
        return super().original_enqueue_call(*args, **kwargs)

    def _known(self) -> None:
        from django.conf import settings

        configured = getattr(settings, "RQ_QUEUES", None) or {}
        if self.name not in configured:
            raise UnknownQueue(unknown_queue_message(self.name, configured))

    # django-rq defers only enqueue_call to the commit; defer the other public entry points too.
    def _waits_for_commit(self) -> bool:
        return self._commit_mode == "on_db_commit" and connection.in_atomic_block

    def enqueue_at(self, datetime: datetime, f: Any, *args: Any, **kwargs: Any) -> Any:
        if self._waits_for_commit():
            job_id = kwargs["job_id"] = kwargs.get("job_id") or str(uuid.uuid4())
            push_on_commit(
                self.name,
                lambda: super(FlyQueue, self).enqueue_at(datetime, f, *args, **kwargs),
                jobs=[(job_id, _callable_name(f))],
            )
            return None
        return super().enqueue_at(datetime, f, *args, **kwargs)

    def enqueue_many(  # type: ignore[override]
        self, job_datas: Any, pipeline: Pipeline | None = None, **kwargs: Any
    ) -> Any:
        if pipeline is None and self._waits_for_commit():
            datas = [_with_job_id(data) for data in job_datas]
            push_on_commit(
                self.name,
                lambda: super(FlyQueue, self).enqueue_many(datas, **kwargs),
                jobs=[(data.job_id, _callable_name(data.func)) for data in datas],
            )
            return []
        return super().enqueue_many(job_datas, pipeline=pipeline, **kwargs)


@functools.cache
def _enqueue_call_signature() -> inspect.Signature:
    return inspect.signature(Queue.enqueue_call)


def _bind_enqueue_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``enqueue_call``'s arguments, all by name (a TypeError for arguments rq would refuse)."""
    bound = _enqueue_call_signature().bind(None, *args, **kwargs).arguments
    bound.pop("self", None)
    return dict(bound)


def _with_job_id(data: Any) -> Any:
    """An ``enqueue_many`` item with its job id fixed now (rq's EnqueueData is a namedtuple)."""
    if getattr(data, "job_id", None) or not hasattr(data, "_replace"):
        return data
    return data._replace(job_id=str(uuid.uuid4()))


def _callable_name(func: Any) -> str:
    if isinstance(func, str):
        return func
    module = getattr(func, "__module__", "") or ""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    return f"{module}.{name}" if module else str(name)


def push_on_commit(
    queue: str, push: Callable[[], object], *, jobs: Iterable[tuple[str, str]] = ()
) -> None:
    """Run ``push`` when the surrounding transaction commits.

    The transaction has committed by then, so a push that fails (Redis down) cannot be undone
    or usefully raised: it is logged at ERROR, naming each job, and each job's ``FlyJob`` row
    says its enqueue failed. ``jobs`` are ``(job id, function)`` pairs.
    """
    planned = list(jobs)

    def run() -> None:
        try:
            push()
        except CONTROL_FLOW:
            raise
        except Exception as exc:
            _push_failed(queue, planned, exc)

    transaction.on_commit(run)


def _push_failed(queue: str, jobs: list[tuple[str, str]], exc: Exception) -> None:
    from django_flyworkers import ledger

    reason = f"enqueue failed after the transaction committed: {type(exc).__name__}: {exc}"
    for job_id, func_name in jobs or [("?", "?")]:
        logger.error(
            "flyworkers: job %s (%s) on queue %s was NOT enqueued: %s",
            job_id,
            func_name,
            queue,
            reason,
            exc_info=exc,
        )
    try:
        ledger.record_enqueue_failed(queue, [job for job in jobs if job[0] != "?"], reason)
    except Exception:
        logger.exception("flyworkers: could not record the failed enqueue on queue %s", queue)
