"""Signal receivers wired in ``AppConfig.ready()``: the ledger row, then the wake-up.

Where the work happens depends on ``WAKE_MODE``:

* ``"thread"``: the row and the wake-up are handed to the waker thread
  (:mod:`django_flyworkers.scaling.background`), which writes rows in batches and checks
  coverage after the push. The caller pays for its Redis push and little else.
* ``"sync"``: the row is written and the wake-up runs inline, before ``.delay()`` returns.
* ``"off"``: the row is written inline; nothing is woken.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.core.signals import setting_changed
from rq.job import Job

from django_flyworkers import conf, ledger, signals
from django_flyworkers.models import FlyJob
from django_flyworkers.queue import forget_queues


def request_wake(queue: str) -> None:
    """Wake ``queue`` as ``WAKE_MODE`` says: on the waker thread, inline, or not at all."""
    settings = conf.get_settings()
    if settings.wake_mode == "off" or settings.profile(queue) is None:
        return
    from django_flyworkers.scaling.background import waker

    if settings.wake_mode == "thread":
        waker.submit(queue)
    else:
        _wake_inline(queue)


def _wake_inline(queue: str) -> None:
    from django_flyworkers.scaling.background import waker
    from django_flyworkers.scaling.scaler import wake

    outcome = wake(queue)
    if outcome is not None and outcome.errors:
        waker.retry_later(queue)


def _record(
    queue: str, jobs: list[Job], status: str, scheduled_for: datetime | None, *, wake: bool
) -> None:
    settings = conf.get_settings()
    wake = wake and settings.wake_mode != "off" and settings.profile(queue) is not None
    # A job pushed on a Redis no worker of the queue reads gets no Machine (logged, recorded).
    wake = wake and _on_configured_redis(queue, jobs)
    if settings.wake_mode == "thread":
        from django_flyworkers.scaling.background import waker

        waker.enqueued(queue, ledger.notices(queue, jobs, status, scheduled_for), wake=wake)
        return
    try:
        ledger.record_enqueued(queue, jobs, status=status, scheduled_for=scheduled_for)
    finally:
        # Even if the ledger write failed, the job is in Redis and needs a worker.
        if wake:
            _wake_inline(queue)


def _on_configured_redis(queue: str, jobs: list[Job]) -> bool:
    if not jobs:
        return True
    from django_flyworkers.scaling.scaler import check_connection

    return check_connection(queue, jobs[0].connection)


def on_enqueued(sender: Any, queue: str, jobs: list[Job], **kwargs: Any) -> None:
    _record(queue, jobs, FlyJob.Status.QUEUED, None, wake=True)


def on_scheduled(sender: Any, queue: str, jobs: list[Job], at: datetime, **kwargs: Any) -> None:
    _record(queue, jobs, FlyJob.Status.SCHEDULED, at, wake=False)


def on_deferred(sender: Any, queue: str, jobs: list[Job], **kwargs: Any) -> None:
    _record(queue, jobs, FlyJob.Status.DEFERRED, None, wake=False)


def connect() -> None:
    signals.job_enqueued.connect(on_enqueued, dispatch_uid="flyworkers.enqueued")
    signals.job_scheduled.connect(on_scheduled, dispatch_uid="flyworkers.scheduled")
    signals.job_deferred.connect(on_deferred, dispatch_uid="flyworkers.deferred")
    setting_changed.connect(conf.reset, dispatch_uid="flyworkers.settings")
    setting_changed.connect(forget_queues, dispatch_uid="flyworkers.queues")
