"""Everything the dashboard page shows, read in a fixed number of queries.

Redis says what is queued, scheduled, running and failed right now, and who serves each queue;
the ledger says what happened (jobs, Machine runs, scaling events). Each function below makes
the same number of SQL queries however many rows there are: aggregates and window functions
run in the database, and lists are capped.

The reads live in modules named for what they show: :mod:`.window` (the chart windows),
:mod:`.cards` (one card per queue), :mod:`.series` (the charts), :mod:`.timeline` (the Machine
timeline) and :mod:`.lists` (failed jobs, scaling events). Every name is re-exported here.
"""

from __future__ import annotations

from django_flyworkers.dashboard.cards import (
    FAILURE_RATE,
    LATE_AFTER,
    MACHINE_GROUPS,
    QueueCard,
    cards,
    overlap,
)
from django_flyworkers.dashboard.lists import (
    LIST_ROWS,
    FailedJob,
    failed_jobs,
    in_failed_registry,
    recent_events,
)
from django_flyworkers.dashboard.series import DOWN_ACTIONS, UP_ACTIONS, Charts, charts
from django_flyworkers.dashboard.timeline import TIMELINE_JOBS, TIMELINE_ROWS, TimelineRow, timeline
from django_flyworkers.dashboard.window import DAY, WINDOWS, Span, clamp, span

__all__ = [
    "DAY",
    "DOWN_ACTIONS",
    "FAILURE_RATE",
    "LATE_AFTER",
    "LIST_ROWS",
    "MACHINE_GROUPS",
    "TIMELINE_JOBS",
    "TIMELINE_ROWS",
    "UP_ACTIONS",
    "WINDOWS",
    "Charts",
    "FailedJob",
    "QueueCard",
    "Span",
    "TimelineRow",
    "cards",
    "charts",
    "clamp",
    "failed_jobs",
    "in_failed_registry",
    "overlap",
    "recent_events",
    "span",
    "timeline",
]
