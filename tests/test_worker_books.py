"""FlyWorker pays for the job and little else, and its ledger rows end up right.

Real worker processes (tests/scripts/run_worker.py) drain real jobs from a real redis-server
into the SQLite ledger; kills are injected at exact points with ``FLYWORKERS_FAULT_POINT``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import django_rq
import pytest
from django.db.backends.signals import connection_created
from rq import Retry
from rq import Worker as RQWorker
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job

from django_flyworkers import get_client, presence, reaper
from django_flyworkers.models import FlyJob, WorkerMachine
from django_flyworkers.queue import FlyQueue
from django_flyworkers.scaling.spec import META_KEY
from django_flyworkers.testing import processes, wait_for
from django_flyworkers.worker import FAULT_ENV, FlyWorker
from tests.testapp import jobs

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(900)]

SCRIPT = Path(__file__).parent / "scripts" / "run_worker.py"


@pytest.fixture
def queue(redis_flush: Any, settings: Any) -> Any:
    settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": "off"}
    return django_rq.get_queue("default")


@dataclass
class Worker:
    """A run_worker.py process; its stderr goes to a file, which no other wait can stall."""

    process: processes.ForkedPopen
    stderr: IO[bytes]


def start_worker(env: dict[str, str] | None = None) -> Worker:
    stderr = tempfile.TemporaryFile()  # noqa: SIM115  closed by finish_worker
    process = processes.ForkedPopen(
        [sys.executable, str(SCRIPT), "default"],
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    return Worker(process, stderr)


def finish_worker(worker: Worker) -> int:
    """The worker's exit code (0, or -9 when a fault point killed it); anything else fails."""
    with worker.stderr:
        returncode = worker.process.wait(timeout=800)
        if returncode not in (0, -9):
            worker.stderr.seek(0)
            log = worker.stderr.read().decode(errors="replace")
            raise AssertionError(f"worker exited {returncode}:\n{log[-3000:]}")
    return returncode


def run_worker(env: dict[str, str] | None = None) -> int:
    return finish_worker(start_worker(env))


def rq_statuses(queue: Any, ids: list[str]) -> dict[str, str]:
    fetched = Job.fetch_many(ids, connection=queue.connection)
    pairs = zip(ids, fetched, strict=True)
    return {job_id: job.get_status(refresh=False).value for job_id, job in pairs}


@pytest.mark.slow(50)
def test_drain_two_thousand_jobs_every_row_right(queue: Any) -> None:
    datas = [FlyQueue.prepare_data(jobs.add, (i, 1)) for i in range(1700)]
    datas += [FlyQueue.prepare_data(jobs.fail, ("boom",)) for _ in range(150)]
    datas += [FlyQueue.prepare_data(jobs.fail_first, (i,), retry=Retry(1)) for i in range(150)]
    enqueued = queue.enqueue_many(datas)
    ids = [job.id for job in enqueued]
    assert FlyJob.objects.filter(status="queued").count() == 2000

    # Two Machines drain the queue together, as a scaled-out queue does: a retry may run on
    # the other Machine, and both write the ledger at once.
    machines = ("drain2000a", "drain2000b")
    workers = [start_worker({"FLY_MACHINE_ID": machine_id}) for machine_id in machines]
    assert [finish_worker(worker) for worker in workers] == [0, 0]

    rows = {row.job_id: row for row in FlyJob.objects.select_related("machine")}
    assert rows.keys() == set(ids)
    expected = {job.id: ("finished", 1) for job in enqueued[:1700]}
    expected |= {job.id: ("failed", 1) for job in enqueued[1700:1850]}
    expected |= {job.id: ("finished", 2) for job in enqueued[1850:]}
    assert {i: (row.status, row.attempts) for i, row in rows.items()} == expected
    assert {i: row.status for i, row in rows.items()} == rq_statuses(queue, ids)
    for job_id, row in rows.items():
        assert row.machine is not None and row.machine.machine_id in machines
        assert row.worker_name.startswith(f"{row.machine.machine_id}-")
        assert row.started_at is not None and row.ended_at is not None
        assert row.enqueued_at is not None and row.enqueued_at <= row.started_at <= row.ended_at
        if row.status == "failed":
            assert "RuntimeError: boom" in row.error
        else:
            assert row.error == "", job_id
    for machine in WorkerMachine.objects.filter(machine_id__in=machines):
        assert (machine.state, machine.last_exit_code, machine.boots) == ("stopped", 0, 1)
        assert machine.run_seconds > 0
    assert WorkerMachine.objects.filter(machine_id__in=machines).count() == 2


def test_kills_at_fault_points_leave_nothing_one_reap_cannot_settle(
    queue: Any, fly_emulator: Any, settings: Any
) -> None:
    # Jobs that outlast a batch (FLUSH_EVERY), so their start is written while they run.
    finished = queue.enqueue(jobs.slow_add, 1, 2, 0.5)
    failed = queue.enqueue(jobs.fail, "boom", 0.5)
    # Each worker runs one job, then dies between the job's end and the ledger's record of it.
    for _ in range(2):
        assert run_worker({FAULT_ENV: "job-ended"}) == -9
    assert set(FlyJob.objects.values_list("status", flat=True)) == {"started"}
    # This one dies right after forking its horse, before the start is written: the horse,
    # in its own process group, runs the job to the end.
    orphaned = queue.enqueue(jobs.add, 3, 4)
    assert run_worker({FAULT_ENV: "horse-forked"}) == -9
    wait_for(lambda: orphaned.get_status() == "finished", timeout=30, what="the orphaned horse")
    assert FlyJob.objects.get(job_id=orphaned.id).status == "queued"
    # A short job ends before its start is due (here in a minute: on a busy machine a horse
    # can take longer than the usual 0.1 s): killed then, the worker wrote nothing for it.
    quick = queue.enqueue(jobs.add, 5, 6)
    assert run_worker({FAULT_ENV: "job-ended", "FLUSH_EVERY": "60"}) == -9
    assert FlyJob.objects.get(job_id=quick.id).status == "queued"
    # And this one's job fails, rq retries it, and the worker dies before recording that.
    retried = queue.enqueue(jobs.fail_first, 3, 0.5, retry=Retry(1))
    assert run_worker({FAULT_ENV: "job-ended"}) == -9
    assert FlyJob.objects.get(job_id=retried.id).status == "started"

    reaper.reap(["default"])

    ids = [finished.id, failed.id, retried.id, orphaned.id, quick.id]
    rows = {row.job_id: row for row in FlyJob.objects.all()}
    assert {i: row.status for i, row in rows.items()} == rq_statuses(queue, ids)
    assert rows[finished.id].status == "finished" and rows[finished.id].ended_at is not None
    assert rows[failed.id].status == "failed" and "RuntimeError: boom" in rows[failed.id].error
    assert rows[retried.id].status == "queued"  # rq retried it: waiting again
    assert rows[orphaned.id].status == "finished" and rows[orphaned.id].attempts == 1
    assert rows[quick.id].status == "finished" and rows[quick.id].attempts == 1
    assert [row.attempts for row in rows.values()].count(1) == 5


def test_no_new_database_connection_per_job(queue: Any) -> None:
    from django.db import connection

    connection.ensure_connection()
    opened: list[int] = []

    def count(**kwargs: Any) -> None:
        opened.append(os.getpid())

    enqueued = [queue.enqueue(jobs.count_jobs) for _ in range(30)]
    connection_created.connect(count, weak=False)
    try:
        FlyWorker([queue], connection=queue.connection, queue_class=FlyQueue).work(burst=True)
    finally:
        connection_created.disconnect(count)
    assert [p for p in opened if p == os.getpid()] == []  # the parent kept its connection
    # Each horse opened its own connection for its job's query, and all 30 ledger rows are right.
    assert all(job.latest_result().return_value >= 30 for job in enqueued)
    assert FlyJob.objects.filter(status="finished", attempts=1).count() == 30


def test_presence_is_renewed_at_most_every_few_seconds(queue: Any) -> None:
    worker = FlyWorker([queue], connection=queue.connection, queue_class=FlyQueue)
    worker.register_birth()
    key = presence.active_key("default")
    first = queue.connection.zscore(key, worker.presence_id)
    assert first is not None
    for _ in range(5):
        worker.heartbeat()
    assert queue.connection.zscore(key, worker.presence_id) == first  # not renewed yet
    worker._announce_due = 0.0  # ANNOUNCE_EVERY has passed
    worker.heartbeat()
    assert queue.connection.zscore(key, worker.presence_id) > first
    worker.register_death()


def test_a_job_dequeued_by_a_worker_killed_before_it_began_goes_back(
    queue: Any, fly_emulator: Any
) -> None:
    stuck, passing, intermediate = two_dequeued(queue)
    # A worker is alive (off Fly, so no Machine list can tell which job it took): rq's rule.
    alive = RQWorker([queue], connection=queue.connection, name="laptop-worker")
    alive.register_birth()

    assert reaper.reap(["default"]).queues[0].recovered == []  # first sighting: wait
    seen = f"{intermediate.key}:flyworkers_seen:{stuck.id}"
    queue.connection.set(seen, float(queue.connection.get(seen)) - 61)  # a minute later
    recovered = reaper.reap(["default"]).queues[0].recovered
    assert [(r.job_id, r.outcome) for r in recovered] == [(stuck.id, "requeued")]
    assert queue.get_job_ids() == [stuck.id]
    assert intermediate.get_job_ids() == [passing.id]  # the live one is left alone
    assert stuck.get_status() == "queued"
    assert reaper.reap(["default"]).queues[0].recovered == []


def two_dequeued(queue: Any) -> tuple[Job, Job, IntermediateQueue]:
    """Two workers dequeued a job each (rq's LMOVE). One was killed before it began its job;
    the other is about to begin (its execution is registered, heartbeating)."""
    stuck = queue.enqueue(jobs.add, 1, 2)
    passing = queue.enqueue(jobs.add, 3, 4)
    intermediate = IntermediateQueue(queue.key, connection=queue.connection)
    for _ in range(2):
        queue.connection.lmove(queue.key, intermediate.key, "LEFT", "RIGHT")
    queue.connection.zadd(queue.started_job_registry.key, {f"{passing.id}:exec1": 2e9})
    assert queue.count == 0 and intermediate.get_job_ids() == [stuck.id, passing.id]
    return stuck, passing, intermediate


@pytest.mark.parametrize("state", ["stopped", "suspended"])
def test_a_job_dequeued_on_a_machine_now_down_goes_back_at_once(
    queue: Any, fly_emulator: Any, state: str
) -> None:
    # The worker that dequeued it ran on the queue's only Machine, which is down now and was
    # the last worker rq knows for the queue: nobody can begin the job, so no minute's wait.
    # Unless the Machine is suspended: it may resume where it was.
    client = get_client()
    sleep = ["python", "-c", "import time; time.sleep(120)"]
    config = {"image": "img", "init": {"cmd": sleep}, "metadata": {META_KEY: "default"}}
    machine = client.create(config, skip_launch=state == "stopped")
    if state == "suspended":
        client.wait(machine.id, "started", timeout=30)
        client.suspend(machine.id)
        client.wait(machine.id, "suspended", timeout=30)
    stuck, passing, intermediate = two_dequeued(queue)
    gone = RQWorker([queue], connection=queue.connection, name=f"{machine.id}-0badc0de")
    gone.register_birth()  # its registration outlives it, as after a SIGKILL

    recovered = reaper.reap(["default"]).queues[0].recovered
    if state == "suspended":
        assert recovered == []
        return
    assert [(r.job_id, r.outcome) for r in recovered] == [(stuck.id, "requeued")]
    assert "no worker of the queue is alive" in recovered[0].reason
    assert queue.get_job_ids() == [stuck.id]
    assert intermediate.get_job_ids() == [passing.id]  # a live execution is left alone
    assert FlyJob.objects.get(job_id=stuck.id).status == "queued"
