"""FlyQueue sends job_enqueued / job_scheduled exactly once per job, after the push is visible."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import django_rq
import pytest
from django.db import transaction
from redis import WatchError
from rq import Retry, SimpleWorker
from rq.job import Job

from django_flyworkers import signals
from django_flyworkers.models import FlyJob
from django_flyworkers.queue import FlyQueue
from tests.testapp import jobs

pytestmark = pytest.mark.django_db(transaction=True)


class Recorder:
    """Collects signal calls and, at each call, whether the jobs were already in Redis."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, list[str], list[bool]]] = []

    def __call__(self, sender: Any, queue: str, jobs: list[Job], signal: Any, **kw: Any) -> None:
        conn = django_rq.get_connection(queue)
        listed = {j.decode() for j in conn.lrange(f"rq:queue:{queue}", 0, -1)}
        scheduled = {j.decode() for j in conn.zrange(f"rq:scheduled:{queue}", 0, -1)}
        visible = [
            bool(conn.exists(job.key)) and (job.id in listed or job.id in scheduled) for job in jobs
        ]
        name = {
            id(signals.job_enqueued): "enqueued",
            id(signals.job_scheduled): "scheduled",
            id(signals.job_deferred): "deferred",
        }[id(signal)]
        self.calls.append((name, queue, [job.id for job in jobs], visible))

    def ids(self, name: str = "enqueued") -> list[str]:
        return [job_id for kind, _, ids, _ in self.calls if kind == name for job_id in ids]


@pytest.fixture
def recorder(redis_flush: Any, settings: Any) -> Iterator[Recorder]:
    settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": "off"}
    rec = Recorder()
    for signal in (signals.job_enqueued, signals.job_scheduled, signals.job_deferred):
        signal.connect(rec, weak=False)
    yield rec
    for signal in (signals.job_enqueued, signals.job_scheduled, signals.job_deferred):
        signal.disconnect(rec)


def test_queue_class_is_flyqueue(recorder: Recorder) -> None:
    assert isinstance(django_rq.get_queue("default"), FlyQueue)


def test_enqueue_fires_once_after_push(recorder: Recorder) -> None:
    job = django_rq.get_queue("default").enqueue(jobs.add, 1, 2)
    assert recorder.calls == [("enqueued", "default", [job.id], [True])]
    assert FlyJob.objects.get(job_id=job.id).status == "queued"


def test_callers_pipeline_fires_only_after_execute(recorder: Recorder) -> None:
    queue = django_rq.get_queue("default")
    with queue.connection.pipeline() as pipe:
        job = queue.enqueue(jobs.add, 1, 2, pipeline=pipe)
        assert recorder.calls == []
        pipe.execute()
    assert recorder.calls == [("enqueued", "default", [job.id], [True])]


def test_pipeline_never_executed_fires_nothing(recorder: Recorder) -> None:
    queue = django_rq.get_queue("default")
    with queue.connection.pipeline() as pipe:
        queue.enqueue(jobs.add, 1, 2, pipeline=pipe)
    # reset() on leaving the block drops the pending notification; a later execute is empty.
    pipe.execute()
    assert recorder.calls == []
    assert not FlyJob.objects.exists()


def test_watch_error_drops_and_retry_fires_once(recorder: Recorder) -> None:
    queue = django_rq.get_queue("default")
    conn = queue.connection
    job = queue.create_job(jobs.add, args=(1, 2))
    attempts = 0
    with conn.pipeline() as pipe:
        while True:
            attempts += 1
            try:
                pipe.watch("flyworkers:test:watched")
                pipe.multi()
                queue._enqueue_job(job, pipeline=pipe)
                if attempts == 1:
                    conn.set("flyworkers:test:watched", "changed")  # a concurrent writer
                pipe.execute()
                break
            except WatchError:
                continue
    assert attempts == 2
    assert recorder.ids() == [job.id]


def test_enqueue_many_fires_one_batch(recorder: Recorder) -> None:
    queue = django_rq.get_queue("default")
    datas = [FlyQueue.prepare_data(jobs.add, (i, i)) for i in range(5)]
    created = queue.enqueue_many(datas)
    assert len(recorder.calls) == 1
    assert sorted(recorder.ids()) == sorted(job.id for job in created)
    assert all(recorder.calls[0][3])
    assert FlyJob.objects.count() == 5


def test_enqueue_in_fires_scheduled(recorder: Recorder) -> None:
    job = jobs.add.enqueue_in(timedelta(minutes=5), 1, 2)
    assert recorder.ids("scheduled") == [job.id]
    assert recorder.ids("enqueued") == []
    row = FlyJob.objects.get(job_id=job.id)
    assert row.status == "scheduled" and row.scheduled_for is not None


def test_deferred_then_enqueued_by_worker_after_parent(recorder: Recorder) -> None:
    queue = django_rq.get_queue("default")
    parent = queue.enqueue(jobs.add, 1, 1)
    child = queue.enqueue(jobs.add, 2, 2, depends_on=parent)
    assert recorder.ids("deferred") == [child.id]
    assert FlyJob.objects.get(job_id=child.id).status == "deferred"
    SimpleWorker([queue], connection=queue.connection, queue_class=FlyQueue).work(burst=True)
    # The worker enqueued the dependent through FlyQueue: one more notification, for the child.
    assert recorder.ids("enqueued") == [parent.id, child.id]
    assert child.get_status() == "finished"


def test_retry_enqueued_by_worker_fires(recorder: Recorder) -> None:
    queue = django_rq.get_queue("default")
    job = queue.enqueue(jobs.fail, "once", retry=Retry(max=1))
    SimpleWorker([queue], connection=queue.connection, queue_class=FlyQueue).work(burst=True)
    assert recorder.ids("enqueued") == [job.id, job.id]  # first push, then the retry
    assert job.get_status() == "failed"


def test_atomic_rollback_pushes_nothing(recorder: Recorder) -> None:
    queue = django_rq.get_queue("default")
    with pytest.raises(RuntimeError), transaction.atomic():
        job = jobs.add.delay(1, 2)
        jobs.add.enqueue_in(timedelta(seconds=30), 3, 4)
        queue.enqueue(jobs.add, 5, 6)
        raise RuntimeError("rollback")
    assert recorder.calls == []
    assert queue.connection.keys("rq:job:*") == []
    assert queue.count == 0
    assert not Job.exists(job.id, connection=queue.connection)


def test_atomic_commit_pushes_after_commit(recorder: Recorder) -> None:
    queue = django_rq.get_queue("default")
    with transaction.atomic():
        job = jobs.add.delay(1, 2)
        assert job.id  # known before the push
        assert queue.count == 0
        assert recorder.calls == []
    assert queue.get_job_ids() == [job.id]
    assert recorder.ids() == [job.id]


def test_retry_with_interval_fires_scheduled(recorder: Recorder) -> None:
    queue = django_rq.get_queue("default")
    job = queue.enqueue(jobs.fail, "later", retry=Retry(max=1, interval=60))
    SimpleWorker([queue], connection=queue.connection, queue_class=FlyQueue).work(burst=True)
    assert recorder.ids("scheduled") == [job.id]
    assert job.get_status() == "scheduled"


# -- RQ's own behaviour survives FlyQueue ------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(lambda: __import__("rq.exceptions").exceptions.StopRequested(), id="stop"),
        pytest.param(
            lambda: __import__("rq.timeouts").timeouts.JobTimeoutException("late"), id="timeout"
        ),
        pytest.param(
            lambda: __import__("rq.exceptions").exceptions.ShutDownImminentException("bye", {}),
            id="shutdown",
        ),
    ],
)
def test_rq_control_flow_exceptions_leave_the_signal(recorder: Recorder, exc: Any) -> None:
    raised = exc()

    def interrupted(**kwargs: Any) -> None:
        raise raised

    signals.job_enqueued.connect(interrupted, weak=False)
    try:
        with pytest.raises(type(raised)):
            jobs.add.delay(1, 2)
    finally:
        signals.job_enqueued.disconnect(interrupted)


def test_other_receiver_errors_stay_contained(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(**kwargs: Any) -> None:
        raise ValueError("receiver bug")

    signals.job_enqueued.connect(broken, weak=False)
    try:
        job = jobs.add.delay(1, 2)  # returns: the job is in Redis
    finally:
        signals.job_enqueued.disconnect(broken)
    assert django_rq.get_queue("default").get_job_ids() == [job.id]
    assert recorder.ids() == [job.id]  # the other receivers still ran
    assert "receiver bug" in caplog.text


def test_rq_cli_enqueue_passes_options_by_position(recorder: Recorder) -> None:
    from click.testing import CliRunner
    from rq.cli.cli import main

    url = django_rq.get_connection("default").connection_pool.connection_kwargs
    redis_url = f"redis://{url['host']}:{url['port']}/{url.get('db', 0)}"
    result = CliRunner().invoke(
        main,
        [
            *("enqueue", "-u", redis_url, "--queue-class", "django_flyworkers.FlyQueue"),
            *("--result-ttl", "60", "tests.testapp.jobs.add", "1", "2"),
        ],
    )
    assert result.exit_code == 0, result.output
    (job_id,) = django_rq.get_queue("default").get_job_ids()
    assert recorder.ids() == [job_id]
    job = Job.fetch(job_id, connection=django_rq.get_connection("default"))
    assert job.result_ttl == 60 and list(job.args) == ["1", "2"]


def test_enqueue_call_binds_positional_options(recorder: Recorder) -> None:
    queue = django_rq.get_queue("default")
    job = queue.enqueue_call(jobs.add, (1, 2), None, 30, 45)  # func, args, kwargs, timeout, ttl
    assert (job.timeout, job.result_ttl, job.args) == (30, 45, (1, 2))
    with pytest.raises(TypeError):
        queue.enqueue_call(jobs.add, (1, 2), None, 30, 45, result_ttl=45)  # twice: as rq says


def test_enqueue_to_a_queue_missing_from_rq_queues(recorder: Recorder) -> None:
    from django_flyworkers.exceptions import UnknownQueue

    nowhere = FlyQueue("nowhere", connection=django_rq.get_connection("default"))
    with pytest.raises(UnknownQueue, match=r"'nowhere' is not in RQ_QUEUES \(configured: default"):
        nowhere.enqueue(jobs.add, 1, 2)
    with pytest.raises(KeyError):  # still a KeyError, as django-rq's was
        nowhere.enqueue(jobs.add, 1, 2)
    assert nowhere.count == 0 and recorder.calls == []


# -- Redis refusing a push after the commit ----------------------------------------------------


@pytest.fixture
def redis_down_queue(recorder: Recorder, settings: Any) -> str:
    from django_flyworkers.testing import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings.RQ_QUEUES = {**settings.RQ_QUEUES, "down": {"URL": dead}}
    return "down"


def test_push_refused_after_commit_is_recorded_and_logged(
    redis_down_queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    from django.contrib.auth.models import Group

    with transaction.atomic():
        Group.objects.create(name="committed")
        job = jobs.add.using(queue=redis_down_queue).delay(1, 2)
    # The transaction committed; the push could not be made and nothing was raised.
    assert Group.objects.filter(name="committed").exists()
    row = FlyJob.objects.get(job_id=job.id)
    assert row.status == "failed" and row.queue == "down"
    assert "enqueue failed after the transaction committed" in row.error
    assert "ConnectionError" in row.error
    errors = [r for r in caplog.records if r.levelname == "ERROR" and job.id in r.getMessage()]
    assert errors and "tests.testapp.jobs.add" in errors[0].getMessage()
    assert "NOT enqueued" in errors[0].getMessage()


def test_push_refused_after_commit_through_queue_enqueue(
    redis_down_queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    queue = django_rq.get_queue("down")
    with transaction.atomic():
        assert queue.enqueue(jobs.add, 1, 2) is None  # django-rq: None until the commit
        queue.enqueue_in(timedelta(minutes=1), jobs.add, 3, 4)
    rows = FlyJob.objects.filter(queue="down")
    assert [row.status for row in rows] == ["failed", "failed"]
    assert all(row.job_id in caplog.text for row in rows)


def test_push_refused_outside_a_transaction_raises(redis_down_queue: str) -> None:
    from redis.exceptions import ConnectionError

    with pytest.raises(ConnectionError):
        jobs.add.using(queue=redis_down_queue).delay(1, 2)
