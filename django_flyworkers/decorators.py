"""``@flyjob``: a django-rq style job decorator that resolves its queue at call time.

::

    @flyjob("images", timeout=600, retry=3)
    def make_thumbnail(photo_id): ...

    job = make_thumbnail.delay(42)            # an rq Job; job.id is known at once
    make_thumbnail.enqueue_in(timedelta(minutes=5), 42)
    make_thumbnail.using(queue="default", at_front=True).delay(42)

Inside ``transaction.atomic()`` (django-rq's default ``on_db_commit`` commit mode) the push
waits for the commit and vanishes on rollback, but ``.delay()`` still returns the Job with its
final id. If Redis refuses that push after the commit, the failure is logged and recorded in the
job's ``FlyJob`` row rather than raised (see :func:`~django_flyworkers.queue.push_on_commit`).
Arguments are serialized at call time, so a value the serializer rejects, or one a worker could
not load (defined in ``__main__``), raises
:class:`~django_flyworkers.exceptions.UnserializableArguments` in the caller, not later.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, ParamSpec, Protocol, TypeVar, cast, overload

from django.db import connection
from django_rq.queues import get_result_ttl
from rq import Retry
from rq.job import Job, JobStatus

from django_flyworkers.dedicated import enqueue_meta
from django_flyworkers.queue import FlyQueue, check_serializable, get_queue, push_on_commit

P = ParamSpec("P")
R = TypeVar("R")

JOB_OPTIONS = frozenset(
    {
        "queue",
        "timeout",
        "result_ttl",
        "ttl",
        "failure_ttl",
        "retry",
        "at_front",
        "job_id",
        "meta",
        "description",
        "depends_on",
        "on_success",
        "on_failure",
        "on_stopped",
        "dedicated",
        "guest",
    }
)


def _retry(value: int | Retry | None) -> Retry | None:
    if value is None or isinstance(value, Retry):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"retry must be a non-negative int or an rq.Retry, got {value!r}")
    return Retry(max=value) if value else None


class FlyJobFunction(Generic[P, R]):
    """The enqueueing side of a job function; ``@flyjob`` attaches its methods to the function.

    The function itself stays a plain module-level function (so ``queue.enqueue(func)`` and
    pickling keep working, as with django-rq's ``@job``); ``func.delay``, ``func.enqueue_in``,
    ``func.enqueue_at`` and ``func.using`` come from here.
    """

    def __init__(self, func: Callable[P, R], options: dict[str, Any]) -> None:
        unknown = set(options) - JOB_OPTIONS
        if unknown:
            raise TypeError(f"unknown @flyjob option(s): {', '.join(sorted(unknown))}")
        if "<locals>" in getattr(func, "__qualname__", ""):
            raise TypeError(
                f"@flyjob needs a module-level function; {func.__qualname__} is defined inside "
                "another function, so a worker could not import it."
            )
        self.func = func
        self.options = options

    def __repr__(self) -> str:
        return f"<flyjob {self.func.__module__}.{self.func.__qualname__} queue={self.queue_name!r}>"

    @property
    def queue_name(self) -> str:
        return str(self.options.get("queue", "default"))

    def using(self, **options: Any) -> FlyJobFunction[P, R]:
        """A copy with per-call options: ``queue``, ``at_front``, ``timeout``, ``job_id`` ..."""
        return FlyJobFunction(self.func, {**self.options, **options})

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        """Enqueue now (or when the surrounding transaction commits)."""
        return self._push(None, args, kwargs)

    enqueue = delay

    def enqueue_at(self, when: datetime, *args: P.args, **kwargs: P.kwargs) -> Job:
        """Schedule for ``when`` (naive datetimes are taken as UTC)."""
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return self._push(when, args, kwargs)

    def enqueue_in(self, delay: timedelta, *args: P.args, **kwargs: P.kwargs) -> Job:
        """Schedule for ``delay`` from now."""
        return self._push(datetime.now(UTC) + delay, args, kwargs)

    def _push(self, when: datetime | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Job:
        options = self.options
        queue = get_queue(self.queue_name)
        # A Machine of its own (dedicated=True, guest=...): checked now, nothing pushed if wrong.
        meta = {**(options.get("meta") or {}), **enqueue_meta(queue.name, options)}
        result_ttl = options.get("result_ttl", get_result_ttl(queue.name))
        job = queue.create_job(
            self.func,
            args=args,
            kwargs=kwargs,
            timeout=options.get("timeout"),
            result_ttl=result_ttl,
            ttl=options.get("ttl"),
            failure_ttl=options.get("failure_ttl"),
            description=options.get("description"),
            depends_on=options.get("depends_on"),
            job_id=options.get("job_id"),
            meta=meta or options.get("meta"),
            status=JobStatus.SCHEDULED if when else JobStatus.QUEUED,
            retry=_retry(options.get("retry")),
            on_success=options.get("on_success"),
            on_failure=options.get("on_failure"),
            on_stopped=options.get("on_stopped"),
        )
        if not isinstance(queue, FlyQueue):  # FlyQueue.create_job checked it already
            check_serializable(job, queue.serializer)

        at_front = bool(options.get("at_front", False))

        def push() -> None:
            if when is None:
                queue.enqueue_job(job, at_front=at_front)
            else:
                queue.schedule_job(job, when)

        if getattr(queue, "_commit_mode", "auto") == "on_db_commit" and connection.in_atomic_block:
            push_on_commit(queue.name, push, jobs=[(job.id, str(job.func_name))])
        else:
            push()
        return job


class FlyJobCallable(Protocol[P, R]):
    """What ``@flyjob`` returns: the function, plus the enqueueing methods."""

    flyjob: FlyJobFunction[P, R]
    delay: Callable[P, Job]
    enqueue: Callable[P, Job]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R: ...
    def enqueue_in(self, delay: timedelta, *args: P.args, **kwargs: P.kwargs) -> Job: ...
    def enqueue_at(self, when: datetime, *args: P.args, **kwargs: P.kwargs) -> Job: ...
    def using(self, **options: Any) -> FlyJobFunction[P, R]: ...


def _attach(func: Callable[P, R], options: dict[str, Any]) -> FlyJobCallable[P, R]:
    binder = FlyJobFunction(func, options)
    target: Any = func
    target.flyjob = binder
    target.delay = binder.delay
    target.enqueue = binder.delay
    target.enqueue_in = binder.enqueue_in
    target.enqueue_at = binder.enqueue_at
    target.using = binder.using
    return cast(FlyJobCallable[P, R], target)


@overload
def flyjob(queue: Callable[P, R]) -> FlyJobCallable[P, R]: ...
@overload
def flyjob(
    queue: str = "default", **options: Any
) -> Callable[[Callable[P, R]], FlyJobCallable[P, R]]: ...


def flyjob(queue: Any = "default", **options: Any) -> Any:
    """Decorate a module-level function as a job for ``queue`` (resolved when enqueueing).

    Options: ``timeout``, ``result_ttl``, ``ttl``, ``failure_ttl``, ``retry`` (an int or an
    ``rq.Retry``), ``at_front``, ``meta``, ``description``, ``on_success``, ``on_failure``,
    ``on_stopped``; ``dedicated=True`` (only ever on a Machine of its own: the queue's
    ``MODE`` must be ``"dedicated"``) and ``guest`` (that Machine's size, usually per call
    with ``.using(guest=...)``). ``@flyjob`` without arguments uses the ``default`` queue.
    """
    if callable(queue):
        return _attach(queue, {"queue": "default"})

    def decorate(func: Callable[P, R]) -> FlyJobCallable[P, R]:
        return _attach(func, {"queue": queue, **options})

    return decorate
