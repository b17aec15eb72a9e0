"""The Machine side of a reap: mirror the API into the ledger, stop and destroy leftovers.

``sync`` records every Machine's state as the API lists it (adopting Machines of ours that
have no row, marking vanished ones destroyed). ``tidy`` applies the pure
:func:`~django_flyworkers.scaling.policy.plan_tidy` through
:mod:`~django_flyworkers.scaling.actions`: stuck Machines stopped, failed ones and stopped
surplus destroyed. :mod:`django_flyworkers.reaper` calls both around its recovery of jobs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from django.utils import timezone

from django_flyworkers import ledger
from django_flyworkers.conf import get_settings
from django_flyworkers.machines import Machine, MachinesClient
from django_flyworkers.models import WorkerMachine
from django_flyworkers.queue import get_queue
from django_flyworkers.scaling import actions, fleet, policy
from django_flyworkers.scaling.snapshot import end_dead_boots, stopped_now
from django_flyworkers.scaling.snapshot import snapshot as read_snapshot


def sync(queue: str, machines: Mapping[str, Machine], dry_run: bool) -> list[str]:
    """Mirror the API's view of ``queue``'s Machines into the ledger: new states, Machines
    adopted (ours by metadata, no row yet) and Machines gone. Returns what changed."""
    synced: list[str] = []
    rows = dict(WorkerMachine.objects.filter(queue=queue).values_list("machine_id", "state"))
    for machine in machines.values():
        if dry_run:
            before = rows.get(machine.id)
            change = (
                "adopted"
                if before is None
                else (f"{before} -> {machine.state}" if before != machine.state else None)
            )
        else:
            change = ledger.record_machine_seen(
                machine.id,
                queue=queue,
                state=machine.state,
                name=machine.name,
                region=machine.region,
                image=machine.image,
                instance_id=machine.instance_id,
                guest=machine.config.get("guest") or None,
                last_exit_code=machine.last_exit_code,
            )
            stopped_now(queue, machine, change, "flyworkers_reap: synced")
        if change:
            synced.append(f"{machine.id}: {change}")
    gone = [mid for mid, state in rows.items() if mid not in machines and state != "destroyed"]
    if not dry_run:  # Machine runs the API shows ended (the dashboard's billed seconds)
        seen = [(m.id, m.state, _exits(m)) for m in machines.values()]
        ledger.record_runs_seen([*seen, *((mid, "destroyed", []) for mid in gone)])
    if gone and not dry_run:
        gone = ledger.record_machines_gone(gone)
    synced += [f"{mid}: gone -> destroyed" for mid in gone]
    return synced


@dataclass
class Tidied:
    """What :func:`tidy` stopped and destroyed (or would have, in a dry run)."""

    stopped: list[str] = field(default_factory=list)
    destroyed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _exits(machine: Machine) -> list[tuple[datetime, int | None]]:
    return [(e.timestamp, e.exit_code) for e in machine.events if e.type == "exit" and e.timestamp]


def tidy(
    queue: str,
    machines: Mapping[str, Machine],
    *,
    busy: Collection[str],
    stuck_after: float,
    dry_run: bool,
    client: MachinesClient,
    user: str = "",
) -> Tidied:
    """Stop and destroy what :func:`~django_flyworkers.scaling.policy.plan_tidy` says, through
    :mod:`~django_flyworkers.scaling.actions`. ``busy``: Machines running a job."""
    settings = get_settings()
    profile = settings.queues[queue]
    rq_queue = get_queue(queue)
    item = Tidied()
    snap, since = read_snapshot(rq_queue)
    listed = list(machines.values())
    snap = end_dead_boots(
        rq_queue.connection, snap, since, listed, reason="flyworkers_reap", dry_run=dry_run
    )
    plan = policy.plan_tidy(
        snap,
        listed,
        profile,
        now=timezone.now(),
        busy=busy,
        stuck_after=stuck_after,
        image=settings.image or "",
    )
    for step in plan.steps:
        done = item.stopped if step.action == "stop" else item.destroyed
        done.append(step.machine_id)
        if dry_run:
            continue
        why = f"flyworkers_reap: {step.reason}"
        if step.action == "stop":
            result = actions.stop(
                client, queue, step.machine_id, reason=why, signal="SIGTERM",
                timeout=settings.stop_timeout, user=user,
            )  # fmt: skip
        else:
            result = actions.destroy(
                client, queue, step.machine_id, reason=why, force=step.force, user=user
            )
        if not result:
            item.errors.append(str(result))
            continue
        final = "stopped" if step.action == "stop" else "destroyed"
        change = ledger.record_machine_seen(step.machine_id, queue=queue, state=final)
        if final == "destroyed":
            fleet.drop(step.machine_id)
        else:
            machine = machines[step.machine_id]
            stopped_now(queue, dataclasses.replace(machine, state=final), change, why)
    return item
