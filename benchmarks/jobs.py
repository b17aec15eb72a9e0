"""Jobs the benchmarks enqueue; worker Machines import them from here (the repo root is on
their path: ``tests/manage.py`` puts it there)."""

from __future__ import annotations

import time

from django_flyworkers import flyjob


@flyjob("default")
def sleep_for(seconds: float) -> float:
    """Stand-in for real work: hold the worker for ``seconds``."""
    time.sleep(seconds)
    return seconds


@flyjob("default")
def noop() -> None:
    """The cheapest job: what is left of a cold start is the start."""
