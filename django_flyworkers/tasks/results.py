"""An RQ job read back as a Django ``TaskResult``: status, value, errors, Machines, times."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone
from django.utils.module_loading import import_string
from rq.job import Job, JobStatus

from django_flyworkers.tasks._compat import (
    DEFAULT_TASK_PRIORITY,
    Task,
    TaskError,
    TaskResult,
    TaskResultDoesNotExist,
    TaskResultStatus,
)

META_KEY = "django_task"
"""The RQ job's ``meta`` entry that marks it as a Task and keeps what RQ does not."""

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


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def iso(moment: datetime) -> str:
    if timezone.is_naive(moment):
        moment = timezone.make_aware(moment)
    return moment.isoformat()


def local(moment: datetime | str | None) -> datetime | None:
    """A time from rq (aware UTC) or our meta (ISO text) as Django wants it (USE_TZ)."""
    if moment is None:
        return None
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    if timezone.is_naive(moment):
        moment = moment.replace(tzinfo=UTC)  # rq's naive times are UTC
    return moment if settings.USE_TZ else timezone.make_naive(moment)


def not_before(moment: datetime) -> datetime:
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
    found = [(local(e["at"]), e["class"], e["traceback"]) for e in caught]
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
        found.append((local(item.created_at), path, text))
    found.sort(key=lambda error: error[0].timestamp() if error[0] else 0.0)
    return [TaskError(exception_class_path=path, traceback=text) for _, path, text in found]


def _ledger_error(job_id: str) -> str:
    from django_flyworkers.models import FlyJob

    row = FlyJob.objects.filter(job_id=job_id).values_list("error", flat=True).first()
    return row or ""


def result_from_job(job: Job, *, status: Any = None) -> Any:
    info = job.meta[META_KEY]
    found = import_string(info["path"])
    if not isinstance(found, Task):
        raise TaskResultDoesNotExist(f"{info['path']} is not a Task any more (job {job.id})")
    run_after = local(info.get("run_after"))
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
        enqueued_at=local(info.get("enqueued_at")),
        started_at=local(info.get("started_at")),
        last_attempted_at=local(job.started_at),
        finished_at=local(job.ended_at) if finished else None,
        args=list(job.args),
        kwargs=dict(job.kwargs),
        backend=info["backend"],
        errors=_errors(job),
        worker_ids=list(info.get("workers", [])),
    )
    if status == TaskResultStatus.SUCCESSFUL:
        object.__setattr__(result, "_return_value", job.return_value())
    return result
