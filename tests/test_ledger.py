"""The ledger never moves a job backwards, whichever process writes first."""

from __future__ import annotations

from typing import Any

import django_rq
import pytest

from django_flyworkers import ledger
from django_flyworkers.models import FlyJob, WorkerMachine
from tests.testapp import jobs

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def job(redis_flush: Any, settings: Any) -> Any:
    settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": "off"}
    return django_rq.get_queue("default").create_job(jobs.add, args=(1, 2))


def test_enqueue_inserts_once(job: Any) -> None:
    ledger.record_enqueued("default", [job])
    ledger.record_enqueued("default", [job])
    row = FlyJob.objects.get(job_id=job.id)
    assert (row.status, row.func_name, row.queue) == ("queued", "tests.testapp.jobs.add", "default")


def test_enqueue_never_overwrites_a_started_job(job: Any) -> None:
    ledger.record_started(job, "default", None, "w1")  # the worker got there first
    ledger.record_enqueued("default", [job])
    assert FlyJob.objects.get(job_id=job.id).status == "started"


def test_requeue_revives_a_failed_job(job: Any) -> None:
    from django.utils import timezone

    ledger.record_enqueued("default", [job])
    attempt = ledger.record_started(job, "default", None, "w1")
    ledger.record_ended(job.id, attempt, "failed", error="boom")
    job.enqueued_at = timezone.now()  # a requeue is a new push
    ledger.record_enqueued("default", [job])
    row = FlyJob.objects.get(job_id=job.id)
    assert (row.status, row.ended_at, row.attempts) == ("queued", None, 1)


def test_late_enqueue_notice_cannot_reopen_a_finished_job(job: Any) -> None:
    from django.utils import timezone

    job.enqueued_at = timezone.now()  # pushed; the producer's ledger write is slow...
    attempt = ledger.record_started(job, "default", None, "w1")  # ...a worker is faster
    ledger.record_ended(job.id, attempt, "finished")
    ledger.record_enqueued("default", [job])  # the producer's notice arrives last
    assert FlyJob.objects.get(job_id=job.id).status == "finished"


def test_huge_batches_are_split(job: Any) -> None:
    queue = django_rq.get_queue("default")
    many = [queue.create_job(jobs.add, args=(i, i)) for i in range(3 * ledger.UPSERT_BATCH + 7)]
    ledger.record_enqueued("default", many)
    assert FlyJob.objects.count() == len(many)


def test_reaper_closes_only_the_attempt_it_saw(job: Any) -> None:
    first = ledger.record_started(job, "default", None, "w1")
    second = ledger.record_started(job, "default", None, "w2")  # requeued and running again
    assert ledger.record_reaped(job.id, first, "queued", "Machine m1 was stopped") is False
    assert ledger.record_reaped(job.id, second, "failed", "Machine m2 was stopped") is True


def test_stale_attempt_cannot_close_a_newer_one(job: Any) -> None:
    WorkerMachine.objects.create(machine_id="m1", queue="default")
    first = ledger.record_started(job, "default", "m1", "w1")
    second = ledger.record_started(job, "default", None, "w2")
    assert (first, second) == (1, 2)
    assert ledger.record_ended(job.id, first, "queued") is False
    assert ledger.record_ended(job.id, second, "finished") is True
    row = FlyJob.objects.get(job_id=job.id)
    assert (row.status, row.worker_name, row.machine) == ("finished", "w2", None)


def test_errors_keep_their_end(job: Any) -> None:
    text = "x" * 10_000 + "ValueError: the real reason"
    attempt = ledger.record_started(job, "default", None, "w")
    ledger.record_ended(job.id, attempt, "failed", error=text)
    error = FlyJob.objects.get(job_id=job.id).error
    assert len(error) == ledger.ERROR_MAX_CHARS and error.endswith("the real reason")


def test_machine_run_seconds_accumulate_over_boots() -> None:
    for _ in range(2):
        ledger.record_machine_boot("m9", queue="default", region="ord")
        ledger.record_machine_exit("m9", 1.5)
    machine = WorkerMachine.objects.get(machine_id="m9")
    assert (machine.boots, machine.run_seconds, machine.region) == (2, 3.0, "ord")


def test_one_batch_may_name_a_job_twice(job: Any) -> None:
    """A batch that holds one job twice (pushed, then requeued before the batch is written).

    SQLite's upsert takes both; PostgreSQL refuses a statement that upserts a row twice
    ("ON CONFLICT DO UPDATE command cannot affect row a second time"), so the ledger must
    not send one. The latest push wins.
    """
    import copy
    from datetime import timedelta

    other = django_rq.get_queue("default").create_job(jobs.add, args=(3, 4))
    first = job.enqueued_at = job.created_at
    ledger.record_enqueued("default", [job, other, job])
    assert FlyJob.objects.filter(job_id__in=[job.id, other.id], status="queued").count() == 2

    attempt = ledger.record_started(job, "default", None, "w1")
    ledger.record_ended(job.id, attempt, "failed", error="boom")
    requeued = copy.copy(job)
    requeued.enqueued_at = first + timedelta(hours=1)
    ledger.record_enqueued("default", [job, requeued])
    row = FlyJob.objects.get(job_id=job.id)
    assert (row.status, row.enqueued_at, row.attempts) == ("queued", requeued.enqueued_at, 1)


def test_a_worker_that_exits_normally_records_its_exit() -> None:
    pk = ledger.record_machine_boot("m8", queue="default")
    assert WorkerMachine.objects.get(pk=pk).machine_id == "m8"
    ledger.record_machine_exit("m8", 2.0)
    machine = WorkerMachine.objects.get(machine_id="m8")
    assert (machine.state, machine.last_exit_code) == ("stopped", 0)
    ledger.record_machine_boot("m8", queue="default")
    ledger.record_machine_exit("m8", 1.0, exit_code=None)  # leaving on an error
    machine = WorkerMachine.objects.get(machine_id="m8")
    assert (machine.state, machine.last_exit_code) == ("stopping", 0)


# -- batched writes -------------------------------------------------------------------------------


def _runs(job: Any, worker: str = "w1") -> ledger.JobRun:
    return ledger.JobRun.of(job, "default", worker, None)


def test_a_run_started_and_ended_before_its_write_is_one_write(job: Any) -> None:
    ledger.record_enqueued("default", [job])
    run = _runs(job)
    run.end("finished")
    ledger.record_runs([run])
    row = FlyJob.objects.get(job_id=job.id)
    assert (row.status, row.attempts, row.worker_name, run.attempt) == ("finished", 1, "w1", 1)
    assert row.started_at is not None and row.ended_at is not None


def test_a_retry_taken_again_by_the_same_worker_closes_the_old_attempt_first(job: Any) -> None:
    first = _runs(job)
    ledger.record_runs([first])
    first.end("queued", error="RuntimeError: once")  # rq retried it ...
    second = _runs(job)  # ... and this worker took it again before writing anything
    second.end("finished")
    ledger.record_runs([first, second])
    row = FlyJob.objects.get(job_id=job.id)
    assert (first.attempt, second.attempt) == (1, 2)
    assert (row.status, row.attempts, row.error) == ("finished", 2, "")


def test_a_run_whose_row_the_producer_has_not_written_yet_creates_it(job: Any) -> None:
    run = _runs(job)
    ledger.record_runs([run])  # the producer's batched row comes later
    ledger.record_enqueued("default", [job])  # and must not undo the start
    row = FlyJob.objects.get(job_id=job.id)
    assert (row.status, row.attempts, row.func_name) == ("started", 1, "tests.testapp.jobs.add")


def test_notices_of_every_status_share_one_statement(job: Any) -> None:
    queue = django_rq.get_queue("default")
    other = queue.create_job(jobs.add, args=(3, 4))
    later = queue.create_job(jobs.add, args=(5, 6))
    batch = [
        *ledger.notices("default", [job]),
        *ledger.notices("default", [other], FlyJob.Status.DEFERRED),
        *ledger.notices("default", [later], FlyJob.Status.SCHEDULED),
        *ledger.notices("default", [other]),  # its dependency finished: queued now
    ]
    assert ledger.write_notices(batch) == 1
    statuses = dict(FlyJob.objects.values_list("job_id", "status"))
    assert statuses == {job.id: "queued", other.id: "queued", later.id: "scheduled"}


def test_ten_thousand_rows_take_five_statements(job: Any) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    queue = django_rq.get_queue("default")
    many = [queue.create_job(jobs.add, args=(i, i)) for i in range(10_000)]
    with CaptureQueriesContext(connection) as queries:
        assert ledger.write_notices(ledger.notices("default", many)) == 5
    assert len([q for q in queries if q["sql"].startswith("INSERT")]) == 5
    assert FlyJob.objects.count() == 10_000


# -- settling from rq's truth ---------------------------------------------------------------------


def _started(queue: Any, *args: Any) -> Any:
    """A job pushed and recorded, then started by a worker that wrote its start."""
    pushed = queue.enqueue(jobs.add, *args)
    ledger.record_started(pushed, "default", None, "w-killed")
    return pushed


def test_settle_sets_rows_a_killed_worker_left(redis_flush: Any, settings: Any) -> None:
    from rq.job import JobStatus

    settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": "off"}
    queue = django_rq.get_queue("default")
    conn = queue.connection
    finished, failed, requeued, limbo, running, deleted, unstarted = (
        _started(queue, i, i) for i in range(7)
    )
    conn.lrem(queue.key, 0, finished.id)
    finished.set_status(JobStatus.FINISHED)
    conn.lrem(queue.key, 0, failed.id)
    failed.set_status(JobStatus.FAILED)
    conn.lrem(queue.key, 0, limbo.id)  # dequeued by a Machine that died before it began
    conn.lrem(queue.key, 0, running.id)
    running.set_status(JobStatus.STARTED)
    deleted.delete()  # result_ttl=0: gone as soon as it finished
    FlyJob.objects.filter(job_id=unstarted.id).update(status="queued", attempts=0)
    conn.lrem(queue.key, 0, unstarted.id)
    unstarted.set_status(JobStatus.FINISHED)  # its worker died before writing anything

    preview = ledger.settle_queue("default", dry_run=True)
    assert FlyJob.objects.filter(status="started").count() == 6  # a dry run writes nothing
    settled = {item.job_id: item.after for item in ledger.settle_queue("default")}
    assert settled == {item.job_id: item.after for item in preview}
    statuses = dict(FlyJob.objects.values_list("job_id", "status"))
    assert statuses == {
        finished.id: "finished",
        failed.id: "failed",
        requeued.id: "queued",
        limbo.id: "started",  # left to the reaper's recovery: only it knows the Machine died
        running.id: "started",
        deleted.id: "finished",
        unstarted.id: "finished",
    }
    assert FlyJob.objects.get(job_id=finished.id).ended_at is not None
    assert ledger.settle_queue("default") == []  # a second pass has nothing left to do


def test_settle_never_overwrites_a_newer_attempt(redis_flush: Any, settings: Any) -> None:
    from rq.job import JobStatus

    settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": "off"}
    queue = django_rq.get_queue("default")
    pushed = _started(queue, 1, 1)
    queue.connection.lrem(queue.key, 0, pushed.id)
    pushed.set_status(JobStatus.FINISHED)
    preview = ledger.settle_queue("default", dry_run=True)
    ledger.record_started(pushed, "default", None, "w-new")  # requeued and taken again meanwhile
    assert not any(ledger._settle(item) for item in preview)
    assert FlyJob.objects.get(job_id=pushed.id).status == "started"
