"""The configured queues by name, one per process (:func:`get_queue`)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import django_rq
from rq.queue import Queue

from django_flyworkers.exceptions import UnknownQueue


def unknown_queue_message(name: str, configured: Iterable[str]) -> str:
    """The message of :class:`UnknownQueue` for ``name``, listing the configured queues."""
    known = ", ".join(sorted(configured)) or "none"
    return f"queue {name!r} is not in RQ_QUEUES (configured: {known})"


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

        configured = getattr(settings, "RQ_QUEUES", None) or {}
        raise UnknownQueue(unknown_queue_message(name, configured)) from None
    _queues[key] = queue
    return queue


def forget_queues(**kwargs: Any) -> None:
    """``setting_changed`` receiver: queues are rebuilt from the new RQ settings."""
    if kwargs.get("setting") in (None, "RQ_QUEUES", "RQ"):
        _queues.clear()
