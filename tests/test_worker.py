"""FlyWorker in this process: ``FlyWorker(...).work(burst=True)`` against the real Redis.

What a worker does with each job (the ledger rows, attempts, errors, presence) needs no
Machine: these tests run it in-process, which takes a fraction of a second per test. The
end-to-end tests keep what needs a Machine (waking, signals from Fly, killed processes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import django_rq
import pytest

from django_flyworkers import presence
from django_flyworkers.models import FlyJob, WorkerMachine
from django_flyworkers.worker import FlyWorker
from tests.testapp import jobs

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(120)]

MACHINE = "3d8d9e1b2c4f58"


@pytest.fixture
def machine(redis_flush: Any, settings: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """Wake-ups off (nothing here may call the Machines API); the worker thinks it runs on
    Machine ``MACHINE``, as it does on Fly."""
    settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": "off"}
    monkeypatch.setenv("FLY_MACHINE_ID", MACHINE)
    monkeypatch.setenv("FLY_REGION", "ord")
    return MACHINE


def work(queue: str) -> FlyWorker:
    worker = FlyWorker([queue], connection=django_rq.get_connection(queue))
    worker.work(burst=True)
    return worker


def test_failing_job_and_retries_are_recorded(machine: str, tmp_path: Path) -> None:
    failing = jobs.fail.delay("kaput")
    flaky = jobs.flaky.delay(str(tmp_path / "flaky"), 2)  # fails once, then succeeds
    doomed = jobs.flaky.delay(str(tmp_path / "doomed"), 10)  # retry=2: three failures
    work("default")

    row = FlyJob.objects.get(job_id=failing.id)
    assert row.status == "failed"
    assert "RuntimeError: kaput" in row.error
    assert row.attempts == 1 and row.machine is not None
    assert row.machine.machine_id == machine

    row = FlyJob.objects.get(job_id=flaky.id)
    assert (row.status, row.attempts) == ("finished", 2)
    assert flaky.return_value() == "ok after 2"

    row = FlyJob.objects.get(job_id=doomed.id)
    assert (row.status, row.attempts) == ("failed", 3)
    assert "flaky failure 3" in row.error


def test_every_job_is_mirrored_with_its_machine_and_times(machine: str) -> None:
    enqueued = [jobs.add.delay(i, i) for i in range(10)]
    worker = work("default")
    rows = FlyJob.objects.filter(job_id__in=[job.id for job in enqueued])
    assert sorted(row.status for row in rows) == ["finished"] * 10
    for row in rows:
        assert row.machine is not None and row.machine.machine_id == machine
        assert row.attempts == 1
        assert row.worker_name == worker.name and worker.name.startswith(f"{machine}-")
        assert row.started_at and row.ended_at and row.enqueued_at
        assert row.enqueued_at <= row.started_at <= row.ended_at
    assert [job.return_value() for job in enqueued[:3]] == [0, 2, 4]


def test_the_worker_records_its_machine_boot_and_run_time(machine: str) -> None:
    jobs.add.delay(1, 2)
    work("default")
    row = WorkerMachine.objects.get(machine_id=machine)
    assert row.boots == 1
    assert row.region == "ord"
    assert row.last_started_at is not None
    assert row.run_seconds > 0


def test_a_job_enqueued_without_a_signal_gets_its_row_when_it_starts(machine: str) -> None:
    from rq import Queue

    job = Queue("default", connection=django_rq.get_connection("default")).enqueue(jobs.add, 2, 2)
    assert not FlyJob.objects.filter(job_id=job.id).exists()
    work("default")
    row = FlyJob.objects.get(job_id=job.id)
    assert (row.status, row.attempts, row.queue) == ("finished", 1, "default")


def test_the_worker_announces_itself_while_working_and_withdraws_before_leaving(
    machine: str,
) -> None:
    conn = django_rq.get_connection("other")
    conn.zadd(presence.booting_key("other"), {machine: 9e9})  # the scaler started it
    seen: list[tuple[bool, bool]] = []

    class Watching(FlyWorker):
        def execute_job(self, job: Any, queue: Any) -> None:
            active = conn.zscore(presence.active_key("other"), machine) is not None
            booting = conn.zscore(presence.booting_key("other"), machine) is not None
            seen.append((active, booting))
            super().execute_job(job, queue)

    jobs.sleep_then_write.delay("/dev/null", 0)
    Watching(["other"], connection=conn).work(burst=True)
    assert seen == [(True, False)]  # live while working; no longer counted as booting
    assert conn.zscore(presence.active_key("other"), machine) is None  # gone on the way out
