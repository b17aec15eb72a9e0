"""Wake-up and reconcile: read Redis and the Machines API, plan with the pure policy, apply.

``wake(queue)`` is what an enqueue triggers. It first asks Redis whether live or booting
workers already cover the backlog (no API call at all in the common case). Otherwise one
process at a time per queue, a single-flight lock in Redis, lists the Machines, plans and
applies; everyone else leaves a "pending" mark that the lock holder picks up, so a burst of
thousands of enqueues makes a handful of API calls. API failures are logged and recorded as
ScaleEvents, never raised: the job stays in Redis for the next wake or ``flyworkers_scale``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from redis import Redis

from django_flyworkers import ledger, presence, signals
from django_flyworkers.api import get_client
from django_flyworkers.conf import FlySettings, QueueProfile, get_settings
from django_flyworkers.exceptions import NotConfigured
from django_flyworkers.machines import Machine, MachinesAPIError, MachinesClient
from django_flyworkers.models import ScaleEvent
from django_flyworkers.queue import get_queue
from django_flyworkers.scaling import policy
from django_flyworkers.scaling.policy import Plan, QueueSnapshot

logger = logging.getLogger("django_flyworkers.scaler")

META_KEY = "flyworkers_queue"
"""Metadata key on every Machine we create: ``?metadata.flyworkers_queue=<queue>`` lists them."""

POOL_KEY = "flyworkers_pool"
"""Metadata on Machines created stopped (``--count``, ``MIN_MACHINES``): they are meant to sit
in ``created`` until needed, unlike a Machine stuck there."""

LOCK_TTL = 300
"""Seconds a scaling lock lives if its holder dies; a pass is bounded well below it."""
LOCK_WAIT = 60.0
GLOBAL_LOCK = "flyworkers:wake:global:lock"
RESTART_WAIT = 30.0
"""How long a wake waits for a leaving Machine to stop before starting it again."""

T = TypeVar("T")

_release_script = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


@dataclass
class Outcome:
    """What one reconcile pass saw, planned and did."""

    queue: str
    snapshot: QueueSnapshot
    machines: Sequence[Machine]
    plan: Plan
    actions: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def machine_config(
    profile: QueueProfile, settings: FlySettings, base: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The Machine config for a worker of ``profile``, keeping unrelated keys of ``base``."""
    config: dict[str, Any] = dict(base or {})
    init = dict(config.get("init") or {})
    init["cmd"] = profile.worker_command()
    init.pop("exec", None)
    config.update(
        image=settings.image,
        init=init,
        guest=dict(profile.guest),
        # Only the profile's ENV: app secrets reach Machines through Fly, never through us.
        env={**profile.env, "FLYWORKERS_QUEUE": profile.name},
        restart={"policy": "no"},
        auto_destroy=False,
        metadata={**dict(config.get("metadata") or {}), META_KEY: profile.name},
        stop_config={"signal": "SIGTERM", "timeout": f"{settings.stop_timeout}s"},
    )
    return config


def machine_name(queue: str) -> str:
    """A fresh Machine name: Fly allows lowercase letters, digits and dashes."""
    slug = re.sub(r"[^a-z0-9-]+", "-", queue.lower()).strip("-")[:30] or "queue"
    return f"flyworkers-{slug}-{uuid.uuid4().hex[:8]}"


def _record(
    queue: str,
    action: str,
    machine_id: str,
    reason: str,
    call: Callable[[], T],
    outcome: Outcome,
    *,
    quiet: bool = False,
) -> T | None:
    """Run one API call; record a ScaleEvent for it (only failures when ``quiet``)."""
    started = time.monotonic()
    try:
        result = call()
    except (MachinesAPIError, NotConfigured) as exc:
        elapsed = int((time.monotonic() - started) * 1000)
        logger.warning("flyworkers: %s %s for queue %s failed: %s", action, machine_id, queue, exc)
        outcome.errors.append(f"{action} {machine_id}: {exc}".strip())
        ledger.record_scale_event(
            queue,
            action,
            machine_id=machine_id,
            reason=reason,
            outcome=ScaleEvent.Outcome.ERROR,
            detail=str(exc),
            duration_ms=elapsed,
        )
        return None
    elapsed = int((time.monotonic() - started) * 1000)
    if isinstance(result, Machine):
        machine_id = result.id
    if quiet:
        return result
    outcome.actions.append(f"{action} {machine_id}".strip())
    ledger.record_scale_event(
        queue, action, machine_id=machine_id, reason=reason, duration_ms=elapsed
    )
    return result


def _queue_machines(machines: Sequence[Machine], queue: str) -> list[Machine]:
    return [m for m in machines if m.metadata.get(META_KEY) == queue]


def _profile(queue: str) -> QueueProfile:
    profile = get_settings().profile(queue)
    if profile is None:
        raise KeyError(f"queue {queue!r} is not in FLYWORKERS['QUEUES']")
    return profile


def _gather(queue: str, reason: str) -> tuple[Redis, QueueSnapshot, list[Machine] | None, Outcome]:
    """Redis snapshot first, then the Machines list (None, recorded, if the API failed)."""
    conn = get_queue(queue).connection
    snap = presence.snapshot(conn, queue)
    probe = Outcome(queue, snap, [], Plan(queue=queue, reason="could not list Machines"))
    everything = _record(queue, "list", "", reason, lambda: get_client().list(), probe, quiet=True)
    return conn, snap, everything, probe


@contextlib.contextmanager
def _redis_lock(conn: Redis, key: str, wait: float) -> Iterator[bool]:
    """Hold ``key`` (waiting up to ``wait`` seconds); yields False if it could not be had."""
    release = conn.register_script(_release_script)
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait
    while not conn.set(key, token, nx=True, ex=LOCK_TTL):
        if time.monotonic() > deadline:
            yield False
            return
        time.sleep(0.05)
    try:
        yield True
    finally:
        release(keys=[key], args=[token])


def _busy(queue: str, what: str) -> Outcome:
    outcome = Outcome(queue, QueueSnapshot(queue), [], Plan(queue=queue, reason=f"{what} busy"))
    outcome.errors.append(f"{what} lock held by another process; try again")
    return outcome


def _reconcile(
    queue: str, *, reason: str, dry_run: bool = False, exclude: Sequence[str] = ()
) -> Outcome:
    """One pass; the caller holds the queue's lock. Plan and starts run under the global lock
    so that no two queues spend the same GLOBAL_MAX_MACHINES headroom."""
    settings = get_settings()
    profile = _profile(queue)
    conn = get_queue(queue).connection
    with _redis_lock(conn, GLOBAL_LOCK, LOCK_WAIT) as held:
        if not held:
            return _busy(queue, "global scaling")
        conn, snap, everything, probe = _gather(queue, reason)
        if everything is None:
            return probe
        ours = _queue_machines(everything, queue)
        global_active = sum(1 for m in everything if _active(m))
        plan = policy.plan(
            snap,
            ours,
            profile,
            image=settings.image or "",
            global_active=global_active,
            global_cap=settings.global_max_machines,
            exclude=exclude,
        )
        outcome = Outcome(queue, snap, ours, plan)
        if dry_run:
            return outcome
        for machine_id in plan.stale:
            presence.withdraw(conn, queue, machine_id)
        if not plan.is_empty:
            _apply(plan, {m.id: m for m in ours}, profile, settings, conn, reason, outcome)
    # Restarts wait for a leaving Machine to stop; they add no Machine, so they need no
    # global headroom and must not hold up other queues.
    if plan.restart:
        _restart(plan, {m.id: m for m in ours}, profile, settings, conn, reason, outcome)
    return outcome


def _active(machine: Machine) -> bool:
    """Counts against GLOBAL_MAX_MACHINES: running, or created to run (not a stopped pool one)."""
    if META_KEY not in machine.metadata:
        return False
    if machine.state in policy.RUNNING:
        return True
    return machine.state == "created" and POOL_KEY not in machine.metadata


def reconcile(
    queue: str,
    *,
    reason: str = "reconcile",
    dry_run: bool = False,
    exclude: Sequence[str] = (),
) -> Outcome:
    """One pass for ``queue`` under its lock: snapshot, list Machines, plan, apply.

    Used by ``flyworkers_scale``; wake-ups that arrived meanwhile are served afterwards.
    """
    conn = get_queue(queue).connection
    with _redis_lock(conn, _lock_key(queue), LOCK_WAIT) as held:
        if not held:
            return _busy(queue, f"queue {queue!r}")
        outcome = _reconcile(queue, reason=reason, dry_run=dry_run, exclude=exclude)
    if not dry_run and conn.exists(_pending_key(queue)):
        single_flight(conn, queue, functools.partial(_reconcile, queue, reason=reason))
    return outcome


def resize(queue: str, count: int, *, dry_run: bool = False) -> Outcome:
    """Make ``queue``'s pool ``count`` Machines: create stopped ones or destroy stopped surplus.

    Raises ValueError when ``count`` is outside 0..MAX_MACHINES, before any API call.
    """
    settings = get_settings()
    profile = _profile(queue)
    if not 0 <= count <= profile.max_machines:
        raise ValueError(
            f"--count {count} is outside 0..{profile.max_machines} (MAX_MACHINES of {queue!r})"
        )
    conn = get_queue(queue).connection
    with _redis_lock(conn, _lock_key(queue), LOCK_WAIT) as held:
        if not held:
            return _busy(queue, f"queue {queue!r}")
        conn, snap, everything, probe = _gather(queue, "resize")
        if everything is None:
            return probe
        ours = _queue_machines(everything, queue)
        plan = policy.plan_pool(snap, ours, profile, count, image=settings.image or "")
        outcome = Outcome(queue, snap, ours, plan)
        if not dry_run and not plan.is_empty:
            _apply(plan, {m.id: m for m in ours}, profile, settings, conn, "resize", outcome)
    return outcome


def _apply(
    plan: Plan,
    machines: Mapping[str, Machine],
    profile: QueueProfile,
    settings: FlySettings,
    conn: Redis,
    reason: str,
    outcome: Outcome,
) -> None:
    queue = plan.queue
    client = get_client()
    why = f"{reason}: {plan.reason}"

    def started(machine: Machine, state: str = "starting") -> None:
        _launched(conn, machine, state, profile, settings, why)

    call = functools.partial
    for machine_id in plan.start:
        machine = machines[machine_id]
        if machine_id in plan.update:
            config = machine_config(profile, settings, machine.config_copy())
            update = call(client.update, machine_id, config)
            if _record(queue, "update", machine_id, why, update, outcome) is None:
                continue
        if _record(queue, "start", machine_id, why, call(client.start, machine_id), outcome):
            started(machine)

    region = profile.region or settings.region
    for _ in range(plan.create):
        create = call(
            client.create,
            machine_config(profile, settings),
            name=machine_name(queue),
            region=region,
        )
        created = _record(queue, "create", "", why, create, outcome)
        if created is not None:
            started(created, state=created.state or "created")

    for _ in range(plan.create_stopped):
        config = machine_config(profile, settings)
        config["metadata"][POOL_KEY] = "true"
        create = call(
            client.create, config, name=machine_name(queue), region=region, skip_launch=True
        )
        created = _record(queue, "create", "", f"{why}; stopped, for the pool", create, outcome)
        if created is not None:
            _remember(created, created.state or "created", profile, settings)

    for machine_id in plan.destroy:
        if _record(queue, "destroy", machine_id, why, call(_destroy, client, machine_id), outcome):
            ledger.record_machine_seen(machine_id, queue=queue, state="destroyed")


def _restart(
    plan: Plan,
    machines: Mapping[str, Machine],
    profile: QueueProfile,
    settings: FlySettings,
    conn: Redis,
    reason: str,
    outcome: Outcome,
) -> None:
    """Start Machines whose worker is leaving, once they have stopped."""
    client = get_client()
    why = f"{reason}: {plan.reason}"
    for machine_id in plan.restart:
        machine = machines[machine_id]
        wait = functools.partial(_wait_stopped, client, machine)
        start = functools.partial(client.start, machine_id)
        if _record(plan.queue, "wait", machine_id, f"{why}; worker leaving", wait, outcome) and (
            _record(plan.queue, "start", machine_id, why, start, outcome)
        ):
            _launched(conn, machine, "starting", profile, settings, why)


def _remember(machine: Machine, state: str, profile: QueueProfile, settings: FlySettings) -> None:
    ledger.record_machine_seen(
        machine.id,
        queue=profile.name,
        state=state,
        name=machine.name,
        region=machine.region,
        image=machine.image or settings.image or "",
        guest=dict(profile.guest),
    )


def _launched(
    conn: Redis,
    machine: Machine,
    state: str,
    profile: QueueProfile,
    settings: FlySettings,
    why: str,
) -> None:
    """A Machine was started or created to boot: count it as booting, record it, tell listeners."""
    presence.mark_booting(conn, profile.name, machine.id, settings.boot_timeout)
    _remember(machine, state, profile, settings)
    ledger.record_run_started(machine.id, queue=profile.name, guest=dict(profile.guest))
    signal = signals.machine_created if state == "created" else signals.machine_started
    signal.send_robust(None, queue=profile.name, machine_id=machine.id, reason=why)


def _destroy(client: MachinesClient, machine_id: str, force: bool = False) -> bool:
    client.destroy(machine_id, force=force)
    return True


def _wait_stopped(client: MachinesClient, machine: Machine) -> bool:
    client.wait(machine.id, "stopped", instance_id=machine.instance_id, timeout=RESTART_WAIT)
    return True


def wake(queue: str, *, reason: str = "enqueue", exclude: Sequence[str] = ()) -> Outcome | None:
    """Make sure ``queue`` has workers for its backlog. Never raises for API trouble.

    Returns the reconcile outcome when this call did the work, None when Redis showed the
    backlog covered, the queue is not managed, or another process is already waking it.
    ``exclude`` names Machines that must not be started (a leaving worker's own).
    """
    settings = get_settings()
    profile = settings.profile(queue)
    if profile is None or settings.wake_mode == "off":
        return None
    conn = get_queue(queue).connection
    if presence.covered(conn, queue, profile.jobs_per_machine, profile.max_machines):
        return None
    if exclude:
        # A pass with exclusions must not run on behalf of other waiters (it would skip the
        # very Machine they may need): one pass of its own, then theirs.
        return reconcile(queue, reason=reason, exclude=exclude)
    return single_flight(conn, queue, functools.partial(_reconcile, queue, reason=reason))


def _lock_key(queue: str) -> str:
    return f"flyworkers:wake:{queue}:lock"


def _pending_key(queue: str) -> str:
    return f"flyworkers:wake:{queue}:pending"


def single_flight(conn: Redis, queue: str, work: Callable[[], Outcome]) -> Outcome | None:
    """Run ``work`` in at most one process per queue; requests meanwhile make it run again."""
    pending = _pending_key(queue)
    release = conn.register_script(_release_script)
    conn.set(pending, "1", ex=LOCK_TTL)
    result: Outcome | None = None
    while True:
        token = uuid.uuid4().hex
        if not conn.set(_lock_key(queue), token, nx=True, ex=LOCK_TTL):
            return result  # the holder will see our pending mark
        try:
            # DEL answers 1 when the mark was there: take it and do one pass for it.
            while conn.delete(pending):
                result = work()
        finally:
            release(keys=[_lock_key(queue)], args=[token])
        if not conn.exists(pending):
            return result
