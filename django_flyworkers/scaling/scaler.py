"""Wake-up and reconcile: read Redis and the Machines API, plan with the pure policy, apply.

``wake(queue)`` is what an enqueue triggers. It first asks Redis whether live or booting
workers already cover the backlog (no API call at all in the common case). Otherwise one
process at a time per queue, a single-flight lock in Redis, lists the Machines, plans and
applies; everyone else leaves a "pending" mark that the lock holder picks up, so a burst of
thousands of enqueues makes a handful of API calls. A list younger than a second is reused
(:mod:`~django_flyworkers.scaling.fleet`), so a burst on several queues lists about once.

The pieces: :mod:`.snapshot` reads Redis, :mod:`.fleet` lists Machines, :mod:`.policy`
decides, :mod:`.apply` carries the plan out through :mod:`.actions` (which records every
call), and :mod:`.locks` holds the per-queue and global locks, renewed before every API call.
A dedicated queue (``MODE: "dedicated"``) takes the same path to the point of planning, then
:mod:`.dedicated` creates a Machine per waiting job instead.
API failures are logged and recorded as ScaleEvents, never raised: the job stays in Redis
for the next wake or ``flyworkers_scale``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from redis import Redis

from django_flyworkers import ledger, presence
from django_flyworkers.api import get_client
from django_flyworkers.conf import FlySettings, QueueProfile, get_settings
from django_flyworkers.exceptions import NotConfigured, UnknownQueue
from django_flyworkers.machines import Machine, MachinesAPIError
from django_flyworkers.models import ScaleEvent
from django_flyworkers.queue import get_queue
from django_flyworkers.scaling import dedicated, fleet, policy, spec
from django_flyworkers.scaling.apply import Pass, ReconcileResult, apply_plan, restart
from django_flyworkers.scaling.locks import Locks, lock_ttl
from django_flyworkers.scaling.policy import Plan, QueueSnapshot
from django_flyworkers.scaling.snapshot import end_dead_boots, snapshot

logger = logging.getLogger("django_flyworkers.scaler")

LOCK_WAIT = 60.0
"""How long ``reconcile`` and the global pass wait for a lock another process holds."""
GLOBAL_LOCK = "flyworkers:wake:global:lock"
LIST_MAX_AGE = 1.0
"""Seconds a Machines list is reused by the next pass in this process (Fly: ~1 list/s)."""


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


def _start_pass(queue: str, reason: str, user: str, locks: Locks | None = None) -> Pass:
    settings = get_settings()
    return Pass(
        queue,
        _profile(queue),
        settings,
        get_queue(queue),
        reason,
        user,
        locks or Locks(lock_ttl(settings)),
    )


def _gather(
    p: Pass, *, max_age: float, dry_run: bool
) -> tuple[ReconcileResult, list[Machine] | None]:
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
    result.snapshot = end_dead_boots(
        p.conn, snap, since, everything, reason=p.reason, dry_run=dry_run
    )
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
        result, everything = _gather(p, max_age=LIST_MAX_AGE, dry_run=dry_run)
        if everything is None:
            return result
        if p.profile.mode == "dedicated":
            active = _global_active(everything, p.settings)
            dedicated.reconcile(p, result, global_active=active, exclude=exclude, dry_run=dry_run)
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
        apply_plan(p, plan, result)
    # Restarts wait for a leaving Machine to stop; they add no Machine, so they need no
    # global headroom and must not hold up other queues.
    if plan.restart:
        restart(p, plan, result)
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

    Raises ValueError when ``count`` is outside 0..MAX_MACHINES, or the queue is dedicated
    (it keeps no pool), before any API call.
    """
    profile = _profile(queue)
    if profile.mode == "dedicated":
        raise ValueError(f"queue {queue!r} is dedicated: it keeps no pool of Machines to size")
    if not 0 <= count <= profile.max_machines:
        raise ValueError(
            f"--count {count} is outside 0..{profile.max_machines} (MAX_MACHINES of {queue!r})"
        )
    p = _start_pass(queue, "resize", user)
    with p.locks.hold(p.conn, _lock_key(queue), LOCK_WAIT) as held:
        if not held:
            return _busy(queue, f"queue {queue!r}")
        result, everything = _gather(p, max_age=0.0, dry_run=dry_run)
        if everything is None:
            return result
        image = p.settings.image or ""
        result.plan = policy.plan_pool(
            result.snapshot, result.machines, profile, count, image=image
        )
        if not dry_run:
            apply_plan(p, result.plan, result)
    return result


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
    ``connection`` is the Redis the job was pushed on: see :func:`check_connection`.
    """
    settings = get_settings()
    profile = settings.profile(queue)
    if profile is None or settings.wake_mode == "off":
        return None
    if connection is not None and not check_connection(queue, connection, user=user):
        return None
    rq_queue = get_queue(queue)
    conn = rq_queue.connection
    if profile.mode == "dedicated":
        if dedicated.covered(conn, rq_queue, profile):
            return None
    elif presence.covered(
        conn, queue, profile.jobs_per_machine, profile.max_machines, key=rq_queue.key
    ):
        return None
    if exclude:
        # A pass with exclusions must not run on behalf of other waiters (it would skip the
        # very Machine they may need): one pass of its own, then theirs.
        return reconcile(queue, reason=reason, exclude=exclude, user=user)
    work = functools.partial(_reconcile, queue, reason=reason, user=user)
    return single_flight(conn, queue, work)


def check_connection(queue: str, connection: Redis, *, user: str = "") -> bool:
    """Is ``connection`` (where a job for ``queue`` was pushed) the Redis that ``RQ_QUEUES``
    names for ``queue``? If not, workers would never see the job: log an ERROR naming both,
    record it as a failed wake, and return False. Cheap when it is the configured client."""
    configured: Redis = get_queue(queue).connection
    if same_redis(connection, configured):
        return True

    def name(conn: Redis) -> str:
        kwargs = conn.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        return f"{where}/{kwargs.get('db', 0)}"

    detail = (
        f"a job for queue {queue!r} was pushed on Redis {name(connection)}, but RQ_QUEUES "
        f"names {name(configured)} for it: workers read only that one, so no Machine is "
        "started. Build the queue with django_rq.get_queue(), or fix RQ_QUEUES."
    )
    logger.error("flyworkers: %s", detail)
    ledger.record_event(
        queue, "wake", reason="enqueue", outcome=ScaleEvent.Outcome.ERROR, detail=detail, user=user
    )
    return False


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
