"""Machines: one row per Machine, written by its worker and mirrored from the Machines API."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from django_flyworkers.models import WorkerMachine


def record_machine_boot(
    machine_id: str,
    *,
    queue: str,
    region: str = "",
    image: str = "",
    instance_id: str = "",
    memory_mb: int | None = None,
) -> int:
    """A worker started on ``machine_id`` (one boot); returns the row's key."""
    defaults = {"queue": queue, "region": region, "image": image, "instance_id": instance_id}
    defaults = {key: value for key, value in defaults.items() if value}
    machine, _ = WorkerMachine.objects.get_or_create(machine_id=machine_id, defaults=defaults)
    if memory_mb and not machine.guest:
        defaults["guest"] = {"memory_mb": memory_mb}  # type: ignore[assignment]
    WorkerMachine.objects.filter(pk=machine.pk).update(
        state="started", last_started_at=timezone.now(), boots=F("boots") + 1, **defaults
    )
    return int(machine.pk)


def record_machine_exit(machine_id: str, run_seconds: float, exit_code: int | None = 0) -> None:
    """The worker on ``machine_id`` is leaving after ``run_seconds``.

    With ``exit_code`` 0 it exits normally and its Machine (restart policy ``no``) stops with
    it: the row says ``stopped`` now rather than at the next sync. ``None``: it is leaving
    on an error; the row says ``stopping`` until the API says how it ended.
    """
    changes: dict[str, Any] = {
        "state": "stopped" if exit_code == 0 else "stopping",
        "last_stopped_at": timezone.now(),
        "run_seconds": F("run_seconds") + max(0.0, run_seconds),
    }
    if exit_code is not None:
        changes["last_exit_code"] = exit_code
    WorkerMachine.objects.filter(machine_id=machine_id).update(**changes)


def record_machine_seen(
    machine_id: str,
    *,
    queue: str,
    state: str,
    name: str = "",
    region: str = "",
    image: str = "",
    instance_id: str = "",
    guest: Mapping[str, Any] | None = None,
    last_exit_code: int | None = None,
) -> str | None:
    """Mirror what the Machines API says about one of our Machines.

    Returns what changed: ``"adopted"`` for a Machine we had no row for, ``"<old> -> <new>"``
    for a new state, None otherwise.
    """
    values: dict[str, Any] = {"queue": queue, "state": state}
    optional = {
        "name": name,
        "region": region,
        "image": image,
        "instance_id": instance_id,
        "guest": dict(guest) if guest else None,
        "last_exit_code": last_exit_code,
    }
    values.update({key: value for key, value in optional.items() if value not in (None, "")})
    before = WorkerMachine.objects.filter(machine_id=machine_id).values_list("state", flat=True)
    previous = before.first()
    if previous is None:
        try:
            with transaction.atomic():
                WorkerMachine.objects.create(machine_id=machine_id, **values)
            return "adopted"
        except IntegrityError:  # created concurrently (a worker booting): update instead
            pass
    WorkerMachine.objects.filter(machine_id=machine_id).update(**values)
    return f"{previous} -> {state}" if previous is not None and previous != state else None


def record_machines_gone(machine_ids: Iterable[str]) -> list[str]:
    """Machines the API no longer lists: mark their rows destroyed; returns those changed."""
    rows = WorkerMachine.objects.filter(machine_id__in=list(machine_ids)).exclude(state="destroyed")
    changed = list(rows.values_list("machine_id", flat=True))
    rows.update(state="destroyed")
    return changed


def record_machine_suspended(machine_id: str, run_seconds: float) -> None:
    """The worker on ``machine_id`` suspends its Machine after ``run_seconds`` awake."""
    WorkerMachine.objects.filter(machine_id=machine_id).update(
        state="suspended",
        last_stopped_at=timezone.now(),
        run_seconds=F("run_seconds") + max(0.0, run_seconds),
    )


def record_machine_resumed(machine_id: str) -> None:
    """The worker on ``machine_id`` was resumed where it was suspended (not a new boot)."""
    WorkerMachine.objects.filter(machine_id=machine_id).update(
        state="started", last_started_at=timezone.now()
    )
