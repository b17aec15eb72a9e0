"""The policy of a dedicated queue (``MODE: "dedicated"``): which waiting jobs get a Machine now.

Pure, like :mod:`~django_flyworkers.scaling.policy`: no I/O, no clock. In a dedicated queue
every job gets a fresh Machine that runs only that job (``manage.py flyworkers_run <job id>``)
and is destroyed when it exits, so there is nothing to start again and nothing to size: a
pass creates one Machine per waiting job that has none, as far as ``MAX_MACHINES`` (this
queue's Machines at once) and ``GLOBAL_MAX_MACHINES`` (every queue's) allow. Jobs beyond the
cap stay queued; each Machine that finishes wakes the queue as it exits, and the next waiting
job gets its place.

A Machine holds its place from its create until the API shows it ended (stopped, failed,
destroyed) or it is gone from the list, except a Machine ``exclude`` names: the one whose
worker is handing its place over as it exits.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from django_flyworkers.conf import QueueProfile
from django_flyworkers.machines import Machine, MachineState

ENDED = frozenset(
    {
        MachineState.STOPPED,
        MachineState.FAILED,
        MachineState.LAUNCH_FAILED,
        MachineState.DESTROYING,
        MachineState.DESTROYED,
        MachineState.REPLACED,
    }
)
"""States of a dedicated Machine that no longer runs (nor will run) its job."""


@dataclass(frozen=True)
class DedicatedPlan:
    """Which waiting jobs get a Machine of their own now, and why the others wait."""

    queue: str
    create_for: tuple[str, ...] = ()
    """Job ids, in queue order: create one Machine for each."""
    running: tuple[str, ...] = ()
    """The queue's Machines that hold a place (booting or running their job)."""
    waiting: int = 0
    """Jobs in the queue with no live Machine of their own yet (before this plan)."""
    capped: int = 0
    """Jobs held back by ``GLOBAL_MAX_MACHINES`` (not by the queue's own cap)."""
    reason: str = ""

    @property
    def is_empty(self) -> bool:
        return not self.create_for


def holding(
    machines: Sequence[Machine], booting: Collection[str], exclude: Collection[str] = ()
) -> frozenset[str]:
    """Machines that hold a place: listed and not ended, or marked booting but not listed
    yet (a list can lag a create). ``exclude``: Machines handing their place over."""
    listed = {m.id for m in machines}
    alive = {m.id for m in machines if m.state not in ENDED}
    alive |= set(booting) - listed
    return frozenset(alive - set(exclude))


def plan_dedicated(
    profile: QueueProfile,
    queued: Sequence[str],
    machines: Sequence[Machine],
    *,
    assigned: Mapping[str, str],
    booting: Collection[str] = (),
    exclude: Collection[str] = (),
    global_active: int = 0,
    global_cap: int = 1_000_000,
) -> DedicatedPlan:
    """Decide which of ``queued`` (job ids from the head of the queue) get a Machine now.

    ``machines`` are this queue's Machines as listed; ``assigned`` maps a job id to the
    Machine created for it (while that record lasts); ``booting`` are Machines marked booting
    in Redis. ``global_active`` counts running and booting Machines of every queue (not those
    in ``exclude``); ``global_cap`` is ``GLOBAL_MAX_MACHINES``.
    """
    running = holding(machines, booting, exclude)
    # A job whose Machine still holds a place is served; one whose Machine ended before
    # claiming it (a crash at boot) needs another.
    waiting = [job_id for job_id in queued if assigned.get(job_id) not in running]
    room = max(0, profile.max_machines - len(running))
    global_room = max(0, global_cap - global_active)
    wanted = min(len(waiting), room)
    count = min(wanted, global_room)
    parts = [f"{len(waiting)} job(s) waiting", f"{len(running)} of {profile.max_machines} running"]
    if count:
        parts.append(f"create {count}")
    if wanted > count:
        parts.append(f"{wanted - count} held back by the global cap of {global_cap}")
    elif len(waiting) > count:
        parts.append(f"{len(waiting) - count} wait for a place")
    return DedicatedPlan(
        queue=profile.name,
        create_for=tuple(waiting[:count]),
        running=tuple(sorted(running)),
        waiting=len(waiting),
        capped=wanted - count,
        reason=", ".join(parts) if queued else "no job waiting",
    )
