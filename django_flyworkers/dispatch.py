"""Sending flyworkers' job signals so that one failing receiver cannot break an enqueue.

Signals are dispatched receiver by receiver: an error in one receiver is logged and contained (the
job is in Redis and will run), except rq's control-flow exceptions (:data:`CONTROL_FLOW`: a stop
request, a job timeout, an imminent shutdown), which must reach rq and so propagate.
"""

from __future__ import annotations

import logging
from typing import Any

from asgiref.sync import async_to_sync
from django.dispatch import Signal
from rq.exceptions import ShutDownImminentException, StopRequested
from rq.timeouts import BaseTimeoutException

logger = logging.getLogger("django_flyworkers")


CONTROL_FLOW: tuple[type[BaseException], ...] = (
    StopRequested,
    BaseTimeoutException,
    ShutDownImminentException,
)
"""Exceptions rq raises inside whatever code runs to stop a worker or end a job (a warm
shutdown, a job timeout, an imminent shutdown): never swallow them."""


def dispatch(signal: Signal, sender: Any, **named: Any) -> None:
    """Send ``signal`` to each receiver; contain their errors but let :data:`CONTROL_FLOW` through.

    ``Signal.send_robust`` would turn rq's stop request or a job timeout raised inside a receiver
    into a logged error, and the worker would carry on.
    """
    live = getattr(signal, "_live_receivers", None)
    found: Any = live(sender) if live is not None else None
    # Django 5.0+ answers (sync receivers, async receivers); anything else: the public API.
    shaped = isinstance(found, tuple) and len(found) == 2
    sync_receivers, async_receivers = found if shaped else (None, [])
    if sync_receivers is None:
        for receiver, result in signal.send_robust(sender, **named):
            if isinstance(result, CONTROL_FLOW):
                raise result
            if isinstance(result, Exception):
                _receiver_failed(receiver, named, result)
        return
    calls = [*sync_receivers, *(async_to_sync(r) for r in async_receivers)]
    for receiver in calls:
        try:
            receiver(signal=signal, sender=sender, **named)
        except CONTROL_FLOW:
            raise
        except Exception as exc:
            # A receiver failing must never turn a successful push into an error for the
            # caller: the job is in Redis and will run.
            _receiver_failed(receiver, named, exc)


def _receiver_failed(receiver: Any, named: dict[str, Any], exc: BaseException) -> None:
    logger.error(
        "flyworkers: job signal receiver %r failed for queue %s",
        receiver,
        named.get("queue"),
        exc_info=exc,
    )
