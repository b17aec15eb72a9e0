"""How fast FlyWorker drains a queue, against plain rq's Worker on the same jobs.

    .venv/bin/python benchmarks/drain.py [--jobs 300] [--rounds 3] [--postgres URL]

Each round enqueues ``--jobs`` trivial jobs and runs one burst worker process on them, as
``manage.py rqworker --burst`` does: rq's own ``Worker`` (the baseline) or ``FlyWorker``. The
rate is jobs divided by the time from the first job's start to the last job's end, as rq
recorded them in Redis, so process start-up does not count. Rounds interleave the two workers
and the databases (SQLite in WAL mode always; PostgreSQL when ``--postgres`` or
``DATABASE_URL`` gives a URL); the figures are medians and the ratio is FlyWorker's rate over
rq's. This machine is noisy: compare the ratio, not the absolute numbers.

Runs on real parts: a redis-server, the database, real worker processes that fork a work horse
per job.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORKERS = {"rq": "rq.Worker", "fly": "django_flyworkers.worker.FlyWorker"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300, help="jobs per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per variant")
    parser.add_argument("--postgres", default=os.environ.get("DATABASE_URL", ""), help="URL")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    from django_flyworkers.testing import RedisServer, free_port

    workdir = Path(tempfile.mkdtemp(prefix="flyworkers-drain-"))
    redis_port = free_port()
    os.environ.update(
        DJANGO_SETTINGS_MODULE="benchmarks.settings",
        FLYWORKERS_TEST_DB=str(workdir / "bench.sqlite3"),
        FLYWORKERS_TEST_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        FLYWORKERS_BENCH_WAKE_MODE="off",
    )
    databases = {"sqlite": ""}
    if args.postgres:
        databases["postgresql"] = args.postgres
    rates: dict[tuple[str, str], list[float]] = {}
    with RedisServer(redis_port) as server:
        import redis

        conn = redis.Redis.from_url(server.url)
        for url in databases.values():
            run_child(url, "migrate")
        for number in range(args.rounds):
            for name, url in databases.items():
                # Alternate which worker goes first, so neither always gets the warmer machine.
                order = ["rq", "fly"] if number % 2 == 0 else ["fly", "rq"]
                for worker in order:
                    conn.flushdb()
                    run_child(url, "enqueue", str(args.jobs))
                    run_child(url, "work", worker)
                    rate = drain_rate(conn, args.jobs)
                    rates.setdefault((name, worker), []).append(rate)
                    print(f"  round {number + 1} {name:10s} {worker:3s} {rate:7.1f} jobs/s")
    print(f"\n== drain rate, {args.jobs} trivial jobs, median of {args.rounds} interleaved rounds")
    print(f"  {'database':10s} {'rq Worker':>14s} {'FlyWorker':>14s} {'ratio':>7s}")
    for name in databases:
        plain = statistics.median(rates[(name, "rq")])
        fly = statistics.median(rates[(name, "fly")])
        print(f"  {name:10s} {plain:8.1f} jobs/s {fly:8.1f} jobs/s {fly / plain:7.2f}")


def run_child(url: str, *argv: str) -> None:
    env = {**os.environ, "FLYWORKERS_BENCH_DATABASE_URL": url, "FLY_MACHINE_ID": "bench0drain"}
    subprocess.run(
        [sys.executable, __file__, "--child", *argv],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        cwd=ROOT,
    )


def drain_rate(conn: object, jobs: int) -> float:
    """Jobs per second between the first start and the last end rq recorded."""
    starts, ends = [], []
    for key in conn.scan_iter("rq:job:*"):  # type: ignore[attr-defined]
        started, ended, status = conn.hmget(key, "started_at", "ended_at", "status")  # type: ignore[attr-defined]
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

        queue = django_rq.get_queue("default")
        count = int(argv[0])
        for start in range(0, count, 500):
            chunk = range(start, min(count, start + 500))
            queue.enqueue_many([FlyQueue.prepare_data(add, (i, 1)) for i in chunk])
    elif command == "work":
        # What `manage.py rqworker default --burst --worker-class ...` does.
        from django_rq.utils import reset_db_connections
        from django_rq.workers import get_worker

        worker = get_worker("default", worker_class=WORKERS[argv[0]])
        reset_db_connections()
        worker.work(burst=True)


if __name__ == "__main__":
    main()
