"""FlyTaskBackend: Django Tasks pushed as RQ jobs through FlyQueue."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.core import checks
from django.db import transaction
from django.utils import timezone
from django_rq.queues import get_result_ttl
from rq import Retry
from rq.job import Job, JobStatus

from django_flyworkers.exceptions import UnknownQueue
from django_flyworkers.queue import get_queue
from django_flyworkers.tasks._compat import (
    DEFAULT_TASK_PRIORITY,
    BaseTaskBackend,
    InvalidTaskBackend,
    TaskResult,
    TaskResultDoesNotExist,
    TaskResultStatus,
    task_enqueued,
)
from django_flyworkers.tasks.execution import FALLBACK_RUNNER, RUNNER, FlyTask
from django_flyworkers.tasks.options import E_OPTIONS, E_QUEUE, OPTION_DEFAULTS, parse_options
from django_flyworkers.tasks.results import META_KEY, iso, local, not_before, result_from_job


class FlyTaskBackend(BaseTaskBackend):
    """Runs Django Tasks as RQ jobs on flyworkers' queues (and so on Fly Machines).

    ``QUEUES`` names django-rq queues (``RQ_QUEUES``); ``OPTIONS``: ``ENQUEUE_ON_COMMIT``
    (default True), ``RESULT_TTL`` and ``TIMEOUT`` (seconds; default: the queue's), ``RETRY``
    (retries after a failure, default 0).
    """

    task_class = FlyTask
    supports_defer = True
    supports_async_task = True  # Task.call runs a coroutine function to completion
    supports_get_result = True
    supports_priority = True  # two bands: above 0 -> front of the queue, else back

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        self.config, self.problems = parse_options(params.get("OPTIONS"))

    # Django's signature: enqueue(task, args, kwargs) with args a tuple/list.
    def enqueue(self, task: Any, args: Any, kwargs: Any) -> Any:
        """Push ``task`` with ``args``/``kwargs`` (after the commit when inside atomic())."""
        self.validate_task(task)
        if self.problems:
            raise InvalidTaskBackend(f"TASKS[{self.alias!r}]: {'; '.join(self.problems)}")
        queue = get_queue(task.queue_name)
        result = _ready_result(task, args, kwargs, self.alias)
        run_after = _run_after(task)
        info: dict[str, Any] = {
            "path": task.module_path,
            "backend": self.alias,
            "priority": task.priority,
            "run_after": iso(run_after) if run_after else None,
        }
        config = self.config
        if isinstance(task, FlyTask):
            func: str = f"{task.module_path}.{RUNNER}"
        else:
            func = FALLBACK_RUNNER
        ttl = get_result_ttl(queue.name) if config.result_ttl is None else config.result_ttl
        job = queue.create_job(
            func,
            args=result.args,
            kwargs=result.kwargs,
            timeout=config.timeout,
            result_ttl=ttl,
            meta={META_KEY: info},
            status=JobStatus.SCHEDULED if run_after else JobStatus.QUEUED,
            retry=Retry(max=config.retry) if config.retry else None,
        )
        object.__setattr__(result, "id", job.id)

        def push() -> None:
            now = timezone.now()
            info["enqueued_at"] = iso(now)
            if run_after is None:
                queue.enqueue_job(job, at_front=task.priority > DEFAULT_TASK_PRIORITY)
            else:
                queue.schedule_job(job, not_before(run_after))
            object.__setattr__(result, "enqueued_at", local(now))
            task_enqueued.send(type(self), task_result=result)

        if config.enqueue_on_commit:
            # Runs at once outside a transaction; inside one, at commit, never on rollback.
            transaction.on_commit(push)
        else:
            push()
        return result

    def get_result(self, result_id: str) -> Any:
        """The TaskResult of ``result_id`` as Redis has it now, from any process."""
        for connection, serializer in self._stores():
            job = Job.fetch_many([result_id], connection=connection, serializer=serializer)[0]
            if job is not None and META_KEY in job.meta:
                return result_from_job(job)
        raise TaskResultDoesNotExist(result_id)

    def _stores(self) -> Iterable[tuple[Any, Any]]:
        """(Redis connection, serializer) of each queue this backend uses, once per server."""
        names = sorted(self.queues) or sorted(getattr(settings, "RQ_QUEUES", {}) or {})
        seen = set()
        for name in names:
            try:
                queue = get_queue(name)
            except UnknownQueue:
                continue  # reported by check()
            key = (repr(queue.connection.connection_pool), queue.serializer)
            if key not in seen:
                seen.add(key)
                yield queue.connection, queue.serializer

    def check(self, **kwargs: Any) -> list[checks.CheckMessage]:
        """Django's task checks call this: OPTIONS and QUEUES of this backend."""
        messages = list(super().check(**kwargs))
        where = f"TASKS[{self.alias!r}]"
        for problem in self.problems:
            messages.append(
                checks.Error(
                    f"{where}: {problem}",
                    hint="FlyTaskBackend OPTIONS: " + ", ".join(OPTION_DEFAULTS),
                    id=E_OPTIONS,
                )
            )
        known = getattr(settings, "RQ_QUEUES", {}) or {}
        for name in sorted(self.queues):
            if name not in known:
                messages.append(
                    checks.Error(
                        f"{where}: queue {name!r} is not in RQ_QUEUES",
                        hint=f"Add {name!r} to RQ_QUEUES (and to FLYWORKERS['QUEUES'] to start "
                        "Machines for it), or remove it from QUEUES.",
                        id=E_QUEUE,
                    )
                )
        return messages


def _ready_result(task: Any, args: Any, kwargs: Any, alias: str) -> Any:
    """A new TaskResult, ready, of ``task`` called with ``args`` and ``kwargs``.

    Normalises args/kwargs through JSON; raises TypeError for anything that is not JSON.
    """
    return TaskResult(
        task=task,
        id="",
        status=TaskResultStatus.READY,
        enqueued_at=None,
        started_at=None,
        last_attempted_at=None,
        finished_at=None,
        args=list(args),
        kwargs=dict(kwargs),
        backend=alias,
        errors=[],
        worker_ids=[],
    )


def _run_after(task: Any) -> Any:
    """When ``task`` may run (aware), or None when it may run now."""
    run_after = task.run_after
    if run_after is not None and timezone.is_naive(run_after):
        run_after = timezone.make_aware(run_after)
    if run_after is not None and run_after <= timezone.now():
        return None  # due already: no reason to wait for the reconciler
    return run_after
