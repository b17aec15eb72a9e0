"""What each way of running workers costs on one bursty trace, side by side on the emulator.

    .venv/bin/python benchmarks/cost_trace.py [--bursts 6] [--jobs-per-burst 30] [--gap 15]
        [--strategies stop,suspend,idle-30,always-on,dedicated] [--seed 10] [--preload]

The trace is fixed by ``--seed``: ``--bursts`` bursts, ``--gap`` seconds apart, of
``--jobs-per-burst`` jobs each, every job on one of two queues at random and sleeping 0.2-1.5 s.
The run replays the same trace once per strategy, each on a fresh emulator (Fly's rate limits
on) with real worker processes, a real redis-server and SQLite. A strategy is nothing but the
``FLYWORKERS`` profile both queues get:

  stop        ``{"MAX_MACHINES": 2}``: today's default (``IDLE_ACTION`` "stop", ``IDLE_TIMEOUT`` 0)
  suspend     ``IDLE_ACTION`` "suspend": idle workers suspend and are resumed
  idle-30     ``IDLE_TIMEOUT`` 30: workers stay up 30 s idle before they stop
  always-on   one worker per queue that never leaves (the product's command without
              ``--burst``), started before the trace
  dedicated   ``MODE`` "dedicated": a Machine created per job

``--preload`` forks the Machines from a preloaded interpreter, as the test suite's emulator
does: boots are then much cheaper than on Fly, so use it to check that the script runs, not
for its figures.

A strategy this build does not accept (its profile fails to parse or fails a ``flyworkers``
system check) is reported in one line and skipped.

Per strategy it prints:

  billed/job  Machine-seconds billed (the emulator's stats, from the first enqueue until every
              job is done and every Machine has stopped; always-on: until every job is done)
              divided by the seconds spent inside jobs (rq's ``started_at``..``ended_at``)
  wake p50/p95  per burst and queue: the burst's first enqueue on the queue -> its first job on
              the queue starting
  wait p50/p95  every job: enqueued -> started
  API calls   Machines API calls made (and how many were answered 429)
  boots       worker processes started (a resume is not a boot)
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _harness as h

QUEUES = ("alpha", "beta")
JOB_SECONDS = (0.2, 1.5)
DRAIN_TIMEOUT = 240.0
"""Seconds after the last burst for every job to end before a strategy counts as incomplete."""
SETTLE_TIMEOUT = 90.0
"""Seconds (beyond ``IDLE_TIMEOUT``) for every Machine to stop once the jobs are done."""
RUNNING = frozenset({"starting", "started", "stopping", "suspending", "replacing", "restarting"})


@dataclass(frozen=True)
class Strategy:
    """How both queues are run: a ``FLYWORKERS`` profile, made per queue."""

    name: str
    profile: Mapping[str, Any]
    always_on: bool = False
    """Workers are started before the trace and never leave."""
    pool: int = 0
    """Machines per queue made ready before the trace, as ``flyworkers_scale --count N``
    does (with ``IDLE_ACTION`` "suspend" they boot and suspend themselves). Like always-on's
    workers, that one-time start comes before the measurement and is not in its figures."""

    def for_queue(self, queue: str) -> dict[str, Any]:
        profile = dict(self.profile)
        if self.always_on:
            from django_flyworkers.conf import default_worker_command

            command = default_worker_command(queue)
            profile["CMD"] = [part for part in command if part != "--burst"]
        return profile


STRATEGIES = {
    strategy.name: strategy
    for strategy in [
        Strategy("stop", {"MAX_MACHINES": 2}),
        Strategy("suspend", {"MAX_MACHINES": 2, "IDLE_ACTION": "suspend"}),
        Strategy("suspend-pool", {"MAX_MACHINES": 2, "IDLE_ACTION": "suspend"}, pool=2),
        Strategy("idle-30", {"MAX_MACHINES": 2, "IDLE_TIMEOUT": 30}),
        Strategy("always-on", {"MAX_MACHINES": 1}, always_on=True),
        Strategy("dedicated", {"MAX_MACHINES": 2, "MODE": "dedicated"}),
    ]
}


@dataclass(frozen=True)
class TraceJob:
    burst: int
    queue: str
    seconds: float


def make_trace(bursts: int, jobs_per_burst: int, seed: int) -> list[TraceJob]:
    """The fixed trace: the same jobs, queues and durations for a given seed."""
    rng = random.Random(seed)
    return [
        TraceJob(burst, rng.choice(QUEUES), round(rng.uniform(*JOB_SECONDS), 2))
        for burst in range(bursts)
        for _ in range(jobs_per_burst)
    ]


@dataclass
class Result:
    """What one strategy did with the trace."""

    strategy: str
    done: int = 0
    total: int = 0
    billed: float = 0.0
    job_seconds: float = 0.0
    wake: list[float] = field(default_factory=list)
    wake_later: list[float] = field(default_factory=list)
    """Wake-to-work of every burst but the first (which finds no Machine, under any strategy)."""
    waits: list[float] = field(default_factory=list)
    calls: int = 0
    rate_limited: int = 0
    boots: int = 0
    machines: int = 0
    elapsed: float = 0.0
    note: str = ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bursts", type=int, default=6)
    parser.add_argument("--jobs-per-burst", type=int, default=30)
    parser.add_argument("--gap", type=float, default=15.0, help="seconds between bursts")
    parser.add_argument(
        "--strategies",
        default=",".join(STRATEGIES),
        help=f"comma-separated, from: {', '.join(STRATEGIES)}",
    )
    parser.add_argument("--seed", type=int, default=10)
    parser.add_argument(
        "--preload",
        action="store_true",
        help="fork Machines from a preloaded interpreter (a quick check; boots are cheap)",
    )
    args = parser.parse_args()
    names = [name.strip() for name in args.strategies.split(",") if name.strip()]
    unknown = sorted(set(names) - set(STRATEGIES))
    if unknown:
        parser.error(
            f"unknown strategy: {', '.join(unknown)} (choose from {', '.join(STRATEGIES)})"
        )
    if not names or args.bursts < 1 or args.jobs_per_burst < 1 or args.gap < 0:
        parser.error("need a strategy, --bursts >= 1, --jobs-per-burst >= 1 and --gap >= 0")

    trace = make_trace(args.bursts, args.jobs_per_burst, args.seed)
    nominal = sum(job.seconds for job in trace)
    print(
        f"== trace (seed {args.seed}): {args.bursts} bursts of {args.jobs_per_burst} jobs, "
        f"{args.gap:g} s apart, on {len(QUEUES)} queues; {nominal:.1f} s of work"
    )
    first = STRATEGIES[names[0]]
    bench = h.prepare({q: first.for_queue(q) for q in QUEUES}, prefix="cost-trace")
    results: list[Result] = []
    try:
        with h.redis_server(bench):
            for name in names:
                strategy = STRATEGIES[name]
                result = run_strategy(bench, strategy, trace, args.gap, preload=args.preload)
                if result is not None:
                    results.append(result)
    finally:
        h.cleanup(bench, keep=any(r.note for r in results))
    report(results, len(trace))


def run_strategy(
    bench: h.Bench,
    strategy: Strategy,
    trace: Sequence[TraceJob],
    gap: float,
    *,
    preload: bool = False,
) -> Result | None:
    """Replay the trace under ``strategy``; None (after saying why) if this build rejects it."""
    import django_rq

    from django_flyworkers.emulator import EmulatorControl
    from django_flyworkers.scaling.background import waker

    profiles = {queue: strategy.for_queue(queue) for queue in QUEUES}
    with h.use_profiles(bench, profiles):
        reason = h.unsupported()
        if reason is not None:
            print(f"{strategy.name}: not supported by this build ({reason})", flush=True)
            return None
        print(f"{strategy.name}: running ...", flush=True)
        conn = django_rq.get_connection(QUEUES[0])
        conn.flushall()
        try:
            with h.emulator(bench, preload=preload) as server:
                if preload:  # until the zygote is ready, Machines start with exec
                    server.emulator.runner.zygote_ready(timeout=60)
                control = EmulatorControl(server.url, bench.token)
                if strategy.always_on:
                    _start_always_on(conn, control)
                if strategy.pool:
                    _ready_pool(strategy.pool, control)
                return _replay(strategy, trace, gap, conn, control)
        finally:
            waker.drain(timeout=10)
            conn.flushall()


def _ready_pool(count: int, control: Any) -> None:
    """``flyworkers_scale --count`` for each queue; wait until the pool has gone to sleep."""
    from django_flyworkers.scaling import scaler
    from django_flyworkers.testing import wait_for

    for queue in QUEUES:
        scaler.resize(queue, count, user="cost_trace")

    def asleep() -> bool:
        states = [m["state"] for m in control.stats()["machines"].values()]
        return len(states) == count * len(QUEUES) and all(s == "suspended" for s in states)

    wait_for(asleep, 120, "the pool to boot and suspend itself")


def _start_always_on(conn: Any, control: Any) -> None:
    """Start one worker per queue (an enqueue wakes it) and wait until each has announced."""
    from benchmarks.jobs import noop
    from django_flyworkers import presence
    from django_flyworkers.testing import wait_for

    jobs = [noop.using(queue=queue).delay() for queue in QUEUES]

    def ready() -> bool:
        finished = all(job.get_status(refresh=True) == "finished" for job in jobs)
        announced = all(conn.zcard(presence.active_key(queue)) for queue in QUEUES)
        return finished and announced

    wait_for(ready, 120, "the always-on workers to start")


def _replay(
    strategy: Strategy, trace: Sequence[TraceJob], gap: float, conn: Any, control: Any
) -> Result:
    from rq.job import Job

    from benchmarks.jobs import sleep_for

    before = control.stats()
    bursts: dict[int, list[TraceJob]] = defaultdict(list)
    for job in trace:
        bursts[job.burst].append(job)
    ids: list[tuple[TraceJob, str]] = []
    began = time.monotonic()
    for burst in sorted(bursts):
        delay = began + burst * gap - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # the trace's own clock, not a wait for a condition
        for job in bursts[burst]:
            ids.append((job, sleep_for.using(queue=job.queue).delay(job.seconds).id))

    result = Result(strategy.name, total=len(ids))
    deadline = time.monotonic() + DRAIN_TIMEOUT
    fetched: list[Job | None] = []
    while True:
        fetched = Job.fetch_many([job_id for _, job_id in ids], connection=conn)
        result.done = sum(1 for job in fetched if job is not None and job.ended_at is not None)
        if result.done == len(ids) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    if result.done < len(ids):
        result.note = f"{len(ids) - result.done} jobs not done {DRAIN_TIMEOUT:g} s after the trace"
    failed = sum(1 for job in fetched if job is not None and job.get_status() == "failed")
    if failed:
        result.note = "; ".join(filter(None, [result.note, f"{failed} jobs failed"]))

    idle = float(strategy.profile.get("IDLE_TIMEOUT", 0) or 0)
    if not strategy.always_on and result.done == len(ids):
        settle = time.monotonic() + idle + SETTLE_TIMEOUT
        while _running(control.stats()) and time.monotonic() < settle:
            time.sleep(0.25)
        if _running(control.stats()):
            result.note = "; ".join(filter(None, [result.note, "Machines still running"]))
    after = control.stats()
    result.elapsed = time.monotonic() - began

    result.billed = after["total_billed_seconds"] - before["total_billed_seconds"]
    result.calls = sum(after["calls"].values()) - sum(before["calls"].values())
    result.rate_limited = sum(after["rate_limited"].values()) - sum(before["rate_limited"].values())
    result.boots = sum(m["starts"] for m in after["machines"].values()) - sum(
        m["starts"] for m in before["machines"].values()
    )
    result.machines = len(after["machines"])
    first_enqueue: dict[tuple[int, str], float] = {}
    first_start: dict[tuple[int, str], float] = {}
    for (job, _), rq_job in zip(ids, fetched, strict=True):
        if rq_job is None or rq_job.enqueued_at is None:
            continue
        key = (job.burst, job.queue)
        enqueued = rq_job.enqueued_at.timestamp()
        first_enqueue[key] = min(first_enqueue.get(key, enqueued), enqueued)
        if rq_job.started_at is None:
            continue
        started = rq_job.started_at.timestamp()
        first_start[key] = min(first_start.get(key, started), started)
        result.waits.append(started - enqueued)
        if rq_job.ended_at is not None:
            result.job_seconds += rq_job.ended_at.timestamp() - started
    result.wake = [first_start[key] - first_enqueue[key] for key in first_start]
    result.wake_later = [first_start[k] - first_enqueue[k] for k in first_start if k[0] > 0]
    return result


def _running(stats: Mapping[str, Any]) -> bool:
    return any(m["state"] in RUNNING for m in stats["machines"].values())


def report(results: Sequence[Result], jobs: int) -> None:
    """Print the table (strategies that ran) and any notes."""
    if not results:
        print("\nno strategy ran")
        return
    rows = []
    for r in results:
        ratio = r.billed / r.job_seconds if r.job_seconds else float("nan")
        rows.append(
            [
                r.strategy,
                f"{ratio:.2f}",
                h.seconds(r.billed, 1),
                h.seconds(r.job_seconds, 1),
                h.seconds(h.percentile(r.wake, 50)),
                h.seconds(h.percentile(r.wake, 95)),
                h.seconds(h.percentile(r.wake_later, 95)),
                h.seconds(h.percentile(r.waits, 50)),
                h.seconds(h.percentile(r.waits, 95)),
                f"{r.calls} ({r.rate_limited})",
                r.boots,
                r.machines,
                f"{r.done}/{r.total}",
            ]
        )
    headers = [
        "strategy",
        "billed/job",
        "billed",
        "job time",
        "wake p50",
        "wake p95",
        "p95 bursts 2+",
        "wait p50",
        "wait p95",
        "API calls (429)",
        "boots",
        "Machines",
        "jobs done",
    ]
    print(f"\n== cost of the trace by strategy ({jobs} jobs)")
    print(h.table(headers, rows))
    for r in results:
        if r.note:
            print(f"  {r.strategy}: {r.note}")
    print(
        f"  {statistics.median(r.elapsed for r in results):.0f} s per strategy (median); "
        "wake = a burst's first enqueue on a queue -> its first job there starting; "
        "bursts 2+ leave out the first burst, which finds no Machine under any strategy"
    )


if __name__ == "__main__":
    main()
