"""What @flyjob costs on the enqueue path, and how few API calls a burst makes.

    .venv/bin/python benchmarks/enqueue_overhead.py [--calls 2000] [--rounds 5]
        [--postgres URL] [--burst 10000]

1. Per-call time of ``@flyjob(...).delay()`` against plain django-rq ``@job(...).delay()``
   on SQLite (WAL) and, when ``--postgres`` or ``DATABASE_URL`` gives a URL, PostgreSQL. Each
   round runs, per database, a process that times django-rq's ``.delay()`` and ours in
   ``WAKE_MODE`` "thread" (the default) and "sync", ``--calls / --rounds`` calls each, in
   blocks of 50 calls that alternate between the variants; rounds interleave the databases;
   the figures are medians over all calls, and ratios are to django-rq's. The pool is warm:
   as many live workers are announced as the queue's ``MAX_MACHINES``, so no Machines API
   call is needed and no Machine drains the queue while we measure. In "thread" mode the
   caller pays for its push and hands the row and the coverage check to the waker thread;
   "sync" does both inline. "mean" also counts what the waker thread's batches take from the
   caller (the GIL): per call, over each timed block.
2. A burst of ``--burst`` ``.delay()`` calls into an idle queue, with the emulator running real
   worker Machines: how many Machines API calls it made, by action (SQLite, ``--burst 0``
   skips it).

Runs on real parts: a redis-server, the databases, the Machines API emulator.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("django-rq @job", "flyjob thread", "flyjob sync")
BLOCK = 50
"""Calls per timed block; blocks of the variants alternate."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per variant and database")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--burst", type=int, default=10_000, help="jobs in the burst (0: skip)")
    parser.add_argument("--postgres", default=os.environ.get("DATABASE_URL", ""), help="URL")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    from benchmarks._env import bench_environment
    from django_flyworkers.testing import EMULATOR_TOKEN, RedisServer

    # "sync": what worker Machines of the burst run with.
    env = bench_environment("bench", "sync")
    redis_port, api_port = env.redis_port, env.api_port
    databases = {"sqlite": ""}
    if args.postgres:
        databases["postgresql"] = args.postgres
    per_round = max(1, args.calls // args.rounds)
    samples: dict[tuple[str, str], list[float]] = {}
    means: dict[tuple[str, str], list[float]] = {}
    with RedisServer(redis_port):
        for url in databases.values():
            _run(url, "migrate")
        for _ in range(args.rounds):
            for name, url in databases.items():
                measured = json.loads(_run(url, "overhead", str(per_round)))
                for variant, (values, mean) in measured.items():
                    samples.setdefault((name, variant), []).extend(values)
                    means.setdefault((name, variant), []).append(mean)
        print(f"\n== enqueue overhead, warm pool ({args.rounds} rounds x {per_round} calls)")
        print(f"  {'database':10s} {'variant':16s} {'median':>10s} {'ratio':>6s} {'mean':>10s}")
        for name in databases:
            base = statistics.median(samples[(name, VARIANTS[0])])
            base_mean = statistics.median(means[(name, VARIANTS[0])])
            for variant in VARIANTS:
                value = statistics.median(samples[(name, variant)])
                mean = statistics.median(means[(name, variant)])
                print(
                    f"  {name:10s} {variant:16s} {value * 1e6:7.1f} us {value / base:6.2f} "
                    f"{mean * 1e6:7.1f} us ({mean / base_mean:.2f})"
                )
        if args.burst:
            from django_flyworkers.emulator import EmulatorControl, EmulatorServer

            with EmulatorServer(
                port=api_port, token=EMULATOR_TOKEN, workdir=ROOT / "tests", rate_limits=True
            ) as server:
                control = EmulatorControl(server.url, EMULATOR_TOKEN)
                print(_run("", "burst", str(args.burst), server.url), end="")
                control.close()


def _run(url: str, *argv: str) -> str:
    env = {**os.environ, "FLYWORKERS_BENCH_DATABASE_URL": url}
    done = subprocess.run(
        [sys.executable, __file__, "--child", *argv],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return done.stdout


def _timed(fn: Callable[[], object], calls: int) -> tuple[list[float], float]:
    samples = []
    began = time.perf_counter()
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples, (time.perf_counter() - began) / calls


def child(command: str, *argv: str) -> None:
    import django

    django.setup()
    if command == "migrate":
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
    elif command == "overhead":
        print(json.dumps(overhead(int(argv[0]))))
    elif command == "burst":
        burst(int(argv[0]), argv[1])


def overhead(calls: int) -> dict[str, tuple[list[float], float]]:
    import django_rq
    from django.conf import settings
    from django_rq import job as rq_job
    from django_rq.queues import DjangoRQ

    from django_flyworkers import presence
    from django_flyworkers.conf import get_settings, reset
    from django_flyworkers.scaling.background import waker
    from tests.testapp.jobs import add, plain_add

    # The baseline: django-rq's own @job on django-rq's own queue class.
    plain = rq_job(django_rq.get_queue("default", queue_class=DjangoRQ))(plain_add)
    conn = django_rq.get_connection("default")
    conn.flushall()

    def run(mode: str | None, count: int) -> tuple[list[float], float]:
        if mode is None:
            return _timed(lambda: plain.delay(1, 2), count)
        settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": mode}
        reset()
        # The warm pool: as many live workers as the queue may have Machines.
        for member in range(get_settings().queues["default"].max_machines):
            presence.announce(conn, "default", f"bench-live-worker-{member}", ttl=3600)
        timed = _timed(lambda: add.delay(1, 2), count)
        waker.drain()  # the waker's backlog must not spill into the next block
        return timed

    modes = {VARIANTS[0]: None, VARIANTS[1]: "thread", VARIANTS[2]: "sync"}
    for mode in modes.values():  # warm up connections, imports and caches
        run(mode, 50)
    results: dict[str, tuple[list[float], float]] = {name: ([], 0.0) for name in modes}
    # Small blocks, each variant in turn, the order rotating: load on the machine that comes
    # and goes falls on every variant alike.
    blocks = max(1, calls // BLOCK)
    for number in range(blocks):
        names = list(modes)
        names = names[number % len(names) :] + names[: number % len(names)]
        for name in names:
            values, mean = run(modes[name], BLOCK)
            gathered, total = results[name]
            results[name] = (gathered + values, total + mean / blocks)
    conn.flushall()
    return results


def burst(count: int, api_url: str) -> None:
    import django_rq
    from django.conf import settings

    from django_flyworkers.conf import reset
    from django_flyworkers.emulator import EmulatorControl
    from django_flyworkers.models import FlyJob
    from django_flyworkers.testing import EMULATOR_TOKEN
    from tests.testapp.jobs import add

    fly = EmulatorControl(api_url, EMULATOR_TOKEN)
    settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": "sync"}
    reset()
    fly.reset()
    conn = django_rq.get_connection("default")
    conn.flushall()
    start = time.perf_counter()
    ids = [add.delay(i, 1).id for i in range(count)]
    elapsed = time.perf_counter() - start
    calls = fly.stats()["calls"]
    total = sum(calls.values())
    print(f"\n== burst of {count} .delay() calls into an idle queue (sync wake mode, SQLite)")
    print(f"  enqueue time {elapsed:.1f}s ({elapsed / count * 1e6:.0f} us/call)")
    print(f"  Machines API calls during the burst: {total} {dict(sorted(calls.items()))}")
    deadline = time.monotonic() + 600
    done = 0
    while time.monotonic() < deadline:
        done = FlyJob.objects.filter(job_id__in=ids, status="finished").count()
        if done >= count:
            break
        time.sleep(0.5)
    drained = time.perf_counter() - start
    calls = fly.stats()["calls"]
    print(f"  all {done} jobs finished {drained:.1f}s after the first enqueue")
    print(f"  Machines API calls in total: {sum(calls.values())} {dict(sorted(calls.items()))}")
    fly.reset()
    fly.close()


if __name__ == "__main__":
    main()
