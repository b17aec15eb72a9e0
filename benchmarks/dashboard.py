"""How fast the dashboard renders with a big history, and how many SQL queries it makes.

    .venv/bin/python benchmarks/dashboard.py [--jobs 200000] [--machines 5000] [--rounds 7]

Fills a fresh SQLite database (WAL, as the tests use) with ``--jobs`` FlyJob rows over 30 days
(a tenth of them in the last 24 h, 1% in the last hour), ``--machines`` Machines with five runs
each, a job attempt for every failed job and 50,000 scaling events; puts a backlog, scheduled
and failed jobs and live workers in a real redis-server; then renders the dashboard (each
window), its JSON feed and the job and Machine pages through Django's test client, logged in
as a superuser. Prints the median render time and the SQL query count of each, next to the
admin's own FlyJob list on the same data as a baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DAY = 86400.0
QUEUES = ("default", "images", "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200_000, help="FlyJob rows")
    parser.add_argument("--machines", type=int, default=5_000, help="WorkerMachine rows")
    parser.add_argument("--rounds", type=int, default=7, help="renders per page (median)")
    parser.add_argument("--db", type=Path, help="reuse a database an earlier run filled")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one render")
    parser.add_argument("--profile-window", default="24h", help="the window --profile renders")
    args = parser.parse_args()

    from django_flyworkers.testing import EMULATOR_TOKEN, RedisServer, free_port

    database = args.db or Path(tempfile.mkdtemp(prefix="flyworkers-bench-")) / "bench.sqlite3"
    os.environ["FLYWORKERS_TEST_DB"] = str(database)
    redis_port = free_port()
    os.environ["FLYWORKERS_TEST_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    api_port = free_port()  # the Machine page reads the Machine from the emulator
    os.environ["FLYWORKERS_API_URL"] = f"http://127.0.0.1:{api_port}"
    os.environ["FLY_API_TOKEN"] = EMULATOR_TOKEN

    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": "off"}
    if not args.db:
        call_command("migrate", verbosity=0)
    from django_flyworkers.emulator import EmulatorServer

    emulator = EmulatorServer(port=api_port, token=EMULATOR_TOKEN, workdir=ROOT / "tests")
    with RedisServer(redis_port), emulator:
        began = time.monotonic()
        if not args.db:
            fill_database(args.jobs, args.machines)
        fill_redis()
        print(f"filled in {time.monotonic() - began:.0f}s: {args.jobs} jobs, "
              f"{args.machines} Machines, {database}")  # fmt: skip
        measure(args.rounds)
        if args.profile:
            profile(f"/admin/django_flyworkers/dashboard/?window={args.profile_window}")


def fill_database(jobs: int, machines: int) -> None:
    from django.contrib.auth.models import User
    from django.utils import timezone

    from django_flyworkers.models import FlyJob, JobAttempt, MachineRun, ScaleEvent, WorkerMachine

    rng = random.Random(11)
    now = timezone.now()
    User.objects.create_superuser("bench", "", "bench")
    guests = {
        "default": ("shared", 1, 512),
        "images": ("performance", 2, 4096),
        "other": ("shared", 2, 1024),
    }
    rows = [
        WorkerMachine(
            machine_id=f"{i:014x}", queue=QUEUES[i % 3], region="ord",
            state="destroyed" if i < machines * 0.8 else "stopped", boots=5,
            guest=dict(zip(("cpu_kind", "cpus", "memory_mb"), guests[QUEUES[i % 3]], strict=True)),
        )
        for i in range(machines)
    ]  # fmt: skip
    WorkerMachine.objects.bulk_create(rows, batch_size=2000)
    saved = list(WorkerMachine.objects.order_by("pk"))
    # Older Machines ran (and were destroyed) earlier: spread over 30 days, in order.
    runs = []
    for i, machine in enumerate(saved):
        base = 30 * DAY * (1 - i / len(saved))
        for k in range(5):
            start = now - timedelta(seconds=max(60.0, base - k * 600 + rng.uniform(0, 300)))
            seconds = rng.uniform(20, 400)
            kind, cpus, memory = guests[machine.queue]
            runs.append(MachineRun(
                machine=machine, queue=machine.queue, state="stopped", started_at=start,
                booted_at=start + timedelta(seconds=2), billed_seconds=seconds,
                stopped_at=start + timedelta(seconds=seconds), cpu_kind=kind, cpus=cpus,
                memory_mb=memory, exit_code=0,
            ))  # fmt: skip
    MachineRun.objects.bulk_create(runs, batch_size=2000)
    run_list = list(MachineRun.objects.values_list("machine_id", "queue", "started_at"))
    run_list.sort(key=lambda r: r[2])
    batch: list[FlyJob] = []
    for i in range(jobs):
        share = rng.random()
        ago = (
            rng.uniform(0, 3600) if share < 0.01
            else rng.uniform(3600, DAY) if share < 0.10
            else rng.uniform(DAY, 30 * DAY)
        )  # fmt: skip
        started = now - timedelta(seconds=ago)
        # The job ran in the run that started last before it (any queue's, for speed).
        lo, hi = 0, len(run_list) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if run_list[mid][2] <= started:
                lo = mid
            else:
                hi = mid - 1
        machine_id, queue, _ = run_list[lo]
        status = "failed" if rng.random() < 0.05 else "finished"
        batch.append(FlyJob(
            job_id=f"bench-{i}", queue=queue, func_name="tests.testapp.jobs.add", status=status,
            enqueued_at=started - timedelta(seconds=rng.expovariate(1 / 3)), started_at=started,
            ended_at=started + timedelta(seconds=rng.expovariate(1 / 2)), machine_id=machine_id,
            attempts=1, error="Traceback ...\nRuntimeError: boom" if status == "failed" else "",
        ))  # fmt: skip
        if len(batch) == 5000:
            FlyJob.objects.bulk_create(batch)
            batch = []
    FlyJob.objects.bulk_create(batch)
    JobAttempt.objects.bulk_create(
        JobAttempt(job_id=job_id, queue=queue, number=1, outcome="failed", error="boom",
                   started_at=started, ended_at=ended)
        for job_id, queue, started, ended in FlyJob.objects.filter(status="failed").values_list(
            "job_id", "queue", "started_at", "ended_at")
    )  # fmt: skip
    events = [
        ScaleEvent(queue=QUEUES[i % 3], action=("start", "create", "stop", "list")[i % 4],
                   machine_id=f"{i % machines:014x}", reason="bench")
        for i in range(50_000)
    ]  # fmt: skip
    ScaleEvent.objects.bulk_create(events, batch_size=5000)
    from django.db import connection

    with connection.cursor() as cursor:  # created_at is auto_now_add: spread it out afterwards
        cursor.execute(
            "UPDATE django_flyworkers_scaleevent SET created_at = "
            "datetime('now', '-' || (id * 51 % 2592000) || ' seconds')"
        )
        cursor.execute("ANALYZE")


def fill_redis() -> None:
    import django_rq

    from django_flyworkers import presence
    from tests.testapp import jobs

    for name in QUEUES:
        queue = django_rq.get_queue(name)
        for i in range(200):
            queue.enqueue(jobs.add, i, i)
        for i in range(50):
            queue.enqueue_in(timedelta(minutes=i + 1), jobs.add, i, i)
        conn = queue.connection
        conn.zadd(presence.active_key(name), {f"{name}-live": time.time() + 3600})


def measure(rounds: int) -> None:
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from django_flyworkers.models import FlyJob, WorkerMachine

    client = Client()
    assert client.login(username="bench", password="bench")
    job = FlyJob.objects.filter(status="failed").order_by("-started_at").first()
    machine = WorkerMachine.objects.exclude(state="destroyed").order_by("-pk").first()
    assert job is not None and machine is not None
    pages = [
        ("admin FlyJob list (baseline)", "/admin/django_flyworkers/flyjob/"),
        ("dashboard, 1h", "/admin/django_flyworkers/dashboard/?window=1h"),
        ("dashboard, 24h", "/admin/django_flyworkers/dashboard/?window=24h"),
        ("dashboard, 7d", "/admin/django_flyworkers/dashboard/?window=7d"),
        ("live.json, 1h", "/admin/django_flyworkers/dashboard/live.json?window=1h"),
        ("job page", f"/admin/django_flyworkers/flyjob/{job.pk}/change/"),
        (
            "Machine page (+1 API call)",
            f"/admin/django_flyworkers/workermachine/{machine.pk}/change/",
        ),
    ]
    results: dict[str, list[float]] = {name: [] for name, _ in pages}
    queries: dict[str, int] = {}
    for _, url in pages:  # warm-up: templates compiled, caches filled
        assert client.get(url).status_code == 200, url
    for _ in range(rounds):
        for name, url in pages:  # interleaved: noise hits every page alike
            with CaptureQueriesContext(connection) as captured:
                began = time.perf_counter()
                response = client.get(url)
                results[name].append(time.perf_counter() - began)
            assert response.status_code == 200, url
            queries[name] = len(captured)
    base = statistics.median(results[pages[0][0]])
    print(f"\n== render time, median of {rounds} (SQLite, {FlyJob.objects.count()} jobs)")
    print(f"  {'page':30s} {'ms':>8s} {'ratio':>7s} {'queries':>8s}")
    for name, _ in pages:
        value = statistics.median(results[name])
        print(f"  {name:30s} {value * 1000:8.1f} {value / base:7.2f} {queries[name]:8d}")


def profile(url: str) -> None:
    import cProfile
    import pstats

    from django.test import Client

    client = Client()
    assert client.login(username="bench", password="bench")
    profiler = cProfile.Profile()
    profiler.runcall(client.get, url)
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
