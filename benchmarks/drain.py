"""How fast FlyWorker drains a queue, against plain rq's Worker on the same jobs.

    .venv/bin/python benchmarks/drain.py [--jobs 100] [--rounds 15] [--postgres URL]

Each round enqueues ``--jobs`` trivial jobs on each of two queues and drains each with one
burst worker process, as ``manage.py rqworker --burst`` does: rq's own ``Worker`` (the
baseline) on one, ``FlyWorker`` on the other, one after the other (which goes first
alternates). The rate is jobs divided by the time from the first job's start to the last job's
end, as rq recorded them in Redis, so process start-up does not count. Rounds interleave the
databases too (SQLite in WAL mode always; PostgreSQL when ``--postgres`` or ``DATABASE_URL``
gives a URL). The ratio is FlyWorker's rate over rq's in the same round; the figures are
medians over rounds. A shared machine is noisy: compare the ratios, not the absolute numbers.
It also prints the CPU time each worker process and its horses used per job (less sensitive to
other load on the machine), and FlyWorker's over rq's.

Runs on real parts: a redis-server, the database, real worker processes that fork a work horse
per job.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORKERS = {"rq": "rq.Worker", "fly": "django_flyworkers.worker.FlyWorker"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100, help="jobs per worker and round")
    parser.add_argument("--rounds", type=int, default=15, help="rounds per database")
    parser.add_argument("--postgres", default=os.environ.get("DATABASE_URL", ""), help="URL")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    from benchmarks._env import bench_environment
    from django_flyworkers.testing import RedisServer

    env = bench_environment("drain", "off")
    redis_port = env.redis_port
    databases = {"sqlite": ""}
    if args.postgres:
        databases["postgresql"] = args.postgres
    rates: dict[tuple[str, str], list[float]] = {}
    cpus: dict[tuple[str, str], list[float]] = {}
    ratios: dict[str, list[float]] = {}
    queues = {"rq": "default", "fly": "images"}
    with RedisServer(redis_port) as server:
        import redis

        conn = redis.Redis.from_url(server.url)
        for url in databases.values():
            run_child(url, "migrate")
        for number in range(args.rounds):
            for name, url in databases.items():
                conn.flushdb()
                run_child(url, "enqueue", str(args.jobs), *queues.values())
                # Alternate which worker goes first, so neither always gets the warmer machine.
                order = ["rq", "fly"] if number % 2 == 0 else ["fly", "rq"]
                measured = {}
                for worker in order:
                    cpu = float(run_child(url, "work", worker, queues[worker])) / args.jobs
                    measured[worker] = drain_rate(conn, queues[worker], args.jobs)
                    rates.setdefault((name, worker), []).append(measured[worker])
                    cpus.setdefault((name, worker), []).append(cpu)
                ratios.setdefault(name, []).append(measured["fly"] / measured["rq"])
                print(
                    f"  round {number + 1:2d} {name:10s} rq {measured['rq']:6.1f} jobs/s, "
                    f"FlyWorker {measured['fly']:6.1f} jobs/s, ratio {ratios[name][-1]:.2f}",
                    flush=True,
                )
    print(f"\n== drain rate, {args.jobs} trivial jobs, median of {args.rounds} rounds")
    print(
        f"  {'database':10s} {'rq Worker':>14s} {'FlyWorker':>14s} {'ratio':>6s}   "
        f"CPU per job: {'rq':>7s} {'FlyWorker':>9s} {'ratio':>6s}"
    )
    for name in databases:
        plain = statistics.median(rates[(name, "rq")])
        fly = statistics.median(rates[(name, "fly")])
        ratio = statistics.median(ratios[name])
        cpu_rq = statistics.median(cpus[(name, "rq")])
        cpu_fly = statistics.median(cpus[(name, "fly")])
        print(
            f"  {name:10s} {plain:8.1f} jobs/s {fly:8.1f} jobs/s {ratio:6.2f}   "
            f"{'':13s}{cpu_rq:5.1f} ms {cpu_fly:7.1f} ms {cpu_fly / cpu_rq:6.2f}"
        )


def run_child(url: str, *argv: str) -> str:
    env = {**os.environ, "FLYWORKERS_BENCH_DATABASE_URL": url, "FLY_MACHINE_ID": "bench0drain"}
    done = subprocess.run(
        [sys.executable, __file__, "--child", *argv],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return done.stdout.strip().rsplit("\n", 1)[-1]


def drain_rate(conn: Any, queue: str, jobs: int) -> float:
    """Jobs per second between the first start and the last end rq recorded on ``queue``."""
    starts, ends = [], []
    for key in conn.scan_iter("rq:job:*", count=1000):
        started, ended, status, origin = conn.hmget(
            key, "started_at", "ended_at", "status", "origin"
        )
        if origin.decode() != queue:
            continue
        assert status == b"finished", (key, status)
        starts.append(_stamp(started))
        ends.append(_stamp(ended))
    assert len(ends) == jobs, f"{len(ends)} of {jobs} jobs finished"
    return jobs / (max(ends) - min(starts)).total_seconds()


def _stamp(raw: bytes) -> datetime:
    return datetime.fromisoformat(raw.decode().replace("Z", "+00:00"))


def child(command: str, *argv: str) -> None:
    import django

    django.setup()
    if command == "migrate":
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
    elif command == "enqueue":
        import django_rq

        from django_flyworkers.queue import FlyQueue
        from tests.testapp.jobs import add

        count = int(argv[0])
        for name in argv[1:]:
            queue = django_rq.get_queue(name)
            for start in range(0, count, 500):
                chunk = range(start, min(count, start + 500))
                queue.enqueue_many([FlyQueue.prepare_data(add, (i, 1)) for i in chunk])
    elif command == "work":
        # What `manage.py rqworker default --burst --worker-class ...` does.
        import logging
        from resource import RUSAGE_CHILDREN, RUSAGE_SELF, getrusage

        from django_rq.utils import reset_db_connections
        from django_rq.workers import get_worker

        logging.disable(logging.INFO)  # both workers log alike; keep the output for the figure
        worker = get_worker(argv[1], worker_class=WORKERS[argv[0]])
        reset_db_connections()
        before = getrusage(RUSAGE_SELF), getrusage(RUSAGE_CHILDREN)
        worker.work(burst=True)
        after = getrusage(RUSAGE_SELF), getrusage(RUSAGE_CHILDREN)
        pairs = zip(before, after, strict=True)
        used = sum(b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime for a, b in pairs)
        print(f"\n{used * 1000:.3f}")  # milliseconds of CPU: this process and its horses


if __name__ == "__main__":
    main()
