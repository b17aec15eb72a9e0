"""What ``rundemo.py`` shows: progress redrawn in place, and the summary table at the end.

Reads the ledger (``FlyJob``, ``ScaleEvent``) and the emulator's stats; changes nothing.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, TextIO

FINAL = ("finished", "failed", "canceled", "stopped")


def job_rows(job_ids: Sequence[str]) -> list[Any]:
    from django_flyworkers.models import FlyJob

    return list(FlyJob.objects.filter(job_id__in=job_ids))


def machines(fly: Any) -> dict[str, dict[str, Any]]:
    return dict(fly.stats()["machines"])


def queue_of(info: dict[str, Any]) -> str:
    return str(((info.get("config") or {}).get("metadata") or {}).get("flyworkers_queue", "?"))


def progress_lines(
    title: str, rows: list[Any], fleet: dict[str, dict[str, Any]], expected: int
) -> list[str]:
    queues = sorted({row.queue for row in rows} | {queue_of(m) for m in fleet.values()})
    lines = [title]
    for queue in queues:
        status = Counter(row.status for row in rows if row.queue == queue)
        total = sum(status.values())
        done = sum(status[s] for s in FINAL)
        filled = 10 * done // total if total else 0
        extra = f", {status['scheduled']} scheduled" if status["scheduled"] else ""
        lines.append(
            f"  {queue:8s} [{'#' * filled}{'.' * (10 - filled)}] {done:3d}/{total:<3d} done,"
            f" {status['queued']:2d} queued, {status['started']} running,"
            f" {status['failed']} failed{extra}"
        )
    if len(rows) < expected:
        lines.append(f"  ({expected - len(rows)} jobs not in the ledger yet)")
    parts = []
    for queue in queues:
        states = Counter(info["state"] for info in fleet.values() if queue_of(info) == queue)
        text = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "none"
        parts.append(f"{queue}: {text}")
    lines.append(f"  Machines  {' | '.join(parts) or 'none yet'}")
    return lines


class Screen:
    """Redraws a block of lines in place on a terminal; prints every few seconds otherwise."""

    def __init__(self, out: TextIO, every: float = 3.0) -> None:
        self.out = out
        self.tty = out.isatty() and os.environ.get("TERM") != "dumb"
        self.drawn = 0
        self.every = every
        self.last = 0.0

    def draw(self, lines: list[str], force: bool = False) -> None:
        if self.tty:
            if self.drawn:
                self.out.write(f"\x1b[{self.drawn}A\r\x1b[J")  # up, then clear to the end
            # A line that wraps would throw the next redraw's count off: cut to the width.
            width = shutil.get_terminal_size().columns - 1
            self.out.write("\n".join(line[:width] for line in lines) + "\n")
            self.drawn = len(lines)
        elif force or time.monotonic() - self.last >= self.every:
            self.out.write("\n".join(lines) + "\n")
            self.last = time.monotonic()
        self.out.flush()

    def say(self, text: str) -> None:
        """A line above the redrawn block, which starts afresh below it."""
        self.out.write(text + "\n")
        self.out.flush()
        self.drawn = 0
        self.last = 0.0


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def latencies(rows: list[Any], scheduled: dict[str, Any]) -> list[float]:
    """Enqueue-to-start seconds of first attempts (a retry's start is not a wake-up)."""
    return [
        (row.started_at - row.enqueued_at).total_seconds()
        for row in rows
        if row.job_id not in scheduled and row.attempts == 1 and row.started_at and row.enqueued_at
    ]


def queue_table(
    run: Any, rows: list[Any], fleet: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per queue: jobs by outcome, Machines created and started, billed and job seconds."""
    from django_flyworkers.models import ScaleEvent

    events = ScaleEvent.objects.filter(created_at__gte=run.began, outcome="ok")
    # A start of a suspended Machine is a resume (its detail says so): counted apart.
    actions = Counter(
        (e.queue, "resume" if e.action == "start" and e.detail == "resumed" else e.action)
        for e in events
    )
    queues = sorted({row.queue for row in rows} | {queue_of(m) for m in fleet.values()})
    table: dict[str, dict[str, Any]] = {}
    for queue in queues:
        mine = [row for row in rows if row.queue == queue]
        table[queue] = {
            "jobs": len(mine),
            "finished": sum(row.status == "finished" for row in mine),
            "failed": sum(row.status == "failed" for row in mine),
            "retried": sum(row.attempts > 1 for row in mine),
            "created": actions[(queue, "create")],
            "started": actions[(queue, "start")],
            "resumed": actions[(queue, "resume")],
            "billed": sum(m["billed_seconds"] for m in fleet.values() if queue_of(m) == queue),
            "run": sum(row.run_seconds or 0.0 for row in mine),
            "latencies": latencies(mine, run.scheduled),
        }
    return table


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def table_lines(table: dict[str, dict[str, Any]], total: dict[str, Any]) -> list[str]:
    header = (
        f"  {'queue':9s}{'jobs':>5s}{'done':>6s}{'failed':>7s}{'retried':>8s}{'created':>8s}"
        f"{'started':>8s}{'resumed':>8s}{'billed':>9s}{'job-time':>9s}{'p50':>7s}{'p95':>7s}"
    )
    lines = ["", "Summary", header, "  " + "-" * (len(header) - 2)]
    for name, q in [*table.items(), ("total", total)]:
        p50, p95 = percentile(q["latencies"], 50), percentile(q["latencies"], 95)
        lines.append(
            f"  {name:9s}{q['jobs']:5d}{q['finished']:6d}{q['failed']:7d}{q['retried']:8d}"
            f"{q['created']:8d}{q['started']:8d}{q['resumed']:8d}{q['billed']:8.1f}s{q['run']:8.1f}s"
            f"{_fmt(p50):>7s}{_fmt(p95):>7s}"
        )
    return [
        *lines,
        "",
        "  created: Machines created; started: stopped Machines started again; resumed:",
        "  suspended Machines resumed (DEMO_IDLE_ACTION=suspend). billed: Machine-seconds in",
        "  state started (what Fly bills CPU and RAM for); job-time: time inside jobs;",
        "  p50/p95: enqueue-to-start latency of first attempts.",
    ]


def notes(run: Any, rows: list[Any], fleet: dict[str, dict[str, Any]]) -> list[str]:
    """Latency per wave, the scheduled digest's delay, and any queue above its cap."""
    from django_flyworkers.conf import get_settings

    lines = []
    resumes = sum(info.get("resumes", 0) for info in fleet.values())
    for number, wave in enumerate(run.waves, 1):
        values = latencies(job_rows(wave), run.scheduled)
        again = "suspended Machines resumed" if resumes else "stopped Machines started"
        how = "Machines created" if number == 1 else again
        lines.append(
            f"  Wave {number} ({how}): enqueue-to-start p50 {_fmt(percentile(values, 50))}, "
            f"p95 {_fmt(percentile(values, 95))}."
        )
    for job_id, due in run.scheduled.items():
        row = next((r for r in rows if r.job_id == job_id), None)
        if row is not None and row.started_at:
            late = (row.started_at - due).total_seconds()
            lines.append(f"  The scheduled digest started {late:.1f}s after it came due.")
    for queue in sorted({queue_of(m) for m in fleet.values()}):
        profile = get_settings().profile(queue)
        count = sum(queue_of(m) == queue for m in fleet.values())
        if profile is not None and count > profile.max_machines:
            lines.append(
                f"  WARNING: queue {queue} has {count} Machines, above its MAX_MACHINES "
                f"({profile.max_machines})."
            )
    return lines


def states(fleet: dict[str, dict[str, Any]]) -> set[str]:
    return {info["state"] for info in fleet.values()}


def summary(run: Any, fly: Any) -> tuple[list[str], dict[str, Any]]:
    """The table, and the same numbers as a dict."""
    rows = job_rows(run.job_ids)
    stats = fly.stats()
    fleet = stats["machines"]
    table = queue_table(run, rows, fleet)
    total: dict[str, Any] = {
        key: sum(q[key] for q in table.values())
        for key in ("jobs", "finished", "failed", "retried", "created", "started", "resumed", "run")
    }
    total["billed"] = float(stats["total_billed_seconds"])
    total["latencies"] = latencies(rows, run.scheduled)
    calls = stats.get("calls", {})
    limited = sum(stats.get("rate_limited", {}).values())
    lines = table_lines(table, total) + notes(run, rows, fleet)
    resumes = sum(info.get("resumes", 0) for info in fleet.values())
    rest = "stopped or suspended" if resumes or "suspended" in states(fleet) else "stopped"
    lines += [
        f"  {total['billed']:.1f} Machine-seconds billed for {total['run']:.1f}s of jobs; "
        f"now every Machine is {rest} and nothing is billed.",
        f"  Machines API calls: {sum(calls.values())} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(calls.items()))}); "
        f"{limited} answered 429 and were retried.",
    ]
    data = {"queues": table, "total": total, "elapsed": run.elapsed(), "calls": calls}
    return lines, data
