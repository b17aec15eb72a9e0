"""The Machine timeline: each Machine's runs and the jobs it ran within a window."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from django.db.models import F, Max, Q

from django_flyworkers.conf import get_settings
from django_flyworkers.dashboard.sql import (
    EpochSeconds,
)
from django_flyworkers.dashboard.window import Span
from django_flyworkers.models import FlyJob, MachineRun

TIMELINE_ROWS = 20


TIMELINE_JOBS = 4000


@dataclass
class TimelineRow:
    """One Machine: its runs and the jobs inside them, as epoch seconds."""

    pk: int
    machine_id: str
    queue: str
    state: str
    runs: list[tuple[float, float, bool]] = field(default_factory=list)
    """(start, end, still running)"""
    jobs: list[tuple[float, float, int, str, str]] = field(default_factory=list)
    """(start, end, FlyJob pk, function, status)"""


def timeline(window: Span, queues: Iterable[str] | None = None) -> tuple[list[TimelineRow], bool]:
    """The Machines that ran last in ``window`` (at most TIMELINE_ROWS), and whether jobs were
    left out to keep the drawing small."""
    names = list(queues) if queues is not None else list(get_settings().queues)
    start, until = window.start, datetime.fromtimestamp(window.end, UTC)
    in_window = (
        MachineRun.objects.filter(queue__in=names, started_at__lt=until)
        .filter(Q(stopped_at__isnull=True) | Q(stopped_at__gte=start))
    )  # fmt: skip
    newest = (
        in_window.values_list("machine", "machine__machine_id", "machine__queue", "machine__state")
        .annotate(last=Max("started_at"))
        .order_by("-last")[:TIMELINE_ROWS]
    )
    rows = {pk: TimelineRow(pk, mid, queue, state) for pk, mid, queue, state, _ in newest}
    runs = in_window.filter(machine__in=list(rows)).annotate(
        s=EpochSeconds(F("started_at")), e=EpochSeconds(F("stopped_at"))
    ).values_list("machine", "s", "e").order_by("started_at")  # fmt: skip
    for pk, began, stopped in runs:
        rows[pk].runs.append(
            (began, stopped if stopped is not None else window.now, stopped is None)
        )
    jobs = (
        FlyJob.objects.filter(machine__in=list(rows), started_at__gte=start)
        .annotate(s=EpochSeconds(F("started_at")), e=EpochSeconds(F("ended_at")))
        .values_list("machine", "s", "e", "pk", "func_name", "status")
        .order_by("-started_at")[: TIMELINE_JOBS + 1]
    )
    found = list(jobs)
    for pk, began, ended, job_pk, func, status in found[:TIMELINE_JOBS]:
        end = ended if ended is not None else window.now
        rows[pk].jobs.append((began, end, job_pk, func, status))
    return list(rows.values()), len(found) > TIMELINE_JOBS
