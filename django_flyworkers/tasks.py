"""FlyTaskBackend: Django's tasks framework (``django.tasks``) on flyworkers' RQ queues.

::

    TASKS = {
        "default": {
            "BACKEND": "django_flyworkers.tasks.FlyTaskBackend",
            "QUEUES": ["default", "images"],
            "OPTIONS": {},
        }
    }

    @task(queue_name="images")
    def make_thumbnail(photo_id): ...

    result = make_thumbnail.enqueue(42)     # pushed through FlyQueue: ledger row, wake-up, caps
    make_thumbnail.get_result(result.id)    # from any process: status, return value, Machine

How a Task maps onto RQ:

* ``.enqueue()`` creates an RQ job on the queue named ``queue_name`` (a django-rq queue, so a
  ``FlyQueue``: the push is recorded in the ledger and wakes a Machine). The job's id is the
  ``TaskResult`` id. Arguments must survive a JSON round trip, as Django requires; the worker
  receives them after that round trip, exactly as Django's own backends pass them.
* The job's function is ``<task module path>.execute``: rq imports the Task object from the
  task's module and calls :meth:`FlyTask.execute`, which runs the function in the work horse
  (with the ``TaskContext`` if the task takes one), records the Machine id, sends Django's
  ``task_started`` / ``task_finished`` signals and returns the JSON-normalised value. Workers
  need nothing but ``FlyWorker``: no job class, no extra command.
* ``run_after`` in the future schedules the job (``schedule_job``); ``flyworkers_scale`` wakes
  a Machine when it comes due. ``run_after`` in the past is enqueued at once.
* ``priority``: RQ has one list per queue and can only push to its front or its back. A
  priority above 0 goes to the front (ahead of everything waiting; among such jobs, the
  newest runs first); 0 and below go to the back in arrival order.
* Inside ``transaction.atomic()`` the push waits for the commit and is dropped on rollback
  (option ``ENQUEUE_ON_COMMIT``, default True), like ``@flyjob``'s ``.delay()``.
* ``get_result(id)`` reads the job from Redis: status, return value, tracebacks, the Machine
  of each attempt; the ledger adds the reason when the reaper failed a job whose Machine died.
  Results live as long as the RQ job (``RESULT_TTL``).

Django 6 has ``django.tasks``; on Django 5.2 the ``django-tasks`` backport provides the same
API and this module uses it (``pip install django-tasks``). With neither, importing this
module raises ``ImproperlyConfigured`` saying so.
"""

from __future__ import annotations

import logging
import os
import socket
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.utils import timezone
from django.utils.module_loading import import_string
from django_rq.queues import get_result_ttl
from rq import Retry, get_current_job
from rq.job import Job, JobStatus

try:  # Django 6+
    from django.tasks import TaskContext, TaskResult, TaskResultStatus, task, task_backends
    from django.tasks.backends.base import BaseTaskBackend
    from django.tasks.base import DEFAULT_TASK_PRIORITY, Task, TaskError
    from django.tasks.exceptions import InvalidTask, InvalidTaskBackend, TaskResultDoesNotExist
    from django.tasks.signals import task_enqueued, task_finished, task_started
    from django.utils.json import normalize_json
except ImportError:  # Django 5.2: the django-tasks backport, same API under another name
    try:
        # Registers the backport's check_tasks (Django 6 does it in django.tasks itself).
        import django_tasks.checks  # noqa: F401
        from django_tasks import (  # type: ignore[no-redef,assignment]
            TaskContext,
            TaskResult,
            TaskResultStatus,
            task,
            task_backends,
        )
        from django_tasks.backends.base import BaseTaskBackend  # type: ignore[no-redef,assignment]
        from django_tasks.base import (  # type: ignore[no-redef,assignment]
            DEFAULT_TASK_PRIORITY,
            Task,
            TaskError,
        )
        from django_tasks.exceptions import (  # type: ignore[no-redef,assignment]
            InvalidTaskBackendError as InvalidTaskBackend,
        )
        from django_tasks.exceptions import (  # type: ignore[no-redef,assignment]
            InvalidTaskError as InvalidTask,
        )
        from django_tasks.exceptions import (  # type: ignore[no-redef,assignment]
            TaskResultDoesNotExist,
        )
        from django_tasks.signals import (  # type: ignore[no-redef,assignment]
            task_enqueued,
            task_finished,
            task_started,
        )
        from django_tasks.utils import normalize_json  # type: ignore[no-redef,assignment]
    except ImportError as exc:
        raise ImproperlyConfigured(
            "django_flyworkers.tasks needs Django's tasks framework: Django 6.0 or later, or "
            "on Django 5.2 the backport (pip install 'django-flyworkers[tasks]', which "
            "installs django-tasks)."
        ) from exc

from django_flyworkers.exceptions import UnknownQueue
from django_flyworkers.queue import get_queue

__all__ = [
    "E_OPTIONS",
    "E_QUEUE",
    "FlyTask",
    "FlyTaskBackend",
    "InvalidTask",
    "Task",
    "TaskContext",
    "TaskResult",
    "TaskResultDoesNotExist",
    "TaskResultStatus",
    "task",
    "task_backends",
]

logger = logging.getLogger("django_flyworkers.tasks")

E_OPTIONS = "flyworkers.E040"
"""System check id: the backend's ``OPTIONS`` are not valid."""
E_QUEUE = "flyworkers.E041"
"""System check id: a queue in the backend's ``QUEUES`` is not in ``RQ_QUEUES``."""

META_KEY = "django_task"
"""The RQ job's ``meta`` entry that marks it as a Task and keeps what RQ does not."""

RUNNER = "execute"
"""The :class:`FlyTask` method rq calls: the job function is ``<task path>.execute``."""

FALLBACK_RUNNER = "django_flyworkers.tasks.execute_task"
"""The job function for a Task of another class (made for another backend, then ``.using``)."""

STATUS = {
    JobStatus.QUEUED: TaskResultStatus.READY,
    JobStatus.SCHEDULED: TaskResultStatus.READY,
    JobStatus.DEFERRED: TaskResultStatus.READY,
    JobStatus.STARTED: TaskResultStatus.RUNNING,
    JobStatus.FINISHED: TaskResultStatus.SUCCESSFUL,
    JobStatus.FAILED: TaskResultStatus.FAILED,
    JobStatus.STOPPED: TaskResultStatus.FAILED,
    JobStatus.CANCELED: TaskResultStatus.FAILED,
}
"""RQ job status -> Task status. Anything else (rq 3's ``created``, none yet) is READY."""


# -- options --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """The backend's ``OPTIONS``, validated."""

    enqueue_on_commit: bool = True
    result_ttl: int | None = None
    timeout: int | None = None
    retry: int = 0


OPTION_DEFAULTS: Mapping[str, Any] = {
    "ENQUEUE_ON_COMMIT": True,
    "RESULT_TTL": None,
    "TIMEOUT": None,
    "RETRY": 0,
}
"""Every ``OPTIONS`` key and its default (``None``: the queue's django-rq default)."""


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_options(raw: Any) -> tuple[Options, list[str]]:
    """``OPTIONS`` -> (the options, problems). Bad values fall back to their defaults."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        return Options(), [f"OPTIONS must be a dict, got {type(raw).__name__}"]
    problems = [
        f"unknown OPTIONS key {key!r} (known: {', '.join(OPTION_DEFAULTS)})"
        for key in raw
        if key not in OPTION_DEFAULTS
    ]
    values = {**OPTION_DEFAULTS, **{k: v for k, v in raw.items() if k in OPTION_DEFAULTS}}
    rules = {
        "ENQUEUE_ON_COMMIT": (lambda v: isinstance(v, bool), "True or False"),
        "RESULT_TTL": (
            lambda v: v is None or (_whole(v) and v >= -1),
            "None, -1 (keep forever) or a number of seconds >= 0",
        ),
        "TIMEOUT": (lambda v: v is None or (_whole(v) and v > 0), "None or seconds > 0"),
        "RETRY": (lambda v: _whole(v) and v >= 0, "a whole number >= 0"),
    }
    for key, (ok, expected) in rules.items():
        if not ok(values[key]):
            problems.append(f"OPTIONS[{key!r}] must be {expected}, got {values[key]!r}")
            values[key] = OPTION_DEFAULTS[key]
    options = Options(
        enqueue_on_commit=values["ENQUEUE_ON_COMMIT"],
        result_ttl=values["RESULT_TTL"],
        timeout=values["TIMEOUT"],
        retry=values["RETRY"],
    )
    return options, problems


# -- the task class and what runs in the worker ----------------------------------------------


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
    info.setdefault("started_at", _iso(job.started_at or timezone.now()))
    job.save_meta()
    backend = task_backends[info["backend"]]
    result = _result_from_job(job, status=TaskResultStatus.RUNNING)
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
            "class": _class_path(type(exc)),
            "traceback": "".join(traceback.format_exception(exc)),
            "at": _iso(timezone.now()),
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


# -- RQ job -> TaskResult --------------------------------------------------------------------


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _iso(moment: datetime) -> str:
    if timezone.is_naive(moment):
        moment = timezone.make_aware(moment)
    return moment.isoformat()


def _local(moment: datetime | str | None) -> datetime | None:
    """A time from rq (aware UTC) or our meta (ISO text) as Django wants it (USE_TZ)."""
    if moment is None:
        return None
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    if timezone.is_naive(moment):
        moment = moment.replace(tzinfo=UTC)  # rq's naive times are UTC
    return moment if settings.USE_TZ else timezone.make_naive(moment)


def _not_before(moment: datetime) -> datetime:
    """``moment`` rounded up to a whole second.

    rq keeps scheduled times in whole seconds, rounded down: a task due at 12:00:00.6 would be
    taken at 12:00:00. Django's ``run_after`` is the earliest it may run, so round up instead.
    """
    if moment.microsecond:
        moment = moment.replace(microsecond=0) + timedelta(seconds=1)
    return moment


def _exception_path(text: str) -> str:
    """The exception class named by a formatted traceback's final line, as Python prints it.

    Python prints ``module.Class: message`` (``Class`` alone for builtins) on the first line
    that is not indented after the last ``File ...`` frame.
    """
    lines = text.rstrip("\n").splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    if not frames:
        if "AbandonedJobError" in text:
            return "rq.exceptions.AbandonedJobError"
        return "builtins.Exception"
    for line in lines[frames[-1] + 1 :]:
        if line and not line.startswith(" "):
            name = line.split(":", 1)[0].strip()
            if name.replace(".", "").replace("_", "").isalnum():
                return name if "." in name else f"builtins.{name}"
            break
    return "builtins.Exception"


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def _errors(job: Job) -> list[Any]:
    """Every failed attempt: what the runner caught, then what only rq saw.

    rq records a failure Result only for a final failure, and also for failures the runner
    never saw (the task's module did not import, the work horse was killed, the reaper failed
    the job of a dead Machine); those are added, the runner's own are not repeated.
    """
    from rq.results import Result

    caught = list(job.meta[META_KEY].get("errors", []))
    found = [(_local(e["at"]), e["class"], e["traceback"]) for e in caught]
    unmatched = {i: _last_line(e["traceback"]) for i, e in enumerate(caught)}
    for item in job.results():
        if item.type != Result.Type.FAILED or not item.exc_string:
            continue
        text = item.exc_string
        same = next((i for i, line in unmatched.items() if line == _last_line(text)), None)
        if same is not None:
            del unmatched[same]
            continue
        path = _exception_path(text)
        if path == "rq.exceptions.AbandonedJobError":
            # rq only says the job was abandoned; the reaper wrote down why (the Machine died).
            text = _ledger_error(job.id) or text
        found.append((_local(item.created_at), path, text))
    found.sort(key=lambda error: error[0].timestamp() if error[0] else 0.0)
    return [TaskError(exception_class_path=path, traceback=text) for _, path, text in found]


def _ledger_error(job_id: str) -> str:
    from django_flyworkers.models import FlyJob

    row = FlyJob.objects.filter(job_id=job_id).values_list("error", flat=True).first()
    return row or ""


def _result_from_job(job: Job, *, status: Any = None) -> Any:
    info = job.meta[META_KEY]
    found = import_string(info["path"])
    if not isinstance(found, Task):
        raise TaskResultDoesNotExist(f"{info['path']} is not a Task any more (job {job.id})")
    run_after = _local(info.get("run_after"))
    bound = found.using(
        priority=info.get("priority", DEFAULT_TASK_PRIORITY),
        queue_name=job.origin,
        backend=info["backend"],
        **({"run_after": run_after} if run_after else {}),
    )
    if status is None:
        status = STATUS.get(job.get_status(refresh=False), TaskResultStatus.READY)
    finished = status in (TaskResultStatus.SUCCESSFUL, TaskResultStatus.FAILED)
    result: Any = TaskResult(
        task=bound,
        id=job.id,
        status=status,
        enqueued_at=_local(info.get("enqueued_at")),
        started_at=_local(info.get("started_at")),
        last_attempted_at=_local(job.started_at),
        finished_at=_local(job.ended_at) if finished else None,
        args=list(job.args),
        kwargs=dict(job.kwargs),
        backend=info["backend"],
        errors=_errors(job),
        worker_ids=list(info.get("workers", [])),
    )
    if status == TaskResultStatus.SUCCESSFUL:
        object.__setattr__(result, "_return_value", job.return_value())
    return result


# -- the backend -----------------------------------------------------------------------------


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
        # Normalises args/kwargs through JSON; raises TypeError for anything that is not JSON.
        result: Any = TaskResult(
            task=task,
            id="",
            status=TaskResultStatus.READY,
            enqueued_at=None,
            started_at=None,
            last_attempted_at=None,
            finished_at=None,
            args=list(args),
            kwargs=dict(kwargs),
            backend=self.alias,
            errors=[],
            worker_ids=[],
        )
        run_after = task.run_after
        if run_after is not None and timezone.is_naive(run_after):
            run_after = timezone.make_aware(run_after)
        if run_after is not None and run_after <= timezone.now():
            run_after = None  # due already: no reason to wait for the reconciler
        info: dict[str, Any] = {
            "path": task.module_path,
            "backend": self.alias,
            "priority": task.priority,
            "run_after": _iso(run_after) if run_after else None,
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
            info["enqueued_at"] = _iso(now)
            if run_after is None:
                queue.enqueue_job(job, at_front=task.priority > DEFAULT_TASK_PRIORITY)
            else:
                queue.schedule_job(job, _not_before(run_after))
            object.__setattr__(result, "enqueued_at", _local(now))
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
                return _result_from_job(job)
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
