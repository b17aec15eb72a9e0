"""What runs in the work horse: a Task called as its RQ job."""

from __future__ import annotations

import logging
import os
import socket
import traceback
from typing import Any

from django.utils import timezone
from django.utils.module_loading import import_string
from rq import get_current_job
from rq.job import Job

from django_flyworkers.tasks._compat import (
    Task,
    TaskContext,
    TaskError,
    TaskResultStatus,
    normalize_json,
    task_backends,
    task_finished,
    task_started,
)
from django_flyworkers.tasks.results import META_KEY, class_path, iso, result_from_job

logger = logging.getLogger("django_flyworkers.tasks")

RUNNER = "execute"
"""The :class:`FlyTask` method rq calls: the job function is ``<task path>.execute``."""

FALLBACK_RUNNER = "django_flyworkers.tasks.execute_task"
"""The job function for a Task of another class (made for another backend, then ``.using``)."""


class FlyTask(Task):
    """What ``@task`` makes for a :class:`FlyTaskBackend`: Django's Task, runnable by rq.

    rq imports the job function ``<module>.<task>.execute`` and calls it in the work horse.
    """

    __slots__ = ()

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task as the current RQ job (called by rq in a worker, not by you)."""
        return _execute(self, args, kwargs)


def execute_task(*args: Any, **kwargs: Any) -> Any:
    """Job function for a Task that is not a :class:`FlyTask`: it is named in the job's meta."""
    job = _current_job()
    found = import_string(job.meta[META_KEY]["path"])
    return _execute(found, args, kwargs)


def _current_job() -> Job:
    job = get_current_job()
    if job is None or META_KEY not in job.meta:
        raise RuntimeError(
            "a Task's execute() is called by an rq worker for its job; to run a task inline, "
            "use task.call(...)"
        )
    return job


def _quietly_save_meta(job: Job) -> None:
    # Bookkeeping must not replace the task's own exception with a Redis error.
    try:
        job.save_meta()
    except Exception:
        logger.exception("flyworkers: could not save the meta of task job %s", job.id)


def _worker_id(job: Job) -> str:
    # The Fly Machine is what the ledger and the admin know a worker by.
    return os.environ.get("FLY_MACHINE_ID") or job.worker_name or socket.gethostname()


def _execute(found: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    job = _current_job()
    info = job.meta[META_KEY]
    info.setdefault("workers", []).append(_worker_id(job))
    info.setdefault("started_at", iso(job.started_at or timezone.now()))
    job.save_meta()
    backend = task_backends[info["backend"]]
    result = result_from_job(job, status=TaskResultStatus.RUNNING)
    task_started.send(type(backend), task_result=result)
    try:
        if found.takes_context:
            value = found.call(TaskContext(task_result=result), *args, **kwargs)
        else:
            value = found.call(*args, **kwargs)
        # As Django's own backends do: a return value that is not JSON fails the task.
        value = normalize_json(value)
    except Exception as exc:
        error = {
            "class": class_path(type(exc)),
            "traceback": "".join(traceback.format_exception(exc)),
            "at": iso(timezone.now()),
        }
        # rq keeps no traceback of an attempt it retries: keep every attempt's here.
        info.setdefault("errors", []).append(error)
        _quietly_save_meta(job)
        object.__setattr__(result, "status", TaskResultStatus.FAILED)
        object.__setattr__(result, "finished_at", timezone.now())
        result.errors.append(
            TaskError(exception_class_path=error["class"], traceback=error["traceback"])
        )
        task_finished.send(type(backend), task_result=result)
        raise
    object.__setattr__(result, "status", TaskResultStatus.SUCCESSFUL)
    object.__setattr__(result, "finished_at", timezone.now())
    object.__setattr__(result, "_return_value", value)
    task_finished.send(type(backend), task_result=result)
    return value
