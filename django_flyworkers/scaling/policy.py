"""The scaling policy: pure functions from what we know to what to do. No I/O, no clock.

``plan()`` is shared by the wake path (an enqueue found no worker covering the backlog) and
the reconciler (``flyworkers_scale``), and is small enough to simulate. ``plan_pool()`` sizes
a pool (``flyworkers_scale --count``); ``plan_tidy()`` decides what the reaper stops and
destroys; ``boot_over()`` says when a Machine we counted as booting is no longer starting.
Time comes in as an argument (``now``), so every decision can be tested without waiting.

Vocabulary:

* *live* Machines run a worker that announced itself in Redis and is not leaving;
* *booting* Machines were started or created by us within the boot timeout and have not
  announced yet; they count as capacity, so a burst does not start them twice;
* *leaving* Machines are ``started`` per the API but neither live nor booting: their worker
  has decided to exit or to suspend (or is stuck). Starting them is a no-op until they have
  stopped or suspended, so they are restarted (wait for either, then start) only when nothing
  else can serve;
* *asleep* Machines are ``suspended`` (or on their way): capacity that a start resumes in a
  fraction of a second, never a live worker. Resources are used in this order: an asleep
  Machine on the current image (a resume), a stopped one (a start), one on an old image (an
  update, then a cold start: a suspended one's snapshot holds the old code), a new Machine.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django_flyworkers.conf import QueueProfile
from django_flyworkers.machines import Machine, MachineState
from django_flyworkers.scaling.spec import is_pool

STARTABLE = frozenset({MachineState.STOPPED, MachineState.SUSPENDED, MachineState.CREATED})
"""Persistent states a start boots or resumes (a ``suspending`` Machine on the current image
is startable too: a start interrupts the suspend)."""
ASLEEP = frozenset({MachineState.SUSPENDED, MachineState.SUSPENDING})
COLD = frozenset({MachineState.STOPPED, MachineState.CREATED})
RUNNING = frozenset(
    {MachineState.STARTED, MachineState.STARTING, MachineState.REPLACING, MachineState.RESTARTING}
)
LEAVING = frozenset({MachineState.STARTED, MachineState.STOPPING, MachineState.SUSPENDING})
"""States of a Machine whose worker may be on its way out or to sleep: start it again once
stopped or suspended."""
IGNORED = frozenset(
    {
        MachineState.DESTROYING,
        MachineState.DESTROYED,
        MachineState.FAILED,
        MachineState.LAUNCH_FAILED,
    }
)


@dataclass(frozen=True)
class QueueSnapshot:
    """Demand and presence for one queue, read from Redis at one moment."""

    queue: str
    queued: int = 0
    due_scheduled: int = 0
    """Scheduled jobs whose time has come (nothing promotes them while no worker runs)."""
    started: int = 0
    live_workers: int = 0
    """Workers announced in Redis and not leaving, on Fly Machines or elsewhere."""
    live_machines: frozenset[str] = frozenset()
    booting: frozenset[str] = frozenset()
    oldest_age: float | None = None
    """Seconds the oldest queued job has waited."""

    @property
    def backlog(self) -> int:
        return self.queued + self.due_scheduled


@dataclass(frozen=True)
class Plan:
    """What to do for one queue.

    The scaler applies it in this order: update (each just before its start), start,
    create, create_stopped, destroy, all under the global lock; restart last, after that
    lock is released, since it waits for a leaving Machine to stop and adds no Machine.
    """

    queue: str
    start: tuple[str, ...] = ()
    update: tuple[str, ...] = ()
    """Machines to start or restart whose image is stale: update first (a stopped one stays
    stopped, a suspended one loses its snapshot and stops), then start: a cold boot."""
    create: int = 0
    restart: tuple[str, ...] = ()
    create_stopped: int = 0
    """Machines to create without booting them (``skip_launch``): the warm pool."""
    destroy: tuple[str, ...] = ()
    """Stopped Machines to destroy (never a running one)."""
    reason: str = ""
    stale: tuple[str, ...] = ()
    """Machines announced as live in Redis that the API shows not running (crashed)."""
    desired: int = 0
    serving: int = 0
    capped: int = 0
    """Workers the backlog called for that ``GLOBAL_MAX_MACHINES`` held back."""

    @property
    def is_empty(self) -> bool:
        return not (
            self.start
            or self.update
            or self.create
            or self.restart
            or self.create_stopped
            or self.destroy
        )

    def actions(self) -> list[str]:
        """The plan as short human-readable actions."""
        out = [f"update {m}" for m in self.update]
        out += [f"start {m}" for m in self.start]
        out += [f"create {self.create}"] if self.create else []
        out += [f"restart {m}" for m in self.restart]
        out += [f"create {self.create_stopped} stopped"] if self.create_stopped else []
        out += [f"destroy {m}" for m in self.destroy]
        return out


def desired_workers(snapshot: QueueSnapshot, profile: QueueProfile) -> int:
    """Workers the backlog calls for: one per ``JOBS_PER_MACHINE`` jobs, within ``MAX_MACHINES``."""
    if snapshot.backlog <= 0:
        return 0
    return min(profile.max_machines, math.ceil(snapshot.backlog / profile.jobs_per_machine))


def _start_order(machine: Machine, image: str) -> tuple[int, str]:
    # A resume first (fastest), then a start; an old image needs an update and a cold boot,
    # whatever its state: a suspended Machine's snapshot holds the old code.
    if machine.image != image:
        return 2, machine.id
    return (0 if machine.state in ASLEEP else 1), machine.id


def _startable(machine: Machine, image: str) -> bool:
    # A suspending Machine cannot be updated yet: one on an old image waits to be restarted.
    return machine.state in STARTABLE or (
        machine.state == MachineState.SUSPENDING and machine.image == image
    )


def plan(
    snapshot: QueueSnapshot,
    machines: Sequence[Machine],
    profile: QueueProfile,
    *,
    image: str,
    global_active: int = 0,
    global_cap: int = 1_000_000,
    exclude: Collection[str] = (),
) -> Plan:
    """Decide which of ``machines`` (this queue's) to update, start or create, and how many.

    ``global_active`` counts running and booting Machines of every queue, ``global_cap`` is
    ``GLOBAL_MAX_MACHINES``. Machines in ``exclude`` (a worker's own, as it leaves) are
    never started but still count against ``MAX_MACHINES``. Live members whose Machine the
    API shows not running are stale (a crash) and do not count.
    """
    ours = [m for m in machines if m.state not in IGNORED]
    desired = desired_workers(snapshot, profile)
    stale = {m.id for m in ours if m.id in snapshot.live_machines and m.state not in RUNNING}
    booting = [m for m in ours if m.id in snapshot.booting and m.id not in snapshot.live_machines]
    # Started or created moments ago but not in the list yet (the list can lag a create).
    unlisted = snapshot.booting - snapshot.live_machines - {m.id for m in machines}
    serving = snapshot.live_workers - len(stale) + len(booting) + len(unlisted)
    total = len(ours) + len(unlisted)
    base: dict[str, Any] = {
        "queue": snapshot.queue,
        "desired": desired,
        "serving": serving,
        "stale": tuple(sorted(stale)),
        # MIN_MACHINES: stopped Machines kept created so a wake is a start, not a create.
        "create_stopped": max(0, profile.min_machines - total),
    }
    if desired == 0:
        return Plan(**base, reason="no backlog")
    deficit = desired - serving
    if deficit <= 0:
        return Plan(**base, reason="live and booting workers cover the backlog")
    room = max(0, global_cap - global_active)
    capped = max(0, deficit - room)
    if room <= 0:
        reason = f"global cap of {global_cap} running Machines reached"
        return Plan(**base, capped=capped, reason=reason)
    deficit = min(deficit, room)

    taken = (snapshot.booting | snapshot.live_machines | frozenset(exclude)) - stale
    startable = sorted(
        (m for m in ours if _startable(m, image) and m.id not in taken),
        key=lambda m: _start_order(m, image),
    )
    start = startable[:deficit]
    deficit -= len(start)

    create = max(0, min(deficit, profile.max_machines - total))
    deficit -= create

    started = {m.id for m in start}
    leaving = sorted(
        (m for m in ours if m.state in LEAVING and m.id not in taken and m.id not in started),
        key=lambda m: m.id,
    )
    restart = tuple(m.id for m in leaving[:deficit])
    update = [m.id for m in (*start, *leaving[:deficit]) if m.image != image]

    parts = [f"backlog {snapshot.backlog}", f"want {desired}", f"have {serving}"]
    if capped:
        parts.append(f"{capped} held back by the global cap of {global_cap}")
    base["create_stopped"] = max(0, base["create_stopped"] - create)
    return Plan(
        **base,
        start=tuple(m.id for m in start),
        update=tuple(update),
        create=create,
        restart=restart,
        capped=capped,
        reason=", ".join(parts),
    )


def _destroy_order(machine: Machine, image: str) -> tuple[int, int, str]:
    # Give up Machines on an old image first: they would need an update before their next
    # start; keep suspended ones longest: they resume fastest.
    return (0 if machine.image != image else 1), int(machine.state in ASLEEP), machine.id


def plan_pool(
    snapshot: QueueSnapshot,
    machines: Sequence[Machine],
    profile: QueueProfile,
    count: int,
    *,
    image: str,
) -> Plan:
    """Size ``snapshot.queue``'s pool to ``count`` Machines: create stopped ones or destroy
    stopped surplus. Running, booting and live Machines are never destroyed; they count.

    A pool of an ``IDLE_ACTION = "suspend"`` queue sleeps suspended: its stopped (or never
    started) Machines are started too, on the current image, and their workers suspend
    themselves once idle (:mod:`django_flyworkers.warm`); the scaler boots the new ones.
    """
    if not 0 <= count <= profile.max_machines:
        raise ValueError(f"count must be between 0 and MAX_MACHINES ({profile.max_machines})")
    ours = [m for m in machines if m.state not in IGNORED]
    base: dict[str, Any] = {"queue": snapshot.queue, "desired": count, "serving": len(ours)}
    busy = snapshot.booting | snapshot.live_machines
    idle = sorted(
        (m for m in ours if m.state in STARTABLE and m.id not in busy),
        key=lambda m: _destroy_order(m, image),
    )
    surplus = idle[: max(0, len(ours) - count)]
    if profile.idle_action == "suspend":
        gone = {m.id for m in surplus}
        cold = [m for m in ours if m.state in COLD and m.id not in busy | gone]
        base["start"] = tuple(m.id for m in cold)
        base["update"] = tuple(m.id for m in cold if m.image != image)
    warming = f"; {len(base['start'])} started to suspend" if base.get("start") else ""
    if len(ours) < count:
        note = f"pool {len(ours)} -> {count}{warming}"
        return Plan(**base, create_stopped=count - len(ours), reason=note)
    kept = len(ours) - len(surplus)
    note = f"pool {len(ours)} -> {kept}" + (" (running Machines kept)" if kept > count else "")
    return Plan(**base, destroy=tuple(m.id for m in surplus), reason=note + warming)


# -- the reaper's tidy-up ---------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One Machine to stop or destroy, and why."""

    action: str
    """``stop`` or ``destroy``."""
    machine_id: str
    reason: str
    force: bool = False
    """Destroy even if running (a failed Machine, one stuck in ``created``)."""


@dataclass(frozen=True)
class TidyPlan:
    """What the reaper stops and destroys for one queue, in order."""

    queue: str
    steps: tuple[Step, ...] = ()

    @property
    def stop(self) -> tuple[str, ...]:
        return tuple(s.machine_id for s in self.steps if s.action == "stop")

    @property
    def destroy(self) -> tuple[str, ...]:
        return tuple(s.machine_id for s in self.steps if s.action == "destroy")


def machine_age(machine: Machine, now: datetime) -> float:
    """Seconds since the Machine last started (or, failing that, changed or was created)."""
    start = next((e.timestamp for e in machine.events if e.type == "start" and e.timestamp), None)
    since = start or machine.updated_at or machine.created_at
    return (now - since).total_seconds() if since else 0.0


def plan_tidy(
    snapshot: QueueSnapshot,
    machines: Sequence[Machine],
    profile: QueueProfile,
    *,
    now: datetime,
    busy: Collection[str],
    stuck_after: float,
    image: str,
) -> TidyPlan:
    """Decide which of ``machines`` (this queue's) to stop or destroy.

    * stop a Machine ``started`` for over ``stuck_after`` seconds with no live or booting
      worker and no job running on it (``busy``): its worker never came up or hangs;
    * destroy (forced) a ``failed`` Machine, and one sitting in ``created`` for over
      ``stuck_after`` seconds that was not created stopped on purpose for the pool;
    * destroy stopped surplus above ``MAX_MACHINES`` (never a running Machine);
    * in a dedicated queue, destroy every stopped Machine: each ran its one job, and Fly's
      ``auto_destroy`` should have removed it already.

    Nothing outside a worker ever stops a Machine that runs a job.
    """
    taken = snapshot.live_machines | snapshot.booting
    steps: list[Step] = []
    for machine in machines:
        age = machine_age(machine, now)
        idle = machine.id not in taken
        if profile.mode == "dedicated" and machine.state == MachineState.STOPPED:
            steps.append(Step("destroy", machine.id, "dedicated Machine left after its job"))
        elif machine.state == MachineState.STARTED and idle and machine.id not in busy:
            if age > stuck_after:
                reason = f"started {age:.0f}s without a live worker"
                steps.append(Step("stop", machine.id, reason))
        elif machine.state == MachineState.FAILED:
            steps.append(Step("destroy", machine.id, "failed", force=True))
        elif (
            machine.state == MachineState.CREATED
            and idle
            and not is_pool(machine)
            and age > stuck_after
        ):
            reason = f"stuck in created for {age:.0f}s"
            steps.append(Step("destroy", machine.id, reason, force=True))

    # A Machine being stopped still counts, so a second run finds no surplus left to remove.
    gone = {s.machine_id for s in steps if s.action == "destroy"}
    remaining = [m for m in machines if m.id not in gone]
    pool = plan_pool(snapshot, remaining, profile, profile.max_machines, image=image)
    reason = f"surplus above MAX_MACHINES ({profile.max_machines})"
    steps += [Step("destroy", machine_id, reason) for machine_id in pool.destroy]
    return TidyPlan(snapshot.queue, tuple(steps))


# -- booting capacity -------------------------------------------------------------------------

BOOT_FAILED = frozenset(
    {
        MachineState.FAILED,
        MachineState.LAUNCH_FAILED,
        MachineState.DESTROYING,
        MachineState.DESTROYED,
    }
)
NOT_STARTING = frozenset({MachineState.STOPPED, MachineState.SUSPENDED, MachineState.STOPPING})


def boot_over(machine: Machine, marked_at: float) -> bool:
    """Has a Machine we counted as booting since ``marked_at`` (Unix seconds) stopped trying?

    True when the API shows it failed or gone, or stopped with an exit after ``marked_at``
    (its worker crashed or was killed before announcing itself). A stopped Machine without
    such an exit is a list taken before our start took effect: it still counts as booting.
    """
    if machine.state in BOOT_FAILED:
        return True
    if machine.state not in NOT_STARTING:
        return False
    exit_event = machine.last_exit_event
    stamp = exit_event.timestamp if exit_event is not None else None
    return stamp is not None and stamp.timestamp() >= marked_at
