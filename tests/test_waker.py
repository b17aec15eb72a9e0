"""WAKE_MODE "thread": the caller pays for its Redis push; rows and wake-ups follow on the waker.

Every guarantee of the enqueue side still holds with the row written later, in batches: a row
exists for every job within a bounded delay (or once a worker starts it), rows never move
backwards, a rolled-back transaction writes nothing, and a process that dies before writing
loses no job.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import django_rq
import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from django_flyworkers import ledger
from django_flyworkers.models import FlyJob
from django_flyworkers.queue import FlyQueue
from django_flyworkers.scaling import background, scaler
from django_flyworkers.scaling.background import waker
from django_flyworkers.testing import wait_for
from django_flyworkers.worker import FlyWorker
from tests.testapp import jobs

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def woken(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Wake-ups asked for, as (queue, thread name); no Machines API call is made."""
    calls: list[tuple[str, str]] = []

    def wake(queue: str, **kwargs: Any) -> None:
        calls.append((queue, threading.current_thread().name))

    monkeypatch.setattr(scaler, "wake", wake)
    return calls


@pytest.fixture
def thread_mode(redis_flush: Any, settings: Any) -> Any:
    settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": "thread"}
    yield settings
    waker.cancel()


def rows(ids: list[str]) -> dict[str, str]:
    return dict(FlyJob.objects.filter(job_id__in=ids).values_list("job_id", "status"))


def test_the_caller_pays_for_redis_and_the_row_follows(
    thread_mode: Any, woken: list[tuple[str, str]]
) -> None:
    with CaptureQueriesContext(connection) as caller:
        ids = [jobs.add.delay(i, 1).id for i in range(20)]
    assert len(caller) == 0  # no SQL on the caller's thread
    began = time.monotonic()
    wait_for(lambda: len(rows(ids)) == 20, timeout=5, what="20 rows written by the waker")
    assert time.monotonic() - began < 5
    assert set(rows(ids).values()) == {"queued"}
    # The coverage check ran on the waker thread, after the pushes, once per batch.
    assert woken and {thread for _, thread in woken} == {"flyworkers-waker"}
    assert len(woken) < 20


def test_enqueue_many_writes_ten_thousand_rows_in_a_handful_of_statements(
    thread_mode: Any, woken: list[tuple[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    thread_mode.DEBUG = True  # Django logs every statement, on every thread
    caplog.set_level(logging.DEBUG, logger="django.db.backends")
    queue = django_rq.get_queue("default")
    datas = [FlyQueue.prepare_data(jobs.add, (i, i)) for i in range(10_000)]
    created = queue.enqueue_many(datas)
    assert waker.drain(60)
    inserts = [
        r for r in caplog.records if getattr(r, "sql", "").startswith("INSERT INTO")
    ]  # fmt: skip
    assert len(inserts) <= 5
    assert FlyJob.objects.filter(status="queued").count() == len(created) == 10_000


def test_a_late_row_never_moves_a_job_backwards(
    thread_mode: Any, woken: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(background, "BATCH_DELAY", 60.0)  # the waker is slow today
    job = jobs.add.delay(1, 2)
    run = ledger.JobRun.of(job, "default", "fast-worker", None)  # a worker is faster
    run.end("finished")
    ledger.record_runs([run])
    assert waker.pending == 1
    assert waker.drain(10)  # the producer's row arrives last
    row = FlyJob.objects.get(job_id=job.id)
    assert (row.status, row.attempts, row.worker_name) == ("finished", 1, "fast-worker")


def test_a_rolled_back_transaction_writes_nothing(
    thread_mode: Any, woken: list[tuple[str, str]]
) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        jobs.add.delay(1, 2)
        django_rq.get_queue("default").enqueue(jobs.add, 3, 4)
        raise RuntimeError("rollback")
    assert waker.drain(10)
    assert not FlyJob.objects.exists()
    assert django_rq.get_queue("default").count == 0
    assert woken == []


def test_sync_mode_writes_the_row_and_wakes_inline(
    redis_flush: Any, settings: Any, woken: list[tuple[str, str]]
) -> None:
    settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": "sync"}
    job = jobs.add.delay(1, 2)
    assert FlyJob.objects.get(job_id=job.id).status == "queued"  # before .delay() returned
    assert woken == [("default", threading.current_thread().name)]


ENQUEUE_THEN = """
import os, signal, sys
sys.path.insert(0, {root!r})
os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
import django
django.setup()
from django.conf import settings
from django.test import override_settings
from django_flyworkers.scaling import background
from tests.testapp import jobs

background.BATCH_DELAY = 600.0  # nothing is written before the process ends
with override_settings(FLYWORKERS={{**settings.FLYWORKERS, "WAKE_MODE": "thread", "QUEUES": {{}}}}):
    print(" ".join(jobs.add.delay(i, 1).id for i in range(3)), flush=True)
    assert background.waker.pending == 3
    {ending}
"""


def _enqueue_in_a_process(ending: str) -> tuple[list[str], int]:
    code = ENQUEUE_THEN.format(root=str(ROOT), ending=ending)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    return done.stdout.split(), done.returncode


def test_process_exit_writes_what_is_pending(thread_mode: Any) -> None:
    ids, code = _enqueue_in_a_process("sys.exit(0)")  # atexit drains the waker
    assert code == 0
    assert rows(ids) == dict.fromkeys(ids, "queued")


def test_a_process_killed_before_writing_loses_no_job(thread_mode: Any, settings: Any) -> None:
    ids, code = _enqueue_in_a_process("os.kill(os.getpid(), signal.SIGKILL)")
    assert code == -9 and len(ids) == 3
    assert rows(ids) == {}  # nothing written ...
    queue = django_rq.get_queue("default")
    assert queue.get_job_ids() == ids  # ... but the jobs are in Redis
    settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": "off"}
    FlyWorker([queue], connection=queue.connection).work(burst=True)
    # The worker created each row when it started the job.
    assert rows(ids) == dict.fromkeys(ids, "finished")
    assert set(FlyJob.objects.filter(job_id__in=ids).values_list("attempts", flat=True)) == {1}
    assert set(FlyJob.objects.values_list("func_name", flat=True)) == {"tests.testapp.jobs.add"}


def test_a_worker_leaves_the_wake_mode_alone(
    thread_mode: Any, woken: list[tuple[str, str]]
) -> None:
    queue = django_rq.get_queue("default")
    FlyWorker([queue], connection=queue.connection)  # rq builds workers wherever it lists them
    with CaptureQueriesContext(connection) as caller:
        jobs.add.delay(1, 2)
    assert len(caller) == 0
    assert waker.drain(10)
    assert woken == [("default", "flyworkers-waker")]  # still on the thread, not inline


def test_a_work_horse_writes_what_its_job_enqueued_before_it_exits(
    thread_mode: Any, woken: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(background, "BATCH_DELAY", 600.0)  # only a drain writes anything
    queue = django_rq.get_queue("default")
    parent = queue.enqueue(jobs.enqueue_on_other, 7)
    FlyWorker([queue], connection=queue.connection).work(burst=True)
    child_id = parent.latest_result().return_value
    # The horse left through os._exit; it wrote the row of the job it enqueued first.
    assert FlyJob.objects.get(job_id=child_id).status == "queued"
    assert FlyJob.objects.get(job_id=child_id).queue == "other"
    assert django_rq.get_queue("other").get_job_ids() == [child_id]
