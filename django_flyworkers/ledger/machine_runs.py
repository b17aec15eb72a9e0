"""Machine runs: each billed stretch of a Machine, from start to stop (read by the dashboard)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from django.db.models import Q
from django.utils import timezone

from django_flyworkers.models import MachineRun, WorkerMachine

RUN_END_STATES = {
    "stopped": "stopped",
    "suspended": "suspended",
    "failed": "failed",
    "destroying": "destroyed",
    "destroyed": "destroyed",
}
"""API states that end a run, and the run state each one leaves behind."""


def _run_guest(machine_guest: Mapping[str, Any] | None, queue: str) -> dict[str, Any]:
    """cpu_kind/cpus/memory_mb of a run: the Machine's recorded guest over its queue's GUEST."""
    from django_flyworkers.conf import get_settings

    profile = get_settings().profile(queue.split(",")[0])
    merged = {**dict(profile.guest if profile else {}), **dict(machine_guest or {})}
    return {
        "cpu_kind": str(merged.get("cpu_kind") or "shared"),
        "cpus": int(merged.get("cpus") or 1),
        "memory_mb": int(merged.get("memory_mb") or 256),
    }


def _close_run(run: MachineRun, at: datetime, state: str, exit_code: int | None = None) -> None:
    ended = max(at, run.started_at)
    changes: dict[str, Any] = {
        "stopped_at": ended,
        "state": state,
        "billed_seconds": (ended - run.started_at).total_seconds(),
    }
    if exit_code is not None:
        changes["exit_code"] = exit_code
    # Conditional on still being open: a concurrent closer (worker exit, reaper) wins once.
    MachineRun.objects.filter(pk=run.pk, stopped_at__isnull=True).update(**changes)


def record_run_started(
    machine_id: str,
    *,
    queue: str,
    guest: Mapping[str, Any] | None = None,
    at: datetime | None = None,
) -> None:
    """The scaler started (or created to boot) ``machine_id``: a billed run begins.

    A run still open is closed first: the Machine must have stopped without anyone seeing it.
    """
    at = at or timezone.now()
    row = WorkerMachine.objects.filter(machine_id=machine_id).values_list("pk", "guest").first()
    if row is None:
        return
    pk, machine_guest = row
    for run in MachineRun.objects.filter(machine_id=pk, stopped_at__isnull=True):
        _close_run(run, at, MachineRun.State.STOPPED)
    MachineRun.objects.create(
        machine_id=pk, queue=queue, started_at=at, **_run_guest(guest or machine_guest, queue)
    )


def record_run_booted(machine_id: str, *, queue: str) -> None:
    """The worker on ``machine_id`` announced itself: mark its run booted.

    A Machine started by something else than the scaler (``fly machine start``, Fly's
    autostart) has no open run yet; one is opened now, without its boot seconds.
    """
    now = timezone.now()
    row = WorkerMachine.objects.filter(machine_id=machine_id).values_list("pk", "guest").first()
    if row is None:
        return
    pk, machine_guest = row
    run = MachineRun.objects.filter(machine_id=pk, stopped_at__isnull=True).first()
    if run is not None and run.booted_at is None:
        MachineRun.objects.filter(pk=run.pk).update(booted_at=now)
        return
    if run is not None:  # booted before: a second boot means the first run ended unseen
        _close_run(run, now, MachineRun.State.STOPPED)
    MachineRun.objects.create(
        machine_id=pk,
        queue=queue,
        started_at=now,
        booted_at=now,
        **_run_guest(machine_guest, queue),
    )


def record_run_ended(
    machine_id: str,
    *,
    at: datetime | None = None,
    state: str = MachineRun.State.STOPPED,
    exit_code: int | None = None,
) -> bool:
    """``machine_id``'s run ended (its worker left, or the API shows it stopped). False if no
    run was open."""
    at = at or timezone.now()
    runs = list(MachineRun.objects.filter(machine__machine_id=machine_id, stopped_at__isnull=True))
    for run in runs:
        _close_run(run, at, state, exit_code)
    return bool(runs)


EXIT_SLACK = timedelta(seconds=60)
"""An exit event belongs to a run that its worker saw end up to this long before it."""


def record_runs_seen(
    seen: Iterable[tuple[str, str, Iterable[tuple[datetime, int | None]]]],
) -> int:
    """Match what the API shows of Machines against their runs; returns runs closed.

    ``seen`` holds ``(machine_id, api_state, exits)``, ``exits`` being the Machine's exit
    events as ``(time, exit code)``. A run still open on a Machine the API shows stopped (or
    suspended, failed, gone) ends at the first exit after its start, or now if there is none.
    A run without an exit code takes the code of the first exit after its start.
    """
    machines = {mid: (state, sorted(exits, key=lambda e: e[0])) for mid, state, exits in seen}
    if not machines:
        return 0
    now = timezone.now()
    firsts = [exits[0][0] for _, exits in machines.values() if exits]
    lacking = Q(exit_code__isnull=True, started_at__gte=min(firsts) - EXIT_SLACK) if firsts else Q()
    runs = (
        MachineRun.objects.filter(machine__machine_id__in=list(machines))
        .filter(Q(stopped_at__isnull=True) | lacking if firsts else Q(stopped_at__isnull=True))
        .select_related("machine")
        .order_by("started_at")
    )
    closed = 0
    for run in runs:
        state, exits = machines[run.machine.machine_id]
        latest = (run.stopped_at or now) + EXIT_SLACK
        exit_event = next((e for e in exits if run.started_at <= e[0] <= latest), None)
        code = exit_event[1] if exit_event else None
        if run.stopped_at is None:
            if state in RUN_END_STATES:
                _close_run(run, exit_event[0] if exit_event else now, RUN_END_STATES[state], code)
                closed += 1
        elif code is not None:
            MachineRun.objects.filter(pk=run.pk, exit_code__isnull=True).update(exit_code=code)
    return closed
