"""What @flyjob costs on the enqueue path, and how few API calls a burst makes.

    .venv/bin/python benchmarks/enqueue_overhead.py [--calls 2000] [--burst 10000]

1. Median per-call time of ``@flyjob(...).delay`` against plain django-rq ``@job(...).delay``,
   measured in the same run, interleaved in rounds (this machine is noisy: compare the ratio,
   not the absolute numbers). The pool is warm: a live worker is announced, so no Machines API
   call is needed; the difference is FlyQueue's signal, the FlyJob ledger row and the
   coverage check (on the waker thread in "thread" mode, inline in "sync" mode).
2. A burst of ``--burst`` ``.delay()`` calls into an idle queue, with the emulator running real
   worker Machines: how many Machines API calls it made, by action.

Runs on real parts: a redis-server, SQLite, the Machines API emulator.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per variant")
    parser.add_argument("--burst", type=int, default=10_000, help="jobs in the burst")
    args = parser.parse_args()

    from django_flyworkers.testing import EMULATOR_TOKEN, RedisServer, free_port

    workdir = Path(tempfile.mkdtemp(prefix="flyworkers-bench-"))
    os.environ["FLYWORKERS_TEST_DB"] = str(workdir / "bench.sqlite3")
    os.environ["FLYWORKERS_TEST_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    port = free_port()
    os.environ["FLYWORKERS_API_URL"] = f"http://127.0.0.1:{port}"
    os.environ["FLY_API_TOKEN"] = EMULATOR_TOKEN
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"

    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)

    from django_flyworkers.emulator import EmulatorControl, EmulatorServer

    redis_port = int(os.environ["FLYWORKERS_TEST_REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
    with (
        RedisServer(redis_port),
        EmulatorServer(
            port=port, token=EMULATOR_TOKEN, workdir=ROOT / "tests", rate_limits=True
        ) as server,
    ):
        overhead(args.calls)
        burst(args.burst, EmulatorControl(server.url, EMULATOR_TOKEN))


def _median_call(fn: Callable[[], object], calls: int) -> float:
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def overhead(calls: int) -> None:
    import django_rq
    from django.conf import settings
    from django_rq import job as rq_job
    from django_rq.queues import DjangoRQ

    from django_flyworkers import presence
    from django_flyworkers.conf import reset
    from django_flyworkers.scaling.background import waker
    from tests.testapp.jobs import add, plain_add

    # The baseline: django-rq's own @job on django-rq's own queue class.
    plain = rq_job(django_rq.get_queue("default", queue_class=DjangoRQ))(plain_add)
    conn = django_rq.get_connection("default")
    conn.flushall()
    presence.announce(conn, "default", "bench-live-worker", ttl=3600)  # the warm pool

    results: dict[str, list[float]] = {"django-rq @job": [], "flyjob thread": [], "flyjob sync": []}
    rounds = 5
    per_round = max(1, calls // rounds)
    for _ in range(rounds):
        for mode in ("thread", "sync"):
            settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": mode}
            reset()
            results[f"flyjob {mode}"].append(_median_call(lambda: add.delay(1, 2), per_round))
            waker.drain()
        results["django-rq @job"].append(_median_call(lambda: plain.delay(1, 2), per_round))
        conn.delete("rq:queue:default")
    base = statistics.median(results["django-rq @job"])
    print(f"\n== enqueue overhead, warm pool ({rounds} rounds x {per_round} calls, median)")
    for name, values in results.items():
        value = statistics.median(values)
        print(f"  {name:16s} {value * 1e6:8.1f} us/call   ratio {value / base:5.2f}")
    conn.flushall()


def burst(count: int, fly: object) -> None:
    import django_rq
    from django.conf import settings

    from django_flyworkers.conf import reset
    from django_flyworkers.models import FlyJob
    from tests.testapp.jobs import add

    settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": "sync"}
    reset()
    fly.reset()  # type: ignore[attr-defined]
    conn = django_rq.get_connection("default")
    conn.flushall()
    start = time.perf_counter()
    ids = [add.delay(i, 1).id for i in range(count)]
    elapsed = time.perf_counter() - start
    calls = fly.stats()["calls"]  # type: ignore[attr-defined]
    total = sum(calls.values())
    print(f"\n== burst of {count} .delay() calls into an idle queue (sync wake mode)")
    print(f"  enqueue time {elapsed:.1f}s ({elapsed / count * 1e6:.0f} us/call)")
    print(f"  Machines API calls during the burst: {total} {dict(sorted(calls.items()))}")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        done = FlyJob.objects.filter(job_id__in=ids, status="finished").count()
        if done >= count:
            break
        time.sleep(0.5)
    drained = time.perf_counter() - start
    calls = fly.stats()["calls"]  # type: ignore[attr-defined]
    print(f"  all {done} jobs finished {drained:.1f}s after the first enqueue")
    print(f"  Machines API calls in total: {sum(calls.values())} {dict(sorted(calls.items()))}")


if __name__ == "__main__":
    main()
