"""One card per queue: what Redis says now and what the ledger says of the last hour,
day and month, in a fixed number of queries."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db.models import Case, Count, F, Q, Sum, Value, When
from django.db.models.functions import Coalesce, Greatest, Least
from django.utils import timezone

from django_flyworkers import presence
from django_flyworkers.conf import get_settings
from django_flyworkers.dashboard.sql import (
    EpochSeconds,
    percentiles,
    unindexed,
    wait_seconds,
)
from django_flyworkers.dashboard.window import DAY, clamp
from django_flyworkers.models import FlyJob, MachineRun, ScaleEvent, WorkerMachine
from django_flyworkers.queue import get_queue
from django_flyworkers.scaling.snapshot import age_of

FAILURE_RATE = 0.25
"""A queue whose jobs failed more often than this in the last hour (3 failures or more) needs
attention."""


LATE_AFTER = 60.0
"""A job queued longer than BOOT_TIMEOUT plus this, with no Machine started or booting, is
waiting for nothing."""


@dataclass
class QueueCard:
    """One managed queue at a glance."""

    queue: str
    max_machines: int
    queued: int = 0
    scheduled: int = 0
    next_due: datetime | None = None
    running: int = 0
    failed: int = 0
    oldest_age: float | None = None
    machines: dict[str, int] = field(default_factory=dict)
    finished_1h: int = 0
    failed_1h: int = 0
    finished_24h: int = 0
    failed_24h: int = 0
    wait_1h: tuple[float | None, float | None] = (None, None)
    wait_24h: tuple[float | None, float | None] = (None, None)
    billed_24h: float = 0.0
    billed_30d: float = 0.0
    cost_24h: float = 0.0
    cost_30d: float = 0.0
    attention: list[str] = field(default_factory=list)
    present: int = 0
    """Machines Redis shows serving or booting for this queue."""

    @property
    def serving(self) -> int:
        return self.machines.get("started", 0) + self.machines.get("booting", 0)


MACHINE_GROUPS = ("started", "booting", "stopped", "suspended", "other")


_GROUP_OF = {
    "started": "started",
    "starting": "booting",
    "created": "other",
    "stopping": "stopped",
    "stopped": "stopped",
    "suspending": "suspended",
    "suspended": "suspended",
}


def cards(now: datetime | None = None) -> tuple[list[QueueCard], dict[str, int]]:
    """A card per managed queue, and the global cap in use: ``{"in_use", "max"}``."""
    settings = get_settings()
    now = now or timezone.now()
    found = [
        QueueCard(name, profile.max_machines) for name, profile in sorted(settings.queues.items())
    ]
    by_name = {card.queue: card for card in found}
    live, booting = _read_redis(found)
    _machines(by_name, live, booting, now, settings.stuck_after)
    _job_counts(by_name, now)
    _costs(by_name, now)
    for card in found:
        _attention(card, settings.boot_timeout)
    _api_errors(by_name, now)
    in_use = sum(len(live[q] | booting[q]) for q in by_name)
    return found, {"in_use": in_use, "max": settings.global_max_machines}


def _read_redis(found: Sequence[QueueCard]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Queue sizes, registries and presence, one pipeline per queue plus one for job ages."""
    now = time.time()
    live: dict[str, set[str]] = {}
    booting: dict[str, set[str]] = {}
    oldest: list[tuple[QueueCard, Any, str]] = []
    for card in found:
        queue = get_queue(card.queue)
        conn = queue.connection
        with conn.pipeline(transaction=False) as pipe:
            pipe.llen(queue.key)
            pipe.zcard(queue.scheduled_job_registry.key)
            pipe.zrange(queue.scheduled_job_registry.key, 0, 0, withscores=True)
            pipe.zcard(queue.started_job_registry.key)
            pipe.zcard(queue.failed_job_registry.key)
            pipe.lindex(queue.key, 0)
            pipe.zrangebyscore(presence.active_key(card.queue), now, "+inf")
            pipe.zrangebyscore(presence.booting_key(card.queue), now, "+inf")
            queued, scheduled, first, running, failed, head, active, boot = pipe.execute()
        card.queued, card.scheduled, card.running, card.failed = (
            int(queued), int(scheduled), int(running), int(failed)
        )  # fmt: skip
        if first:
            card.next_due = datetime.fromtimestamp(first[0][1], UTC)
        live[card.queue] = {m.decode() for m in active}
        booting[card.queue] = {m.decode() for m in boot} - live[card.queue]
        card.present = len(live[card.queue]) + len(booting[card.queue])
        if head:
            oldest.append((card, conn, queue.job_class.key_for(head.decode())))
    for card, conn, key in oldest:
        raw = conn.hget(key, "enqueued_at")
        card.oldest_age = age_of(raw, now)
    return live, booting


def _machines(
    by_name: Mapping[str, QueueCard],
    live: Mapping[str, set[str]],
    booting: Mapping[str, set[str]],
    now: datetime,
    stuck_after: float,
) -> None:
    """Machines by state from the ledger, moved to started/booting where Redis says so."""
    for card in by_name.values():
        card.machines = dict.fromkeys(MACHINE_GROUPS, 0)
    counts = (
        WorkerMachine.objects.filter(queue__in=list(by_name))
        .exclude(state__in=["destroyed", "destroying"])
        .values_list("queue", "state")
        .annotate(n=Count("id"))
    )
    for queue, state, n in counts:
        by_name[queue].machines[_GROUP_OF.get(state, "other")] += n
    present = set().union(*live.values(), *booting.values()) if by_name else set()
    known = WorkerMachine.objects.filter(machine_id__in=present).values_list("machine_id", "state")
    ledger_state = dict(known)
    for queue, card in by_name.items():
        for members, group in ((live[queue], "started"), (booting[queue], "booting")):
            for machine_id in members:
                before = _GROUP_OF.get(ledger_state.get(machine_id, ""))
                if before is not None and before in card.machines:
                    card.machines[before] -= 1
                card.machines[group] += 1
    stuck = (
        WorkerMachine.objects.filter(
            queue__in=list(by_name), state__in=["started", "starting"],
            updated_at__lt=now - timedelta(seconds=stuck_after),
        )
        .exclude(machine_id__in=present)
        .values_list("queue", "machine_id")[:100]
    )  # fmt: skip
    for queue, machine_id in stuck:
        by_name[queue].attention.append(
            f"Machine {machine_id} is started without a live worker for over {stuck_after:.0f}s"
        )


def _job_counts(by_name: Mapping[str, QueueCard], now: datetime) -> None:
    hour, day = now - timedelta(hours=1), now - timedelta(days=1)
    finished, failed = Q(status="finished"), Q(status="failed")
    rows = (
        FlyJob.objects.filter(ended_at__gte=day)
        .order_by()
        .annotate(fw_queue=unindexed("queue"))
        .values_list("fw_queue")
        .annotate(
            f1=Count("id", filter=finished & Q(ended_at__gte=hour)),
            x1=Count("id", filter=failed & Q(ended_at__gte=hour)),
            f24=Count("id", filter=finished),
            x24=Count("id", filter=failed),
        )
    )
    for queue, f1, x1, f24, x24 in rows:
        if queue not in by_name:
            continue
        card = by_name[queue]
        card.finished_1h, card.failed_1h, card.finished_24h, card.failed_24h = f1, x1, f24, x24
    for since, attr in ((hour, "wait_1h"), (day, "wait_24h")):
        started = FlyJob.objects.filter(started_at__gte=since, enqueued_at__isnull=False)
        found = percentiles(started, wait_seconds(), unindexed("queue"), (0.5, 0.95))
        for queue, (p50, p95) in found.items():
            if queue in by_name:
                setattr(by_name[queue], attr, (clamp(p50), clamp(p95)))


def overlap(start: Any, end: Any, since: float, until: float) -> Any:
    """Seconds of ``[start, end]`` (epoch expressions) inside ``[since, until]``, at least 0."""
    clipped = Least(end, Value(until)) - Greatest(start, Value(since))
    return Greatest(Value(0.0), clipped)


def _costs(by_name: Mapping[str, QueueCard], now: datetime) -> None:
    """Billed Machine-seconds and cost over 24 h and 30 days, root filesystems included."""
    prices = get_settings().prices
    until = now.timestamp()
    start = EpochSeconds(F("started_at"))
    end = Coalesce(EpochSeconds(F("stopped_at")), Value(until))
    day, month = until - DAY, until - 30 * DAY

    def billed(since: float) -> Any:
        # Most runs lie wholly inside or outside the window: no date arithmetic for those.
        moment = datetime.fromtimestamp(since, UTC)
        return Sum(
            Case(
                When(started_at__gte=moment, stopped_at__isnull=False, then=F("billed_seconds")),
                When(stopped_at__lt=moment, then=Value(0.0)),
                default=overlap(start, end, since, until),
            )
        )

    guest = ("queue", "cpu_kind", "cpus", "memory_mb")
    runs = [
        # Closed runs and open ones apart: each is one index range, not an OR of two.
        *MachineRun.objects.filter(stopped_at__gte=now - timedelta(days=30))
        .order_by()
        .values_list(*guest)
        .annotate(s24=billed(day), s30=billed(month)),
        *MachineRun.objects.filter(stopped_at__isnull=True)
        .order_by()
        .values_list(*guest)
        .annotate(s24=billed(day), s30=billed(month)),
    ]
    for queue, kind, cpus, memory, s24, s30 in runs:
        if queue not in by_name:
            continue
        card, rate = by_name[queue], prices.started_per_second(kind, cpus, memory)
        card.billed_24h += s24 or 0.0
        card.billed_30d += s30 or 0.0
        card.cost_24h += (s24 or 0.0) * rate
        card.cost_30d += (s30 or 0.0) * rate
    born = EpochSeconds(F("created_at"))
    gone = Case(When(state="destroyed", then=EpochSeconds(F("updated_at"))), default=Value(until))
    lives = (
        WorkerMachine.objects.filter(queue__in=list(by_name))
        .exclude(state="destroyed", updated_at__lt=now - timedelta(days=30))
        .values_list("queue")
        .annotate(
            l24=Sum(overlap(born, gone, day, until)), l30=Sum(overlap(born, gone, month, until))
        )
    )
    for queue, l24, l30 in lives:
        card = by_name[queue]
        # What a Machine existed for minus what it ran: stopped (or suspended) seconds.
        card.cost_24h += max(0.0, (l24 or 0.0) - card.billed_24h) * prices.stopped_per_second
        card.cost_30d += max(0.0, (l30 or 0.0) - card.billed_30d) * prices.stopped_per_second


def _attention(card: QueueCard, boot_timeout: float) -> None:
    late = boot_timeout + LATE_AFTER
    if card.oldest_age is not None and card.oldest_age > late and card.present == 0:
        card.attention.insert(
            0, f"A job has waited {card.oldest_age:.0f}s and no Machine is started or booting"
        )
    ended = card.finished_1h + card.failed_1h
    if card.failed_1h >= 3 and card.failed_1h > FAILURE_RATE * ended:
        card.attention.append(f"{card.failed_1h} of {ended} jobs failed in the last hour")


def _api_errors(by_name: Mapping[str, QueueCard], now: datetime) -> None:
    rows = (
        ScaleEvent.objects.filter(
            queue__in=list(by_name), outcome="error", created_at__gte=now - timedelta(minutes=15)
        )
        .values_list("queue")
        .annotate(n=Count("id"))
    )
    for queue, n in rows:
        by_name[queue].attention.append(f"{n} Machines API calls failed in the last 15 minutes")
