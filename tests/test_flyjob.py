"""@flyjob: enqueue API, call-time queue resolution and clear errors at call time."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import django_rq
import pytest
from rq.job import Job

from django_flyworkers import flyjob, release
from django_flyworkers.exceptions import UnknownQueue, UnserializableArguments
from django_flyworkers.models import FlyJob
from tests.testapp import jobs

pytestmark = pytest.mark.django_db(transaction=True)


def module_level() -> None: ...


@pytest.fixture(autouse=True)
def no_wake(redis_flush: Any, settings: Any) -> None:
    settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": "off"}


def test_delay_returns_job_with_id_and_pushes() -> None:
    job = jobs.add.delay(2, 3)
    assert isinstance(job, Job)
    assert django_rq.get_queue("default").get_job_ids() == [job.id]
    assert job.func_name == "tests.testapp.jobs.add"
    assert jobs.add(2, 3) == 5  # still a plain function when called


def test_plain_enqueue_of_decorated_function_works() -> None:
    job = django_rq.get_queue("default").enqueue(jobs.add, 1, 1)
    assert job.func_name == "tests.testapp.jobs.add"


def test_unserializable_arguments_fail_at_call_time_and_push_nothing() -> None:
    with pytest.raises(UnserializableArguments, match="cannot be serialized") as info:
        jobs.add.delay(threading.Lock(), 1)
    assert "tests.testapp.jobs.add" in str(info.value)
    assert django_rq.get_queue("default").count == 0
    assert not FlyJob.objects.exists()


def test_unserializable_inside_atomic_fails_at_call_time() -> None:
    from django.db import transaction

    with pytest.raises(UnserializableArguments), transaction.atomic():
        jobs.add.delay(lambda: None, 1)


def test_unknown_queue_is_a_clear_error_at_call_time() -> None:
    with pytest.raises(UnknownQueue, match=r"'nope' is not in RQ_QUEUES \(configured: default"):
        jobs.add.using(queue="nope").delay(1, 2)


def test_queue_resolved_at_call_time(settings: Any) -> None:
    job = jobs.add.using(queue="images").delay(1, 2)
    assert job.origin == "images"
    assert django_rq.get_queue("images").get_job_ids() == [job.id]


def test_per_call_options(settings: Any) -> None:
    queue = django_rq.get_queue("default")
    first = jobs.add.delay(1, 1)
    front = jobs.add.using(at_front=True, timeout=33, job_id="my-id", meta={"k": "v"}).delay(2, 2)
    assert front.id == "my-id"
    assert queue.get_job_ids() == ["my-id", first.id]
    fetched = queue.fetch_job("my-id")
    # The user's meta, plus the release stamp FlyQueue adds (django_flyworkers.release).
    image = settings.FLYWORKERS["IMAGE"]
    stamp = {
        release.META_RELEASE: image,
        release.META_SEEN: release.first_seen(queue.connection, image),
    }
    assert fetched is not None and fetched.timeout == 33 and fetched.meta == {"k": "v", **stamp}


def test_retry_option_becomes_rq_retry() -> None:
    job = jobs.flaky.delay("/tmp/unused", 1)
    assert job.retries_left == 2


def test_enqueue_at_and_in_schedule() -> None:
    queue = django_rq.get_queue("default")
    at = datetime.now(UTC) + timedelta(hours=1)
    job = jobs.add.enqueue_at(at.replace(tzinfo=None), 1, 2)  # naive = UTC
    later = jobs.add.enqueue_in(timedelta(minutes=5), 1, 2)
    assert set(queue.scheduled_job_registry.get_job_ids()) == {job.id, later.id}
    assert queue.count == 0
    assert FlyJob.objects.get(job_id=job.id).status == "scheduled"


def test_nested_function_is_refused() -> None:
    def inner() -> None: ...

    with pytest.raises(TypeError, match="module-level function"):
        flyjob("default")(inner)


def test_unknown_option_is_refused() -> None:
    with pytest.raises(TypeError, match="unknown @flyjob option"):
        flyjob("default", colour="red")(module_level)


class _Defined:
    """Stands for a class defined in the script that enqueues (its module is __main__)."""


@pytest.fixture
def main_class(monkeypatch: pytest.MonkeyPatch) -> type:
    import sys

    cls = type("Settings", (_Defined,), {"__module__": "__main__"})
    # Pickle finds it by name in __main__, as it would for a class a script defines.
    monkeypatch.setattr(sys.modules["__main__"], "Settings", cls, raising=False)
    return cls


def test_argument_a_worker_cannot_load_is_refused_naming_it(main_class: type) -> None:
    import pickle

    value = main_class()
    pickle.dumps(value)  # it pickles: only a worker would fail, with DeserializationError
    with pytest.raises(UnserializableArguments, match=r"argument 2 refers to Settings.*__main__"):
        jobs.add.delay(1, value)
    with pytest.raises(UnserializableArguments, match=r"keyword argument 'b' refers to Settings"):
        jobs.add.delay(1, b=[{"nested": value}])
    with pytest.raises(UnserializableArguments, match="argument 1"):
        django_rq.get_queue("default").enqueue(jobs.add, value, 1)
    assert django_rq.get_queue("default").count == 0
    assert not FlyJob.objects.exists()


def test_arguments_merely_mentioning_main_are_fine() -> None:
    job = jobs.add.delay("__main__", "__main__.Settings")
    assert django_rq.get_queue("default").get_job_ids() == [job.id]
