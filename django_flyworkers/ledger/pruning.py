"""Pruning: history older than the retention goes; rows still waiting or running stay."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from django_flyworkers.ledger.common import (
    FINAL,
)
from django_flyworkers.models import FlyJob, JobAttempt, MachineRun, ScaleEvent


def prunable(before: datetime, queues: Iterable[str]) -> tuple[Any, Any]:
    """The FlyJob and ScaleEvent querysets :func:`prune` would delete (for ``--dry-run``)."""
    queues = list(queues)
    jobs = FlyJob.objects.filter(status__in=FINAL, updated_at__lt=before, queue__in=queues)
    events = ScaleEvent.objects.filter(created_at__lt=before, queue__in=queues)
    return jobs, events


def prune(before: datetime, queues: Iterable[str]) -> tuple[int, int]:
    """Delete history of ``queues`` older than ``before``: (jobs, scale events) deleted.

    Only jobs in a final state go; a job still waiting or running keeps its row however old.
    """
    jobs, events = prunable(before, queues)
    return jobs.delete()[0], events.delete()[0]


def prune_runs(before: datetime, queues: Iterable[str], *, dry_run: bool = False) -> int:
    """Delete Machine runs that ended, and job attempts, older than ``before``."""
    queues = list(queues)
    runs = MachineRun.objects.filter(stopped_at__lt=before, queue__in=queues)
    attempts = JobAttempt.objects.filter(ended_at__lt=before, queue__in=queues)
    if dry_run:
        return runs.count() + attempts.count()
    return runs.delete()[0] + attempts.delete()[0]
