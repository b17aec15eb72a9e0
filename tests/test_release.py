"""Releases in this process against the real Redis: stamps, "newer", and the hand-back rule.

The rule across a real deploy on the emulator is in ``test_warm.py``; here a ``FlyWorker``
runs in-process with ``FLY_IMAGE_REF`` set, as on a Machine.
"""

from __future__ import annotations

from typing import Any

import django_rq
import pytest

from django_flyworkers import release
from django_flyworkers.models import FlyJob
from django_flyworkers.worker import FlyWorker
from tests.testapp import jobs

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(120)]

OLD, NEW = "registry.fly.io/app:deployment-01", "registry.fly.io/app:deployment-02"


@pytest.fixture
def conn(redis_flush: Any, settings: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    release.forget()
    settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": "off", "IMAGE": OLD}
    monkeypatch.setenv("FLY_MACHINE_ID", "3d8d9e1b2c4f58")
    yield django_rq.get_connection("default")
    release.forget()


def test_first_seen_is_the_first_writers_server_time(conn: Any) -> None:
    old = release.first_seen(conn, OLD)
    new = release.first_seen(conn, NEW)
    assert 0 < old <= new
    release.forget()  # another process: it reads the time the first one recorded
    assert release.first_seen(conn, OLD) == old
    assert float(conn.hget(release.RELEASES_KEY, OLD)) == old


def test_delay_stamps_the_release_and_a_requeue_keeps_it(conn: Any, settings: Any) -> None:
    job = jobs.add.delay(1, 2)
    stored = django_rq.get_queue("default").fetch_job(job.id)
    assert stored is not None
    assert stored.meta[release.META_RELEASE] == OLD
    assert stored.meta[release.META_SEEN] == release.first_seen(conn, OLD)
    settings.FLYWORKERS = {**settings.FLYWORKERS, "IMAGE": NEW}
    django_rq.get_queue("default").enqueue_job(stored)  # a retry, a requeue: same enqueuer
    again = django_rq.get_queue("default").fetch_job(job.id)
    assert again is not None and again.meta[release.META_RELEASE] == OLD


def test_newer_means_first_seen_later_not_a_bigger_name(conn: Any) -> None:
    # Refs are not ordered: "zzz" was deployed first, "aaa" after it.
    first, second = "registry.fly.io/app:zzz", "registry.fly.io/app:aaa"
    release.first_seen(conn, first)
    release.first_seen(conn, second)
    job = jobs.add.using(
        meta={release.META_RELEASE: second, release.META_SEEN: release.first_seen(conn, second)}
    ).delay(1, 1)
    assert release.is_newer(job, conn, first)
    assert not release.is_newer(job, conn, second)
    unstamped = django_rq.get_queue("default").enqueue(jobs.plain_add, 1, 1)
    unstamped.meta.clear()
    assert not release.is_newer(unstamped, conn, first)


def test_an_old_worker_hands_a_newer_job_back_to_the_front_and_leaves(
    conn: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    woken: list[str] = []
    monkeypatch.setattr(
        "django_flyworkers.scaling.scaler.wake", lambda queue, **kw: woken.append(queue)
    )
    older = jobs.add.delay(1, 1)  # enqueued by the old release
    settings.FLYWORKERS = {**settings.FLYWORKERS, "IMAGE": NEW}  # the deploy
    newer = jobs.add.delay(2, 2)
    later = jobs.add.delay(3, 3)
    queue = django_rq.get_queue("default")

    monkeypatch.setenv("FLY_IMAGE_REF", OLD)  # a worker still on the old image
    FlyWorker([queue], connection=conn).work(burst=True)
    assert older.return_value() == 2
    assert queue.job_ids == [newer.id, later.id]  # back at the front, in order
    assert conn.llen(queue.intermediate_queue_key) == 0
    assert FlyJob.objects.get(job_id=newer.id).attempts == 0
    assert woken == []  # old code wakes nothing: the new release's wake path will

    monkeypatch.setenv("FLY_IMAGE_REF", NEW)
    old_job = jobs.add.using(meta=dict(older.meta)).delay(4, 4)  # old jobs run on new code
    FlyWorker([queue], connection=conn).work(burst=True)
    assert [newer.return_value(), later.return_value(), old_job.return_value()] == [4, 6, 8]
