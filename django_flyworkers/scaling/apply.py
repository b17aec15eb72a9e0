"""Carry out a :class:`~django_flyworkers.scaling.policy.Plan` through
:mod:`~django_flyworkers.scaling.actions`, and keep presence, the ledger's Machine rows, the
last Machines list and the ``machine_*`` signals in step with what was done.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from rq.queue import Queue

from django_flyworkers import ledger, presence, signals
from django_flyworkers.api import get_client
from django_flyworkers.conf import FlySettings, QueueProfile
from django_flyworkers.machines import Machine, MachinesClient
from django_flyworkers.models import ScaleEvent
from django_flyworkers.scaling import actions, fleet, spec
from django_flyworkers.scaling.actions import ActionResult
from django_flyworkers.scaling.locks import LONGEST_WAIT, Locks
from django_flyworkers.scaling.policy import Plan, QueueSnapshot

RESTART_WAIT = LONGEST_WAIT
"""How long a wake waits for a leaving Machine to stop before starting it again."""


@dataclass
class ReconcileResult:
    """What one reconcile pass saw, planned and did."""

    queue: str
    snapshot: QueueSnapshot
    machines: Sequence[Machine]
    plan: Plan
    actions: list[str] = field(default_factory=list)
    """Successful actions, e.g. ``"start 148e..."``."""
    errors: list[str] = field(default_factory=list)
    results: list[ActionResult] = field(default_factory=list)
    """Every action tried, in order, failed ones included."""
    listed: bool = True
    """False when the pass skipped the API (``skip_idle`` and nothing to decide)."""

    def add(self, result: ActionResult) -> ActionResult:
        self.results.append(result)
        if result:
            self.actions.append(f"{result.action} {result.machine_id}".strip())
        else:
            self.errors.append(str(result))
        return result


@dataclass
class Pass:
    """Context of one pass: who acts, on what, why, and the locks to renew."""

    queue: str
    profile: QueueProfile
    settings: FlySettings
    rq_queue: Queue
    reason: str
    user: str
    locks: Locks

    @property
    def conn(self) -> Redis:
        connection: Redis = self.rq_queue.connection
        return connection

    def client(self) -> MachinesClient:
        self.locks.renew()
        return get_client()


def apply_plan(p: Pass, plan: Plan, result: ReconcileResult) -> None:
    """Do everything in ``plan`` but the restarts, in the order its docstring gives; each
    action's outcome goes into ``result``. A wake held back by the global cap is recorded."""
    why = f"{p.reason}: {plan.reason}"
    machines = {m.id: m for m in result.machines}
    if plan.capped:
        # Nothing is called, but the operator must see why a job waits.
        detail = (
            f"{plan.capped} worker(s) held back: GLOBAL_MAX_MACHINES "
            f"({p.settings.global_max_machines}) Machines are running"
        )
        ledger.record_event(
            p.queue,
            "capped",
            reason=why,
            outcome=ScaleEvent.Outcome.SKIPPED,
            detail=detail,
            user=p.user,
        )
        result.results.append(ActionResult("capped", p.queue, detail=detail))
    for machine_id in plan.start:
        _start(p, plan, result, machines[machine_id], why)

    region = p.profile.region or p.settings.region
    for _ in range(plan.create):
        config = spec.machine_config(p.profile, p.settings)
        created = result.add(_create(p, config, region, why))
        if created.machine is not None:
            _launched(p, created.machine, created.machine.state or "created", why)

    # A suspend queue's pool sleeps suspended: boot its new Machines, whose workers suspend
    # themselves once idle, rather than leave them stopped.
    warm = p.profile.idle_action == "suspend"
    for _ in range(plan.create_stopped):
        config = spec.machine_config(p.profile, p.settings, pool=True)
        note = "booted to suspend, for the pool" if warm else "stopped, for the pool"
        created = result.add(_create(p, config, region, f"{why}; {note}", not warm))
        if created.machine is None:
            continue
        if warm:
            _launched(p, created.machine, created.machine.state or "created", why)
        else:
            fleet.note(created.machine)
            _remember(p, created.machine, created.machine.state or "created")

    for machine_id in plan.destroy:
        if result.add(actions.destroy(p.client(), p.queue, machine_id, reason=why, user=p.user)):
            fleet.drop(machine_id)
            ledger.record_machine_seen(machine_id, queue=p.queue, state="destroyed")


def _start(p: Pass, plan: Plan, result: ReconcileResult, machine: Machine, why: str) -> None:
    """Start (or resume) one Machine, updating its image first if the plan says so."""
    machine_id = machine.id
    if machine_id in plan.update:
        config = spec.machine_config(p.profile, p.settings, machine.config_copy())
        updated = result.add(
            actions.update(p.client(), p.queue, machine_id, config, reason=why, user=p.user)
        )
        if not updated:
            return
        machine = updated.machine or machine
        fleet.note(machine)
    # Counted as booting before the call, not after: a resumed worker can announce itself
    # before the answer reaches us, and a mark made after that announcement would outlive it,
    # covering the backlog for a worker that may already have left.
    presence.mark_booting(p.conn, p.queue, machine_id, p.settings.boot_timeout)
    if result.add(actions.start(p.client(), p.queue, machine_id, reason=why, user=p.user)):
        _launched(p, machine, "starting", why, booting=True)
    else:
        presence.end_booting(p.conn, p.queue, [machine_id])


def _create(
    p: Pass, config: dict[str, Any], region: str | None, why: str, stopped: bool = False
) -> ActionResult:
    return actions.create(
        p.client(),
        p.queue,
        config,
        reason=why,
        name=spec.machine_name(p.queue),
        region=region,
        skip_launch=stopped,
        user=p.user,
    )


def restart(p: Pass, plan: Plan, result: ReconcileResult) -> None:
    """Start Machines whose worker is leaving (or suspending), once they have stopped (or
    suspended); one on an old image is updated first."""
    why = f"{p.reason}: {plan.reason}"
    machines = {m.id: m for m in result.machines}
    for machine_id in plan.restart:
        machine = machines[machine_id]
        settled = actions.wait(
            p.client(),
            p.queue,
            machine_id,
            "stopped,suspended",
            reason=f"{why}; worker leaving",
            timeout=RESTART_WAIT,
            instance_id=machine.instance_id or None,
            user=p.user,
        )
        if result.add(settled):
            _start(p, plan, result, machine, why)


def _remember(p: Pass, machine: Machine, state: str) -> None:
    ledger.record_machine_seen(
        machine.id,
        queue=p.queue,
        state=state,
        name=machine.name,
        region=machine.region,
        image=machine.image or p.settings.image or "",
        guest=dict(p.profile.guest),
    )


def _launched(p: Pass, machine: Machine, state: str, why: str, *, booting: bool = False) -> None:
    """A Machine was started or created to boot: count it as booting (unless ``booting``: the
    caller already did), record it, tell listeners."""
    if not booting:
        presence.mark_booting(p.conn, p.queue, machine.id, p.settings.boot_timeout)
    fleet.note(machine, state=state)
    _remember(p, machine, state)
    ledger.record_run_started(machine.id, queue=p.queue, guest=dict(p.profile.guest))
    signal = signals.machine_created if state == "created" else signals.machine_started
    signal.send_robust(p.queue, queue=p.queue, machine_id=machine.id, reason=why)
