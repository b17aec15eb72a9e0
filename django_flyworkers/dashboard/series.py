"""The charts' series: running Machines, jobs and scaling actions per bucket of a window."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from django.db.models import Count, F, Q, Value
from django.db.models.functions import Coalesce

from django_flyworkers.conf import get_settings
from django_flyworkers.dashboard.sql import (
    EpochSeconds,
    bucket,
    percentiles,
    unindexed,
    wait_seconds,
)
from django_flyworkers.dashboard.window import Span, clamp
from django_flyworkers.models import FlyJob, MachineRun, ScaleEvent


@dataclass
class Charts:
    """Per-bucket series over a :class:`Span`."""

    span: Span
    finished: list[int]
    failed: list[int]
    wait_p95: list[float | None]
    running: list[float]
    events: dict[int, dict[str, int]]
    """bucket -> {"up": n, "down": n, "error": n}"""


UP_ACTIONS = frozenset({"create", "start", "wake", "resize"})


DOWN_ACTIONS = frozenset({"stop", "destroy", "suspend"})


def charts(window: Span, queues: Iterable[str] | None = None) -> Charts:
    """Jobs finished/failed, wait p95, Machines running and scaling events per bucket."""
    names = list(queues) if queues is not None else list(get_settings().queues)
    n, since, origin, width = window.count, window.start, window.origin, window.width
    finished, failed = [0] * n, [0] * n
    ended = (
        FlyJob.objects.filter(ended_at__gte=since, status__in=["finished", "failed"])
        .order_by()
        .alias(fw_queue=unindexed("queue"))
        .filter(fw_queue__in=names)
        .annotate(b=bucket("ended_at", origin, width))
        .values_list("b")
        .annotate(ok=Count("id", filter=Q(status="finished")),
                  bad=Count("id", filter=Q(status="failed")))
    )  # fmt: skip
    for index, ok, bad in ended:
        if 0 <= int(index) < n:
            finished[int(index)], failed[int(index)] = ok, bad
    wait: list[float | None] = [None] * n
    started = (
        FlyJob.objects.filter(started_at__gte=since, enqueued_at__isnull=False)
        .alias(fw_queue=unindexed("queue"))
        .filter(fw_queue__in=names)
    )
    for index, (p95,) in percentiles(
        started, wait_seconds(), bucket("started_at", origin, width), (0.95,)
    ).items():
        if index is not None and 0 <= int(index) < n:
            wait[int(index)] = clamp(p95)
    return Charts(window, finished, failed, wait, _running(window, names), _events(window, names))


def _running(window: Span, names: list[str]) -> list[float]:
    """Average Machines running per bucket: run seconds inside it over its width."""
    n, width, origin = window.count, window.width, window.origin
    totals = [0.0] * n
    start, end = EpochSeconds(F("started_at")), EpochSeconds(F("stopped_at"))
    runs = (
        MachineRun.objects.filter(queue__in=names)
        .filter(Q(stopped_at__isnull=True) | Q(stopped_at__gte=window.start))
        .filter(started_at__lt=datetime.fromtimestamp(window.end, UTC))
        .annotate(s=start, e=Coalesce(end, Value(window.now)))
        .values_list("s", "e")
    )
    for began, stopped in runs:
        began, stopped = max(began, origin), min(stopped, window.now)
        if stopped <= began:
            continue
        first = int((began - origin) // width)
        last = min(n - 1, int((stopped - origin) // width))
        if first == last:  # most runs: inside one bucket
            totals[first] += stopped - began
            continue
        # The first and last buckets in part, the ones between whole.
        totals[first] += origin + (first + 1) * width - began
        for index in range(first + 1, last):
            totals[index] += width
        totals[last] += min(stopped, origin + (last + 1) * width) - (origin + last * width)
    return [total / width for total in totals]


def _events(window: Span, names: list[str]) -> dict[int, dict[str, int]]:
    rows = (
        ScaleEvent.objects.filter(queue__in=names, created_at__gte=window.start)
        .order_by()
        .annotate(
            b=bucket("created_at", window.origin, window.width), fw_action=unindexed("action")
        )
        .values_list("b", "fw_action", "outcome")
        .annotate(n=Count("id"))
    )
    found: dict[int, dict[str, int]] = defaultdict(lambda: {"up": 0, "down": 0, "error": 0})
    for index, action, outcome, count in rows:
        if index is None or not 0 <= int(index) < window.count or action in ("list", "wait"):
            continue
        kind = "error" if outcome == "error" else "up" if action in UP_ACTIONS else "down"
        if outcome == "error" or action in UP_ACTIONS or action in DOWN_ACTIONS:
            found[int(index)][kind] += count
    return dict(found)
