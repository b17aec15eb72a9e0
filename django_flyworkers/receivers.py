"""Signal receivers wired in ``AppConfig.ready()``: the ledger row, then the wake-up."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.core.signals import setting_changed
from rq.job import Job

from django_flyworkers import conf, ledger, signals
from django_flyworkers.models import FlyJob
from django_flyworkers.queue import forget_queues

FORCE_SYNC = False
"""Set in worker processes: a work horse leaves with ``os._exit`` and would kill a wake thread."""


def request_wake(queue: str) -> None:
    """Wake ``queue`` as ``WAKE_MODE`` says: on the waker thread, inline, or not at all."""
    mode = conf.get_settings().wake_mode
    if mode == "off" or conf.get_settings().profile(queue) is None:
        return
    from django_flyworkers.scaling.background import waker

    if mode == "sync" or FORCE_SYNC:
        from django_flyworkers.scaling.scaler import wake

        outcome = wake(queue)
        # A worker's horse cannot keep a retry thread; the reconciler is its backstop.
        if outcome is not None and outcome.errors and not FORCE_SYNC:
            waker.retry_later(queue)
    else:
        waker.submit(queue)


def on_enqueued(sender: Any, queue: str, jobs: list[Job], **kwargs: Any) -> None:
    try:
        ledger.record_enqueued(queue, jobs)
    finally:
        # Even if the ledger write failed, the job is in Redis and needs a worker, unless it
        # went to a Redis no worker of the queue reads (logged and recorded by the check).
        if _on_configured_redis(queue, jobs):
            request_wake(queue)


def _on_configured_redis(queue: str, jobs: list[Job]) -> bool:
    if not jobs or conf.get_settings().profile(queue) is None:
        return True
    from django_flyworkers.scaling.scaler import check_connection

    return check_connection(queue, jobs[0].connection)


def on_scheduled(sender: Any, queue: str, jobs: list[Job], at: datetime, **kwargs: Any) -> None:
    ledger.record_enqueued(queue, jobs, status=FlyJob.Status.SCHEDULED, scheduled_for=at)


def on_deferred(sender: Any, queue: str, jobs: list[Job], **kwargs: Any) -> None:
    ledger.record_enqueued(queue, jobs, status=FlyJob.Status.DEFERRED)


def connect() -> None:
    signals.job_enqueued.connect(on_enqueued, dispatch_uid="flyworkers.enqueued")
    signals.job_scheduled.connect(on_scheduled, dispatch_uid="flyworkers.scheduled")
    signals.job_deferred.connect(on_deferred, dispatch_uid="flyworkers.deferred")
    setting_changed.connect(conf.reset, dispatch_uid="flyworkers.settings")
    setting_changed.connect(forget_queues, dispatch_uid="flyworkers.queues")
