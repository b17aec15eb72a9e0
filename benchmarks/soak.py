"""Soak: 1,000 jobs over two queues while the Machines API fails and Machines are killed.

    .venv/bin/python benchmarks/soak.py [--jobs 1000] [--fault-rate 0.2] [--kill-every 2]
                                        [--minutes 7.5] [--seed N]

Everything is real: a redis-server, SQLite (WAL), the Machines API emulator whose Machines are
worker processes, ``manage.py flyworkers_scale --watch 5 --reap-every 10`` running beside, and
this process enqueueing in ``WAKE_MODE`` "thread" (the default). While jobs are enqueued and
for a while after, about ``--fault-rate`` of the Machines API calls fail (429s and 500s, and
now and then latency past ``HTTP_TIMEOUT``), and a started Machine is SIGKILLed every
``--kill-every`` seconds on average (through the emulator's kill endpoint), often mid-job,
until 95% of the jobs ended.
Jobs have ``retry=3``.

Then it waits for every job to end (bounded by ``--minutes``), runs one ``flyworkers_reap``,
and prints: jobs lost (gone from Redis without ending, or in no list or registry), stranded
(still waiting or running at the end), run twice (completed more than once), failed, the
kills and faults, and whether every ``FlyJob`` row equals rq's final state.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HTTP_TIMEOUT = 2.0
ACTIONS = ("list", "create", "start", "stop", "wait", "get", "update", "destroy")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--fault-rate", type=float, default=0.2)
    parser.add_argument(
        "--kill-every", type=float, default=2.0, help="mean seconds between Machine kills"
    )
    parser.add_argument("--minutes", type=float, default=7.5, help="hard bound on the run")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    began = time.monotonic()
    deadline = began + args.minutes * 60
    rng = random.Random(args.seed)

    from benchmarks._env import bench_environment
    from django_flyworkers.testing import EMULATOR_TOKEN, RedisServer

    env = bench_environment(
        "soak",
        "thread",
        FLYWORKERS_BENCH_HTTP_TIMEOUT=str(HTTP_TIMEOUT),
        FLYWORKERS_BENCH_API_RETRY_SECONDS="4",
    )
    workdir, redis_port, api_port = env.workdir, env.redis_port, env.api_port
    os.environ.pop("FLYWORKERS_BENCH_DATABASE_URL", None)

    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)

    from django_flyworkers.emulator import EmulatorControl, EmulatorServer

    scale: subprocess.Popen[bytes] | None = None
    with (
        RedisServer(redis_port),
        EmulatorServer(
            port=api_port, token=EMULATOR_TOKEN, workdir=ROOT / "tests", rate_limits=True
        ) as server,
    ):
        fly = EmulatorControl(server.url, EMULATOR_TOKEN)
        log = (workdir / "scale.log").open("wb")
        scale = subprocess.Popen(
            [sys.executable, "manage.py", "flyworkers_scale", "--watch=5", "--reap-every=10"],
            cwd=ROOT / "tests",
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        chaos = Chaos(fly, rng, args.fault_rate, args.kill_every)
        try:
            chaos.start()
            ids = enqueue(args.jobs, rng)
            print(f"  {len(ids)} jobs enqueued in {time.monotonic() - began:.0f}s", flush=True)
            # Chaos goes on while most of the backlog drains, then stops so the rest can end.
            wait_ended(ids, until=min(deadline - 120, time.monotonic() + 180), share=0.95)
            chaos.stop()
            print(f"  chaos stopped at {time.monotonic() - began:.0f}s", flush=True)
            wait_ended(ids, until=deadline - 20, share=1.0)
            with open(os.devnull, "w") as quiet:
                call_command("flyworkers_reap", verbosity=0, stdout=quiet)
            report(ids, chaos, fly, time.monotonic() - began)
        finally:
            chaos.stop()
            if scale.poll() is None:
                scale.send_signal(signal.SIGTERM)
                try:
                    scale.wait(20)
                except subprocess.TimeoutExpired:
                    scale.kill()
            log.close()
            fly.close()
    return 0


def enqueue(count: int, rng: random.Random) -> list[str]:
    """Bursts of jobs over about 40 s: 60% short ones on "default", 40% longer on "images"."""
    from tests.testapp.jobs import soak_job

    ids: list[str] = []
    bursts = 25
    for burst in range(bursts):
        size = count // bursts + (1 if burst < count % bursts else 0)
        for _ in range(size):
            if rng.random() < 0.6:
                ids.append(soak_job.delay(rng.uniform(0.02, 0.2)).id)
            else:
                ids.append(soak_job.using(queue="images").delay(rng.uniform(0.1, 0.6)).id)
        time.sleep(rng.uniform(1.0, 2.0))
    return ids


def _statuses(ids: list[str]) -> dict[str, str | None]:
    import django_rq
    from rq.job import Job

    conn = django_rq.get_connection("default")
    jobs = Job.fetch_many(ids, connection=conn)
    return {
        job_id: (job.get_status(refresh=False).value if job else None)
        for job_id, job in zip(ids, jobs, strict=True)
    }


def wait_ended(ids: list[str], *, until: float, share: float) -> None:
    """Until ``share`` of the jobs ended, saying every 15 s where the others are."""
    began = next_note = time.monotonic()
    while time.monotonic() < until:
        statuses = Counter(_statuses(ids).values())
        ended = statuses["finished"] + statuses["failed"]
        if ended >= share * len(ids):
            return
        if time.monotonic() >= next_note:
            others = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items(), key=str)
                               if s not in ("finished", "failed"))  # fmt: skip
            print(f"  {time.monotonic() - began:4.0f}s: {ended} ended; {others}", flush=True)
            next_note += 15
        time.sleep(1.0)


class Chaos(threading.Thread):
    """Fails about ``rate`` of the Machines API calls and kills a started Machine now and then."""

    def __init__(self, fly: Any, rng: random.Random, rate: float, kill_every: float) -> None:
        super().__init__(name="soak-chaos", daemon=True)
        self.fly, self.rng, self.rate = fly, rng, rate
        self.kill_every = kill_every
        self.halt = threading.Event()
        self.faults: Counter[str] = Counter()
        self.kills = 0
        self.kills_mid_job = 0
        self.latency_windows = 0
        self.calls = 0
        """API calls made while the chaos ran."""
        self.failed = 0
        """Of those, answered with an error: injected faults and the emulator's own 429s."""

    def stop(self) -> None:
        if not self.halt.is_set():
            self.halt.set()
            self.join(10)
            stats = self.fly.stats()
            unused = sum(f["count"] for f in stats["faults"])
            self.fly.clear_faults()
            self.calls = sum(stats["calls"].values()) - self._calls_before
            injected = sum(self.faults.values()) - unused
            self.failed = injected + sum(stats["rate_limited"].values()) - self._limited_before

    def start(self) -> None:
        stats = self.fly.stats()
        self._calls_before = sum(stats["calls"].values())
        self._limited_before = sum(stats["rate_limited"].values())
        super().start()

    def run(self) -> None:
        seen: Counter[str] = Counter(self.fly.stats()["calls"])
        next_kill = time.monotonic() + self._kill_gap()
        next_latency = time.monotonic() + self.rng.uniform(10, 20)
        while not self.halt.wait(0.5):
            try:
                stats = self.fly.stats()
                calls = Counter(stats["calls"])
                for action in ACTIONS:
                    new = calls[action] - seen[action]
                    failing = sum(self.rng.random() < self.rate for _ in range(new))
                    if failing:
                        status = self.rng.choice((429, 500))
                        self.fly.fault(action, status=status, count=failing)
                        self.faults[f"{action} {status}"] += failing
                seen = calls
                now = time.monotonic()
                if now >= next_latency:
                    self.fly.latency("list", HTTP_TIMEOUT + 1.0)
                    self.halt.wait(1.5)
                    self.fly.latency("list", 0)
                    self.latency_windows += 1
                    next_latency = now + self.rng.uniform(10, 20)
                if now >= next_kill:
                    self._kill(stats)
                    next_kill = now + self._kill_gap()
            except Exception as exc:  # the emulator is shutting down, or busy: try again
                print(f"  chaos: {exc}", flush=True)

    def _kill_gap(self) -> float:
        return self.rng.uniform(0.5, 1.5) * self.kill_every

    def _kill(self, stats: dict[str, Any]) -> None:
        started = [mid for mid, m in stats["machines"].items() if m["state"] == "started"]
        if not started:
            return
        victim = self.rng.choice(started)
        busy = _busy_machines()
        self.fly.kill(victim)
        self.kills += 1
        self.kills_mid_job += victim in busy


def _busy_machines() -> set[str]:
    """Machines whose worker is running a job right now (rq's StartedJobRegistry)."""
    import django_rq
    from rq.registry import StartedJobRegistry

    conn = django_rq.get_connection("default")
    busy = set()
    for queue in ("default", "images"):
        for member in conn.zrange(StartedJobRegistry(queue, connection=conn).key, 0, -1):
            job_id = member.decode().partition(":")[0]
            worker = conn.hget(f"rq:job:{job_id}", "worker_name")
            if worker:
                busy.add(worker.decode().rsplit("-", 1)[0])
    return busy


def report(ids: list[str], chaos: Chaos, fly: Any, elapsed: float) -> None:
    import django_rq

    from django_flyworkers.models import FlyJob

    conn = django_rq.get_connection("default")
    statuses = _statuses(ids)
    done = {k.decode(): int(v) for k, v in conn.hgetall("flyworkers:soak:done").items()}
    waiting = set()
    for queue in ("default", "images"):
        rq_queue = django_rq.get_queue(queue)
        waiting |= {job_id for job_id in rq_queue.get_job_ids()}
        waiting |= set(rq_queue.scheduled_job_registry.get_job_ids(cleanup=False))
        waiting |= set(rq_queue.started_job_registry.get_job_ids(cleanup=False))
    ended = {i for i, s in statuses.items() if s in ("finished", "failed")}
    stranded = {i for i in ids if i not in ended and i in waiting}
    lost = {i for i in ids if i not in ended and i not in waiting}
    twice = {i for i, n in done.items() if n > 1}
    rows = dict(FlyJob.objects.filter(job_id__in=ids).values_list("job_id", "status"))
    disagree = {i for i in ids if rows.get(i) != statuses[i]}
    calls = fly.stats()["calls"]
    print(f"\n== soak: {len(ids)} jobs, 2 queues, {elapsed:.0f}s")
    print(f"  finished {sum(s == 'finished' for s in statuses.values())}, failed "
          f"{sum(s == 'failed' for s in statuses.values())}")  # fmt: skip
    print(f"  lost {len(lost)}, stranded {len(stranded)}, run twice {len(twice)}")
    print(f"  Machines killed {chaos.kills} ({chaos.kills_mid_job} mid-job)")
    share = chaos.failed / max(1, chaos.calls)
    print(f"  API calls {sum(calls.values())}; while the chaos ran {chaos.calls}, of which "
          f"{chaos.failed} failed ({share:.0%}: injected {dict(sorted(chaos.faults.items()))} "
          f"and the emulator's own 429s), latency windows {chaos.latency_windows}")  # fmt: skip
    verdict = "yes" if not disagree else f"NO: {len(disagree)} rows differ"
    print(f"  every FlyJob row equals rq's final state: {verdict}")
    for job_id in sorted(disagree)[:10]:
        print(f"    {job_id}: ledger {rows.get(job_id)}, rq {statuses[job_id]}")
    for job_id in sorted(stranded | lost)[:10]:
        fields = conn.hmget(f"rq:job:{job_id}", "status", "origin", "worker_name", "started_at")
        print(f"    not ended: {job_id} {[f.decode() if f else None for f in fields]}")


if __name__ == "__main__":
    sys.exit(main())
