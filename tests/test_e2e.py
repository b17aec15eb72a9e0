"""End to end: real redis-server, the emulator over HTTP, real worker processes on "Machines"."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
from django.db import transaction

from django_flyworkers.emulator import EmulatorControl
from django_flyworkers.models import FlyJob, ScaleEvent, WorkerMachine
from django_flyworkers.testing import EMULATOR_TOKEN, processes, wait_for
from tests.testapp import jobs

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(240)]


@pytest.fixture
def fly(fly_emulator: Any, redis_flush: Any, settings: Any) -> EmulatorControl:
    return EmulatorControl(fly_emulator.url, EMULATOR_TOKEN)


def machines_by_queue(fly: EmulatorControl) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for machine_id, info in fly.stats()["machines"].items():
        queue = (info.get("config") or {}).get("metadata", {}).get("flyworkers_queue", "")
        out.setdefault(queue, []).append({"id": machine_id, **info})
    return out


def all_stopped(fly: EmulatorControl) -> bool:
    return all(info["state"] == "stopped" for info in fly.stats()["machines"].values())


@pytest.mark.slow(6)
def test_two_queues_sixty_jobs_within_caps(fly: EmulatorControl) -> None:
    from django_flyworkers.signals import machine_created

    created: list[tuple[str, str]] = []

    def on_created(sender: Any, queue: str, machine_id: str, **kwargs: Any) -> None:
        assert sender == queue  # the queue name: receivers can connect for one queue
        created.append((sender, machine_id))

    machine_created.connect(on_created, weak=False)
    try:
        _sixty_jobs(fly, created)
    finally:
        machine_created.disconnect(on_created)


def _sixty_jobs(fly: EmulatorControl, created: list[tuple[str, str]]) -> None:
    enqueued = [jobs.add.delay(i, i) for i in range(30)]
    enqueued += [jobs.slow_add.delay(i, 1) for i in range(30)]
    ids = [job.id for job in enqueued]

    wait_for(
        lambda: FlyJob.objects.filter(job_id__in=ids, status="finished").count() == 60,
        what="all 60 jobs finished",
    )
    wait_for(lambda: all_stopped(fly), what="all Machines stopped")

    by_queue = machines_by_queue(fly)
    assert 1 <= len(by_queue["default"]) <= 2
    assert 1 <= len(by_queue["images"]) <= 3
    rows = FlyJob.objects.filter(job_id__in=ids)
    assert all(row.machine is not None for row in rows)
    machine_ids = {m["id"] for queue in by_queue.values() for m in queue}
    assert {row.machine.machine_id for row in rows if row.machine} <= machine_ids
    assert all(row.attempts == 1 for row in rows)
    assert [job.return_value() for job in enqueued[:3]] == [0, 2, 4]
    actions = Counter(ScaleEvent.objects.filter(outcome="ok").values_list("action", flat=True))
    assert actions["create"] == len(machine_ids)
    assert sorted(m for _, m in created) == sorted(machine_ids)  # machine_created signals
    wait_for(
        lambda: WorkerMachine.objects.filter(run_seconds__gt=0).count() == len(machine_ids),
        what="run seconds recorded for every Machine",
    )

    # A second burst starts the stopped Machines again before it creates any. It may create
    # one more only where the first burst ended before it reached the queue's cap.
    before = {m["id"] for m in by_queue["default"]}
    again = [jobs.add.delay(i, 100) for i in range(20)]
    wait_for(
        lambda: (
            FlyJob.objects.filter(job_id__in=[j.id for j in again], status="finished").count() == 20
        ),
        what="second burst finished",
    )
    wait_for(lambda: all_stopped(fly), what="all Machines stopped again")
    after = {m["id"] for m in machines_by_queue(fly)["default"]}
    assert before <= after and len(after) <= 2
    creates = ScaleEvent.objects.filter(action="create")
    assert creates.count() == len(machine_ids) + len(after - before)
    restarted = ScaleEvent.objects.filter(action="start", outcome="ok", machine_id__in=before)
    assert restarted.exists()
    if after - before:
        assert set(restarted.values_list("machine_id", flat=True)) == before
    assert set(machines_by_queue(fly)) == {"default", "images"}


def test_rollback_starts_nothing_commit_runs(fly: EmulatorControl) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        jobs.add.delay(1, 2)
        raise RuntimeError("rollback")
    assert fly.stats()["machines"] == {}
    assert not FlyJob.objects.exists()

    with transaction.atomic():
        job = jobs.add.delay(20, 22)
        assert fly.stats()["machines"] == {}
    wait_for(lambda: FlyJob.objects.filter(job_id=job.id, status="finished").exists())
    assert job.return_value() == 42


def test_api_failures_never_reach_the_caller(
    fly: EmulatorControl, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each wake gives up after the client's own retries (API_RETRY_SECONDS), and the waker
    # backs off (1 s doubling to 60 s): both at a test-sized scale, same logic, less wait.
    settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": "thread", "API_RETRY_SECONDS": 0.5}
    from django_flyworkers.scaling import background
    from django_flyworkers.scaling.background import waker

    monkeypatch.setattr(background, "RETRY_MIN", 0.1)
    monkeypatch.setattr(background, "RETRY_MAX", 0.4)

    fly.fault("list", status=500, count=1000, message="internal: the API is down")
    enqueued = [jobs.add.delay(i, 1) for i in range(5)]  # returns normally
    wait_for(
        lambda: ScaleEvent.objects.filter(action="list", outcome="error").count() >= 2,
        what="failed wake-ups recorded and retried",
    )
    assert fly.stats()["machines"] == {}
    # (retries this fast also meet Fly's list rate limit: some errors are 429s)
    details = ScaleEvent.objects.filter(outcome="error").values_list("detail", flat=True)
    assert any("the API is down" in detail for detail in details)

    fly.clear_faults()  # the API recovers: the waker's retry starts a Machine
    ids = [job.id for job in enqueued]
    wait_for(lambda: FlyJob.objects.filter(job_id__in=ids, status="finished").count() == 5)
    assert waker.drain(10)


def test_rate_limited_create_is_absorbed(fly: EmulatorControl) -> None:
    fly.fault("create", status=429, count=3)
    job = jobs.add.delay(1, 1)
    wait_for(lambda: FlyJob.objects.filter(job_id=job.id, status="finished").exists())
    assert ScaleEvent.objects.filter(action="create", outcome="ok").count() == 1


@pytest.mark.slow(6)
def test_six_processes_enqueueing_at_once_stay_within_max(fly: EmulatorControl) -> None:
    import subprocess
    import sys
    from pathlib import Path

    import django_rq

    script = Path(__file__).parent / "scripts" / "enqueue.py"
    barrier = "flyworkers:test:barrier"
    procs = [
        processes.ForkedPopen(
            [sys.executable, str(script), "default", "8", barrier],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    conn = django_rq.get_connection("default")
    wait_for(lambda: conn.llen(f"{barrier}:ready") == 6, what="6 producers ready")
    conn.rpush(barrier, *["go"] * 6)  # open the barrier for all six at once
    ids = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        ids += out.split()
    assert len(ids) == 48

    wait_for(lambda: FlyJob.objects.filter(job_id__in=ids, status="finished").count() == 48)
    wait_for(lambda: all_stopped(fly), what="all Machines stopped")
    machines = machines_by_queue(fly)["default"]
    assert 1 <= len(machines) <= 2  # MAX_MACHINES of "default"
    assert fly.stats()["calls"].get("create", 0) <= 2


def test_killed_machine_leaves_no_work_horse_behind(fly: EmulatorControl, tmp_path: Any) -> None:
    from django_flyworkers.emulator.runner import group_members

    job = jobs.sleep_then_write.delay(str(tmp_path / "never"), 60)
    machine_id = machine_of(job.id)
    pid = fly.stats()["machines"][machine_id]["pid"]
    assert len(group_members([pid])) >= 2  # the worker and its forked work-horse
    fly.kill(machine_id)
    wait_for(lambda: fly.stats()["machines"][machine_id]["state"] == "stopped")
    wait_for(lambda: group_members([pid]) == [], what="no process of the Machine left")
    assert not (tmp_path / "never").exists()


def machine_of(job_id: str) -> str:
    """The Machine running ``job_id``, once the worker has written the job's start (its books
    are written within ``worker.FLUSH_EVERY`` while the job runs)."""
    return str(
        wait_for(
            lambda: (
                FlyJob.objects.filter(job_id=job_id, status="started")
                .values_list("machine__machine_id", flat=True)
                .first()
            ),
            what=f"job {job_id} started on a Machine",
        )
    )


def test_sigterm_is_a_warm_shutdown(fly: EmulatorControl, tmp_path: Any) -> None:
    from django_flyworkers import get_client

    marker = tmp_path / "warm"
    job = jobs.sleep_then_write.delay(str(marker), 2)
    machine_id = machine_of(job.id)
    get_client().stop(machine_id, signal="SIGTERM", timeout=30)  # Fly's kill_signal
    wait_for(lambda: fly.stats()["machines"][machine_id]["state"] == "stopped")
    assert marker.read_text() == "done"  # the running job was allowed to finish
    assert FlyJob.objects.get(job_id=job.id).status == "finished"
    assert fly.stats()["machines"][machine_id]["exit_codes"][-1] == 0


def test_second_signal_is_a_cold_shutdown(
    fly: EmulatorControl, fly_emulator: Any, tmp_path: Any
) -> None:
    import httpx

    marker = tmp_path / "cold"
    job = jobs.sleep_then_write.delay(str(marker), 30)
    machine_id = machine_of(job.id)
    signal_url = f"{fly_emulator.url}/v1/apps/flyworkers-tests/machines/{machine_id}/signal"
    headers = {"Authorization": f"Bearer {EMULATOR_TOKEN}"}
    began = time.monotonic()
    for _ in range(2):
        httpx.post(signal_url, json={"signal": "SIGTERM"}, headers=headers).raise_for_status()
        time.sleep(1.2)  # rq ignores a second signal within 1 s (duplicate delivery)
    wait_for(lambda: fly.stats()["machines"][machine_id]["state"] == "stopped", timeout=20)
    assert time.monotonic() - began < 20
    assert not marker.exists()


def test_token_never_reaches_logs_events_or_reprs(
    fly: EmulatorControl, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from django_flyworkers import get_client
    from django_flyworkers.conf import get_settings

    caplog.set_level(logging.DEBUG)
    # A server that echoes the token back in its error must not leak it either.
    fly.fault("list", status=500, count=1000, message=f"internal: bad token {EMULATOR_TOKEN}")
    jobs.add.delay(1, 1)
    event = ScaleEvent.objects.get(action="list", outcome="error")
    texts = [event.detail, event.reason, caplog.text, repr(get_settings()), repr(get_client())]
    assert all(EMULATOR_TOKEN not in text for text in texts)
    assert "bad token" in event.detail
