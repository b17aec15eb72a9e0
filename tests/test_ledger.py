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
