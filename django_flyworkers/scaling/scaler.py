"""Wake-up and reconcile: read Redis and the Machines API, plan with the pure policy, apply.

``wake(queue)`` is what an enqueue triggers. It first asks Redis whether live or booting
workers already cover the backlog (no API call at all in the common case). Otherwise one
process at a time per queue, a single-flight lock in Redis, lists the Machines, plans and
applies; everyone else leaves a "pending" mark that the lock holder picks up, so a burst of
thousands of enqueues makes a handful of API calls. A list younger than a second is reused
(:mod:`~django_flyworkers.scaling.fleet`), so a burst on several queues lists about once.

Every action goes through :mod:`~django_flyworkers.scaling.actions`, which records it. API
failures are logged and recorded as ScaleEvents, never raised: the job stays in Redis for the
next wake or ``flyworkers_scale``. The locks are redis-py ``Lock`` objects, renewed before
every API call, so a pass against a slow API never outlives its lock.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from redis import Redis
from redis.exceptions import LockError
from redis.lock import Lock
from rq.job import Job
from rq.queue import Queue
from rq.registry import ScheduledJobRegistry, StartedJobRegistry

from django_flyworkers import ledger, presence, signals
from django_flyworkers.api import get_client
from django_flyworkers.conf import FlySettings, QueueProfile, get_settings
from django_flyworkers.exceptions import NotConfigured, UnknownQueue
from django_flyworkers.machines import Machine, MachinesAPIError, MachinesClient
from django_flyworkers.models import ScaleEvent
from django_flyworkers.queue import get_queue
from django_flyworkers.scaling import actions, fleet, policy, spec
from django_flyworkers.scaling.actions import ActionResult
from django_flyworkers.scaling.policy import Plan, QueueSnapshot

logger = logging.getLogger("django_flyworkers.scaler")

LOCK_WAIT = 60.0
"""How long ``reconcile`` and the global pass wait for a lock another process holds."""
GLOBAL_LOCK = "flyworkers:wake:global:lock"
RESTART_WAIT = 30.0
"""How long a wake waits for a leaving Machine to stop before starting it again."""
LIST_MAX_AGE = 1.0
"""Seconds a Machines list is reused by the next pass in this process (Fly: ~1 list/s)."""


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


# -- locks ------------------------------------------------------------------------------------


def lock_ttl(settings: FlySettings) -> float:
    """Seconds a lock lives unless renewed: longer than any single API call can take."""
    return max(60.0, 2 * (settings.http_timeout + settings.api_retry_seconds) + RESTART_WAIT)


class Locks:
    """The Redis locks one pass holds; ``renew()`` extends them all (before each API call)."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.held: list[Lock] = []

    def renew(self) -> None:
        for lock in self.held:
            try:
                lock.extend(self.ttl, replace_ttl=True)
            except LockError:
                logger.warning("flyworkers: lost scaling lock %s", lock.name)

    @contextmanager
    def hold(self, conn: Redis, key: str, wait: float | None) -> Iterator[bool]:
        """Hold ``key`` (waiting up to ``wait`` s; None: do not wait); yields whether held."""
        lock = conn.lock(key, timeout=self.ttl, sleep=0.05, thread_local=False)
        if wait is None:
            got = lock.acquire(blocking=False)
        else:
            got = lock.acquire(blocking=True, blocking_timeout=wait)
        if not got:
            yield False
            return
        self.held.append(lock)
        try:
            yield True
        finally:
            self.held.remove(lock)
            with _suppress_lock_error():
                lock.release()


@contextmanager
def _suppress_lock_error() -> Iterator[None]:
    try:
        yield
    except LockError:  # expired meanwhile: someone else may hold it now, leave theirs alone
        logger.warning("flyworkers: a scaling lock expired before it was released")


# -- the snapshot -----------------------------------------------------------------------------


def snapshot(rq_queue: Queue) -> tuple[QueueSnapshot, dict[str, float]]:
    """Demand and presence for ``rq_queue`` from Redis, in one round trip.

    Returns the snapshot and the booting Machines with the time (Unix seconds) each was
    marked, which :func:`end_dead_boots` needs.
    """
    conn, name, now = rq_queue.connection, rq_queue.name, time.time()
    scheduled = ScheduledJobRegistry(name, connection=conn)
    started = StartedJobRegistry(name, connection=conn)
    with conn.pipeline(transaction=False) as pipe:
        pipe.llen(rq_queue.key)
        pipe.zcount(scheduled.key, "-inf", now)
        pipe.zcard(started.key)
        pipe.lindex(rq_queue.key, 0)
        presence.read_members(pipe, name, now)
        results = pipe.execute()
    queued, due, running, oldest_id = results[:4]
    live, booting = presence.members(results)
    boot_timeout = get_settings().boot_timeout
    snap = QueueSnapshot(
        queue=name,
        queued=int(queued),
        due_scheduled=int(due),
        started=int(running),
        live_workers=len(live),
        live_machines=live,
        booting=frozenset(booting),
        oldest_age=_age(conn, rq_queue, oldest_id, now),
    )
    return snap, {machine_id: expiry - boot_timeout for machine_id, expiry in booting.items()}


def _age(conn: Redis, rq_queue: Queue, job_id: bytes | None, now: float) -> float | None:
    if not job_id:
        return None
    job_class: type[Job] = getattr(rq_queue, "job_class", Job)
    raw = conn.hget(job_class.key_for(job_id.decode()), "enqueued_at")
    if not raw:
        return None
    try:
        stamp = datetime.fromisoformat(raw.decode().replace("Z", "+00:00"))
    except ValueError:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return max(0.0, now - stamp.timestamp())


def end_dead_boots(
    conn: Redis,
    snap: QueueSnapshot,
    since: dict[str, float],
    machines: Sequence[Machine],
    *,
    reason: str,
) -> QueueSnapshot:
    """Stop counting booting Machines the list shows are no longer starting.

    A Machine whose worker crashed (or was killed) before announcing itself would otherwise
    count as capacity for ``BOOT_TIMEOUT`` while its queue's jobs wait.
    """
    listed = {m.id: m for m in machines}
    dead = [
        listed[machine_id]
        for machine_id, marked_at in since.items()
        if machine_id in listed and policy.boot_over(listed[machine_id], marked_at)
    ]
    if not dead:
        return snap
    presence.end_booting(conn, snap.queue, [m.id for m in dead])
    for machine in dead:
        logger.warning(
            "flyworkers: Machine %s of queue %s is %s before its worker announced itself",
            machine.id,
            snap.queue,
            machine.state,
        )
        record_stopped(snap.queue, machine, f"{reason}: it stopped while booting")
    return dataclasses.replace(snap, booting=snap.booting - {m.id for m in dead})


STOPPED_STATES = frozenset({"stopped", "failed"})


def record_stopped(queue: str, machine: Machine, reason: str) -> None:
    """Mirror a Machine the API shows not running; tell ``machine_stopped`` listeners when
    the ledger learns from this that it stopped."""
    change = ledger.record_machine_seen(
        machine.id, queue=queue, state=machine.state, last_exit_code=machine.last_exit_code
    )
    stopped_now(queue, machine, change, reason)


def stopped_now(queue: str, machine: Machine, change: str | None, reason: str) -> None:
    """Send ``machine_stopped`` if ``change`` (from ``ledger.record_machine_seen``) says the
    ledger just learned that ``machine`` stopped."""
    if machine.state in STOPPED_STATES and change and change.endswith(f"-> {machine.state}"):
        signals.machine_stopped.send_robust(
            queue,
            queue=queue,
            machine_id=machine.id,
            exit_code=machine.last_exit_code,
            reason=reason,
        )


# -- passes -----------------------------------------------------------------------------------


def _profile(queue: str) -> QueueProfile:
    profile = get_settings().profile(queue)
    if profile is None:
        raise KeyError(f"queue {queue!r} is not in FLYWORKERS['QUEUES']")
    return profile


def _queue_machines(machines: Sequence[Machine], queue: str) -> list[Machine]:
    return [m for m in machines if spec.queue_of(m) == queue]


def _active(machine: Machine) -> bool:
    """Counts against GLOBAL_MAX_MACHINES: running, or created to run (not a stopped pool one)."""
    if spec.queue_of(machine) is None:
        return False
    if machine.state in policy.RUNNING:
        return True
    return machine.state == "created" and not spec.is_pool(machine)


def _global_active(machines: Sequence[Machine], settings: FlySettings) -> int:
    """Machines counting against the global cap: active per the list, plus every queue's
    booting ones (another process may have created them after our list was taken)."""
    active = {m.id for m in machines if _active(m)}
    now = time.time()
    for name in settings.queues:
        try:
            conn = get_queue(name).connection
        except UnknownQueue:  # reported by the system checks
            continue
        booting = conn.zrangebyscore(presence.booting_key(name), now, "+inf")
        active |= {member.decode() for member in booting}
    return len(active)


@dataclass
class _Pass:
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


def _start_pass(queue: str, reason: str, user: str, locks: Locks | None = None) -> _Pass:
    settings = get_settings()
    return _Pass(
        queue,
        _profile(queue),
        settings,
        get_queue(queue),
        reason,
        user,
        locks or Locks(lock_ttl(settings)),
    )


def _gather(p: _Pass, *, max_age: float) -> tuple[ReconcileResult, list[Machine] | None]:
    """Redis snapshot first, then the Machines list (None, recorded, if the API failed)."""
    snap, since = snapshot(p.rq_queue)
    result = ReconcileResult(p.queue, snap, [], Plan(queue=p.queue, reason="could not list"))
    started = time.monotonic()
    try:
        everything = fleet.listing(p.client(), max_age=max_age)
    except (MachinesAPIError, NotConfigured) as exc:
        elapsed = int((time.monotonic() - started) * 1000)
        logger.warning("flyworkers: list for queue %s failed: %s", p.queue, exc)
        result.errors.append(f"list: {exc}")
        ledger.record_event(
            p.queue,
            "list",
            reason=p.reason,
            outcome=ScaleEvent.Outcome.ERROR,
            detail=str(exc),
            duration_ms=elapsed,
            user=p.user,
        )
        return result, None
    result.snapshot = end_dead_boots(p.conn, snap, since, everything, reason=p.reason)
    result.machines = _queue_machines(everything, p.queue)
    return result, everything


def _reconcile(
    queue: str,
    *,
    reason: str,
    dry_run: bool = False,
    exclude: Sequence[str] = (),
    user: str = "",
    locks: Locks | None = None,
) -> ReconcileResult:
    """One pass; the caller holds the queue's lock. Plan and starts run under the global lock
    so that no two queues spend the same GLOBAL_MAX_MACHINES headroom."""
    p = _start_pass(queue, reason, user, locks)
    with p.locks.hold(p.conn, GLOBAL_LOCK, LOCK_WAIT) as held:
        if not held:
            return _busy(queue, "global scaling")
        result, everything = _gather(p, max_age=LIST_MAX_AGE)
        if everything is None:
            return result
        result.plan = plan = policy.plan(
            result.snapshot,
            result.machines,
            p.profile,
            image=p.settings.image or "",
            global_active=_global_active(everything, p.settings),
            global_cap=p.settings.global_max_machines,
            exclude=exclude,
        )
        if dry_run:
            return result
        for machine_id in plan.stale:
            presence.withdraw(p.conn, queue, machine_id)
        _apply(p, plan, result)
    # Restarts wait for a leaving Machine to stop; they add no Machine, so they need no
    # global headroom and must not hold up other queues.
    if plan.restart:
        _restart(p, plan, result)
    return result


def _busy(queue: str, what: str) -> ReconcileResult:
    result = ReconcileResult(
        queue, QueueSnapshot(queue), [], Plan(queue=queue, reason=f"{what} busy")
    )
    result.errors.append(f"{what} lock held by another process; try again")
    return result


def _idle(queue: str, skip_idle: bool) -> ReconcileResult | None:
    """A pass with nothing to decide, when ``skip_idle``: no demand in Redis, nothing booting,
    and nothing of the queue in motion in the last list. None when the API is needed."""
    if not skip_idle:
        return None
    try:
        last = fleet.last_listed(get_client())
    except NotConfigured:
        return None
    if last is None:
        return None
    profile = _profile(queue)
    snap, _ = snapshot(get_queue(queue))
    ours = _queue_machines(last, queue)
    moving = any(m.is_transient or (m.state == "created" and not spec.is_pool(m)) for m in ours)
    if snap.backlog or snap.booting or moving or len(ours) < profile.min_machines:
        return None
    plan = Plan(queue=queue, reason="no demand and nothing in motion: API not asked")
    return ReconcileResult(queue, snap, ours, plan, listed=False)


def reconcile(
    queue: str,
    *,
    reason: str = "reconcile",
    dry_run: bool = False,
    exclude: Sequence[str] = (),
    user: str = "",
    skip_idle: bool = False,
) -> ReconcileResult:
    """One pass for ``queue`` under its lock: snapshot, list Machines, plan, apply.

    Used by ``flyworkers_scale`` (``skip_idle`` for ``--watch``: no API call when Redis shows
    no demand and the last list showed nothing in motion); wake-ups that arrived meanwhile
    are served afterwards.
    """
    idle = _idle(queue, skip_idle)
    if idle is not None:
        return idle
    conn = get_queue(queue).connection
    locks = Locks(lock_ttl(get_settings()))
    with locks.hold(conn, _lock_key(queue), LOCK_WAIT) as held:
        if not held:
            return _busy(queue, f"queue {queue!r}")
        result = _reconcile(
            queue, reason=reason, dry_run=dry_run, exclude=exclude, user=user, locks=locks
        )
    if not dry_run and conn.exists(_pending_key(queue)):
        single_flight(conn, queue, functools.partial(_reconcile, queue, reason=reason))
    return result


def resize(queue: str, count: int, *, dry_run: bool = False, user: str = "") -> ReconcileResult:
    """Make ``queue``'s pool ``count`` Machines: create stopped ones or destroy stopped surplus.

    Raises ValueError when ``count`` is outside 0..MAX_MACHINES, before any API call.
    """
    profile = _profile(queue)
    if not 0 <= count <= profile.max_machines:
        raise ValueError(
            f"--count {count} is outside 0..{profile.max_machines} (MAX_MACHINES of {queue!r})"
        )
    p = _start_pass(queue, "resize", user)
    with p.locks.hold(p.conn, _lock_key(queue), LOCK_WAIT) as held:
        if not held:
            return _busy(queue, f"queue {queue!r}")
        result, everything = _gather(p, max_age=0.0)
        if everything is None:
            return result
        image = p.settings.image or ""
        result.plan = policy.plan_pool(
            result.snapshot, result.machines, profile, count, image=image
        )
        if not dry_run:
            _apply(p, result.plan, result)
    return result


# -- applying a plan --------------------------------------------------------------------------


def _apply(p: _Pass, plan: Plan, result: ReconcileResult) -> None:
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
        machine = machines[machine_id]
        if machine_id in plan.update:
            config = spec.machine_config(p.profile, p.settings, machine.config_copy())
            updated = result.add(
                actions.update(p.client(), p.queue, machine_id, config, reason=why, user=p.user)
            )
            if not updated:
                continue
            machine = updated.machine or machine
            fleet.note(machine)
        if result.add(actions.start(p.client(), p.queue, machine_id, reason=why, user=p.user)):
            _launched(p, machine, "starting", why)

    region = p.profile.region or p.settings.region
    for _ in range(plan.create):
        config = spec.machine_config(p.profile, p.settings)
        created = result.add(_create(p, config, region, why))
        if created.machine is not None:
            _launched(p, created.machine, created.machine.state or "created", why)

    for _ in range(plan.create_stopped):
        config = spec.machine_config(p.profile, p.settings, pool=True)
        created = result.add(_create(p, config, region, f"{why}; stopped, for the pool", True))
        if created.machine is not None:
            fleet.note(created.machine)
            _remember(p, created.machine, created.machine.state or "created")

    for machine_id in plan.destroy:
        if result.add(actions.destroy(p.client(), p.queue, machine_id, reason=why, user=p.user)):
            fleet.drop(machine_id)
            ledger.record_machine_seen(machine_id, queue=p.queue, state="destroyed")


def _create(
    p: _Pass, config: dict[str, Any], region: str | None, why: str, stopped: bool = False
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


def _restart(p: _Pass, plan: Plan, result: ReconcileResult) -> None:
    """Start Machines whose worker is leaving, once they have stopped."""
    why = f"{p.reason}: {plan.reason}"
    machines = {m.id: m for m in result.machines}
    for machine_id in plan.restart:
        machine = machines[machine_id]
        stopped = actions.wait(
            p.client(),
            p.queue,
            machine_id,
            "stopped",
            reason=f"{why}; worker leaving",
            timeout=RESTART_WAIT,
            instance_id=machine.instance_id or None,
            user=p.user,
        )
        if result.add(stopped) and result.add(
            actions.start(p.client(), p.queue, machine_id, reason=why, user=p.user)
        ):
            _launched(p, machine, "starting", why)


def _remember(p: _Pass, machine: Machine, state: str) -> None:
    ledger.record_machine_seen(
        machine.id,
        queue=p.queue,
        state=state,
        name=machine.name,
        region=machine.region,
        image=machine.image or p.settings.image or "",
        guest=dict(p.profile.guest),
    )


def _launched(p: _Pass, machine: Machine, state: str, why: str) -> None:
    """A Machine was started or created to boot: count it as booting, record it, tell listeners."""
    presence.mark_booting(p.conn, p.queue, machine.id, p.settings.boot_timeout)
    fleet.note(machine, state=state)
    _remember(p, machine, state)
    signal = signals.machine_created if state == "created" else signals.machine_started
    signal.send_robust(p.queue, queue=p.queue, machine_id=machine.id, reason=why)


# -- waking -----------------------------------------------------------------------------------


def same_redis(a: Redis, b: Redis) -> bool:
    """Do two clients talk to the same Redis database (host, port or socket, db)?"""
    if a is b:
        return True

    def where(conn: Redis) -> tuple[Any, ...]:
        kwargs = conn.connection_pool.connection_kwargs
        return (kwargs.get("host"), kwargs.get("port"), kwargs.get("path"), kwargs.get("db", 0))

    return where(a) == where(b)


def wake(
    queue: str,
    *,
    reason: str = "enqueue",
    exclude: Sequence[str] = (),
    user: str = "",
    connection: Redis | None = None,
) -> ReconcileResult | None:
    """Make sure ``queue`` has workers for its backlog. Never raises for API trouble.

    Returns the reconcile result when this call did the work, None when Redis showed the
    backlog covered, the queue is not managed, or another process is already waking it.
    ``exclude`` names Machines that must not be started (a leaving worker's own).
    ``connection`` is the Redis the job was pushed on: if it is not the one ``RQ_QUEUES``
    names for ``queue``, no worker would ever see the job, so nothing is started and the
    mismatch is logged as an ERROR and recorded.
    """
    settings = get_settings()
    profile = settings.profile(queue)
    if profile is None or settings.wake_mode == "off":
        return None
    rq_queue = get_queue(queue)
    conn = rq_queue.connection
    if connection is not None and not same_redis(connection, conn):
        _wrong_redis(queue, connection, conn, user)
        return None
    if presence.covered(
        conn, queue, profile.jobs_per_machine, profile.max_machines, key=rq_queue.key
    ):
        return None
    if exclude:
        # A pass with exclusions must not run on behalf of other waiters (it would skip the
        # very Machine they may need): one pass of its own, then theirs.
        return reconcile(queue, reason=reason, exclude=exclude, user=user)
    work = functools.partial(_reconcile, queue, reason=reason, user=user)
    return single_flight(conn, queue, work)


def _wrong_redis(queue: str, pushed_on: Redis, configured: Redis, user: str) -> None:
    def name(conn: Redis) -> str:
        kwargs = conn.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        return f"{where}/{kwargs.get('db', 0)}"

    detail = (
        f"a job for queue {queue!r} was pushed on Redis {name(pushed_on)}, but RQ_QUEUES "
        f"names {name(configured)} for it: workers read only that one, so no Machine was "
        "started. Build the queue with django_rq.get_queue(), or fix RQ_QUEUES."
    )
    logger.error("flyworkers: %s", detail)
    ledger.record_event(
        queue, "wake", reason="enqueue", outcome=ScaleEvent.Outcome.ERROR, detail=detail, user=user
    )


def _lock_key(queue: str) -> str:
    return f"flyworkers:wake:{queue}:lock"


def _pending_key(queue: str) -> str:
    return f"flyworkers:wake:{queue}:pending"


def single_flight(
    conn: Redis, queue: str, work: Callable[..., ReconcileResult]
) -> ReconcileResult | None:
    """Run ``work`` in at most one process per queue; requests meanwhile make it run again.

    ``work`` is called with ``locks=`` (the held queue lock, to renew between API calls).
    """
    pending = _pending_key(queue)
    ttl = lock_ttl(get_settings())
    conn.set(pending, "1", ex=int(ttl))
    result: ReconcileResult | None = None
    while True:
        locks = Locks(ttl)
        with locks.hold(conn, _lock_key(queue), None) as held:
            if not held:
                return result  # the holder will see our pending mark
            # DEL answers 1 when the mark was there: take it and do one pass for it.
            while conn.delete(pending):
                result = work(locks=locks)
        if not conn.exists(pending):
            return result
