"""The lost wake-up race: a job enqueued exactly as a burst worker leaves is never stranded.

A real FlyWorker runs many burst cycles in another process. At the moment each cycle decides to
leave it tells us, and we enqueue within a few milliseconds, so the push lands before, between
or after the worker's withdrawal and its last look at the queue. After each cycle, a job still
in the queue must have made someone ask for a Machine: the producer (it saw no live worker) or
the leaving worker itself. A job left with neither would be stranded.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import django_rq
import pytest

from django_flyworkers.scaling import scaler
from django_flyworkers.testing import processes
from tests.testapp import jobs

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]

ITERATIONS = 200
PREFIX = "flyworkers:stress"


@pytest.mark.slow(9)
def test_no_job_stranded_when_enqueued_as_worker_exits(
    redis_flush: Any, settings: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": "sync"}
    conn = django_rq.get_connection("other")
    queue_key = django_rq.get_queue("other").key
    producer_wakes: list[int] = []
    iteration = {"i": -1}

    def record_producer_wake(queue: str, **kwargs: Any) -> None:
        producer_wakes.append(iteration["i"])

    monkeypatch.setattr(scaler, "_reconcile", record_producer_wake)
    script = Path(__file__).parent / "scripts" / "stress_worker.py"
    log = (tmp_path / "stress-worker.log").open("w")
    worker = processes.ForkedPopen(
        [sys.executable, str(script), "other", str(ITERATIONS), PREFIX],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    stranded, served, woken = [], 0, 0
    try:
        for i in range(ITERATIONS):
            iteration["i"] = i
            conn.rpush(f"{PREFIX}:go", i)
            assert conn.blpop([f"{PREFIX}:withdrawn"], timeout=30), "worker did not leave"
            time.sleep(random.uniform(0, 0.003))
            jobs.sleep_then_write.delay("/dev/null", 0)
            assert conn.blpop([f"{PREFIX}:done"], timeout=30), "worker cycle did not end"
            leave_wakes = {int(x) for x in conn.lrange(f"{PREFIX}:leave-wakes", 0, -1)}
            if conn.llen(queue_key) == 0:
                served += 1
            elif i in producer_wakes or i in leave_wakes:
                woken += 1  # a Machine would be started; the next cycle plays that Machine
            else:
                stranded.append(i)
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        log.close()
    print(f"lost wake-up stress: {served} served by the leaving worker, {woken} woke a Machine")
    assert stranded == []
    assert served + woken == ITERATIONS
