"""Dedicated Machines (MODE "dedicated"): a fresh Machine per job, on real parts.

The "render" queue of tests/settings.py is dedicated with MAX_MACHINES 2. Its Machines run
``manage.py flyworkers_run <job id>`` as real processes of the emulator.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import django_rq
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from django_flyworkers.emulator import EmulatorControl
from django_flyworkers.exceptions import InvalidGuest, NotDedicated
from django_flyworkers.models import FlyJob, ScaleEvent, WorkerMachine
from django_flyworkers.testing import EMULATOR_TOKEN, wait_for
from tests.testapp import dedicated_jobs, jobs

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(240)]

QUEUE = "render"
FLY_BOOT_SECONDS = 1.5
"""A create takes seconds on Fly until the Machine is started; the session emulator boots at
once unless told otherwise."""


@pytest.fixture
def fly(fly_emulator: Any, redis_flush: Any) -> EmulatorControl:
    return EmulatorControl(fly_emulator.url, EMULATOR_TOKEN)


@pytest.fixture
def fly_boots(fly: EmulatorControl, fly_emulator: Any) -> Iterator[EmulatorControl]:
    """The emulator with a boot that takes as long as a create on Fly."""
    fleet = fly_emulator.emulator.fleet
    saved, fleet.boot_delay = fleet.boot_delay, FLY_BOOT_SECONDS
    try:
        yield fly
    finally:
        fleet.boot_delay = saved


def machines(fly: EmulatorControl) -> dict[str, dict[str, Any]]:
    return {
        machine_id: info
        for machine_id, info in fly.stats()["machines"].items()
        if info["config"].get("metadata", {}).get("flyworkers_queue") == QUEUE
    }


def run_intervals(fly_emulator: Any) -> list[tuple[int, int]]:
    """(started, exited) in emulator milliseconds for every run of every Machine, from its
    events: the time each Machine was running its command."""
    intervals = []
    for machine in fly_emulator.emulator.fleet.machines():
        started = None
        for event in machine.events:
            if event.type == "start" and event.status == "started":
                started = event.timestamp
            elif event.type == "exit" and started is not None:
                intervals.append((started, event.timestamp))
                started = None
        if started is not None:
            intervals.append((started, 2**62))  # still running
    return intervals


def most_at_once(intervals: list[tuple[int, int]]) -> int:
    # An exit and a start at the same millisecond: the exit comes first.
    points = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, step in points:
        running += step
        most = max(most, running)
    return most


def finished(ids: list[str]) -> bool:
    return FlyJob.objects.filter(job_id__in=ids, status="finished").count() == len(ids)


def all_destroyed(fly: EmulatorControl) -> bool:
    return all(info["state"] == "destroyed" for info in machines(fly).values())


# -- the cap ----------------------------------------------------------------------------------


@pytest.mark.slow(8)
def test_five_jobs_with_a_cap_of_two_get_five_machines_never_more_than_two_at_once(
    fly_boots: EmulatorControl, fly_emulator: Any
) -> None:
    fly = fly_boots
    sampled: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            states = [info["state"] for info in machines(fly).values()]
            sampled.append(sum(state == "started" for state in states))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        enqueued = [dedicated_jobs.render.delay(0.5) for _ in range(5)]
        ids = [job.id for job in enqueued]
        # Two Machines, created for the first two jobs; the cap holds the other three back.
        assert len(machines(fly)) == 2
        linked = FlyJob.objects.filter(job_id__in=ids, machine__isnull=False)
        assert sorted(linked.values_list("job_id", flat=True)) == sorted(ids[:2])
        wait_for(lambda: finished(ids), what="all 5 dedicated jobs finished")
        wait_for(lambda: all_destroyed(fly), what="every dedicated Machine destroyed")
    finally:
        stop.set()
        sampler.join()

    # Machines running (state "started"), sampled and from the emulator's own events.
    intervals = sorted(run_intervals(fly_emulator))
    assert max(sampled) == 2, (sampled, intervals)
    assert most_at_once(intervals) == 2, intervals
    rows = list(FlyJob.objects.filter(job_id__in=ids).select_related("machine"))
    # Jobs running at once, from the ledger: no timing assumption at all.
    assert most_at_once([(stamp(row.started_at), stamp(row.ended_at)) for row in rows]) == 2
    ran_on = {job.return_value()["machine"] for job in enqueued}
    assert len(ran_on) == 5 and set(machines(fly)) == ran_on  # 5 distinct Machines, one each
    assert {row.job_id: row.machine.machine_id for row in rows if row.machine} == {
        job.id: job.return_value()["machine"] for job in enqueued
    }
    assert all(row.attempts == 1 for row in rows)
    for info in machines(fly).values():
        assert info["config"]["auto_destroy"] is True
        assert info["config"]["restart"] == {"policy": "no"}
        assert info["starts"] == 1 and info["exit_codes"] == [0]
    # Each Machine booted once, for its one job: its billed time is that job's cost.
    assert WorkerMachine.objects.filter(machine_id__in=ran_on, boots=1).count() == 5
    assert ScaleEvent.objects.filter(queue=QUEUE, action="create", outcome="ok").count() == 5


def stamp(moment: datetime | None) -> int:
    assert moment is not None
    return int(moment.timestamp() * 1000)


def test_a_task_sent_to_a_dedicated_queue_gets_a_machine_of_its_own(fly: EmulatorControl) -> None:
    result = dedicated_jobs.render_task.enqueue("frame 1")
    wait_for(lambda: finished([result.id]), what="the task ran")
    result.refresh()
    assert result.status == "SUCCESSFUL"
    assert result.return_value["label"] == "frame 1"
    assert result.worker_ids == [result.return_value["machine"]]
    assert set(machines(fly)) == {result.return_value["machine"]}


# -- per-job guest ----------------------------------------------------------------------------


def test_a_job_gets_the_guest_it_asks_for(fly: EmulatorControl) -> None:
    big = dedicated_jobs.render.using(guest={"cpus": 8, "memory_mb": 16384}).delay()
    plain = dedicated_jobs.render.delay()
    wait_for(lambda: finished([big.id, plain.id]), what="both jobs finished")
    assert big.return_value()["memory_mb"] == 16384
    assert plain.return_value()["memory_mb"] == 512  # the queue's GUEST
    guest = machines(fly)[big.return_value()["machine"]]["config"]["guest"]
    assert guest == {"cpu_kind": "shared", "cpus": 8, "memory_mb": 16384}
    row = WorkerMachine.objects.get(machine_id=big.return_value()["machine"])
    assert row.guest["memory_mb"] == 16384


@pytest.mark.parametrize(
    ("guest", "message"),
    [
        ({"cpus": 3}, "cpus must be one of 1, 2, 4, 6, 8 for cpu_kind 'shared', got 3"),
        ({"cpus": 8, "memory_mb": 32768}, "memory_mb must be between 2048 and 16384"),
        ({"memory_mb": 1000}, "memory_mb must be a multiple of 256"),
        ({"ram": 1024}, "unknown guest key 'ram'"),
        ("big", "the guest must be a dict"),
    ],
)
def test_a_bad_guest_is_refused_at_the_call_and_nothing_is_pushed(
    fly: EmulatorControl, guest: Any, message: str
) -> None:
    with pytest.raises(InvalidGuest, match=message) as error:
        dedicated_jobs.render.using(guest=guest).delay()
    assert "queue 'render'" in str(error.value)
    assert isinstance(error.value, ValueError)
    assert django_rq.get_queue(QUEUE).count == 0
    assert not FlyJob.objects.exists() and machines(fly) == {}


def test_dedicated_jobs_need_a_dedicated_queue(fly: EmulatorControl) -> None:
    with pytest.raises(NotDedicated, match=r"queue 'default' runs in pool mode: set FLYWORKERS"):
        dedicated_jobs.render.using(queue="default").delay()
    with pytest.raises(NotDedicated, match="a per-job guest needs a Machine of its own"):
        jobs.add.using(guest={"cpus": 2}).delay(1, 2)
    assert django_rq.get_queue("default").count == 0
    assert not FlyJob.objects.exists() and fly.stats()["machines"] == {}


# -- failure modes ----------------------------------------------------------------------------


@pytest.mark.parametrize("retries", [1, 0])
def test_a_machine_that_crashes_mid_job_is_retried_on_a_new_one_or_fails_with_the_reason(
    fly: EmulatorControl, tmp_path: Path, retries: int
) -> None:
    marker = tmp_path / "marker"
    job = dedicated_jobs.render_slowly_first_time.using(retry=retries).delay(str(marker), 120)
    wait_for(marker.exists, what="the job running")
    first = FlyJob.objects.get(job_id=job.id).machine.machine_id  # type: ignore[union-attr]
    fly.kill(first)  # the VM dies mid-job
    wait_for(lambda: machines(fly)[first]["state"] == "destroyed", what="auto_destroy")

    out = StringIO()
    call_command("flyworkers_reap", QUEUE, stdout=out)
    assert f"Machine {first} was destroyed while the job ran" in out.getvalue()
    if retries:
        wait_for(lambda: finished([job.id]), what="the retry finished")
        second = job.return_value()["machine"]
        assert second != first and job.return_value()["first"] is False
        row = FlyJob.objects.get(job_id=job.id)
        assert row.attempts == 2 and row.machine.machine_id == second  # type: ignore[union-attr]
        wait_for(lambda: all_destroyed(fly), what="the second Machine destroyed")
    else:
        row = FlyJob.objects.get(job_id=job.id)
        assert row.status == "failed" and first in row.error
        assert job.get_status() == "failed"
        assert set(machines(fly)) == {first}


def test_a_failed_create_leaves_the_job_queued_and_the_wake_path_tries_again(
    fly: EmulatorControl, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The waker's backoff (1 s doubling to 60 s) at a test-sized scale: same logic, less wait.
    from django_flyworkers.scaling import background

    monkeypatch.setattr(background, "RETRY_MIN", 0.1)
    monkeypatch.setattr(background, "RETRY_MAX", 0.4)
    settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": "thread"}
    fly.fault("create", status=422, count=1000, message="unprocessable: no capacity in ord")

    job = dedicated_jobs.render.delay()
    wait_for(
        lambda: ScaleEvent.objects.filter(action="create", outcome="error").count() >= 2,
        what="failed creates recorded and tried again",
    )
    assert "no capacity in ord" in ScaleEvent.objects.filter(outcome="error").first().detail
    assert FlyJob.objects.get(job_id=job.id).status == "queued"
    assert django_rq.get_queue(QUEUE).job_ids == [job.id]
    assert machines(fly) == {}

    fly.clear_faults()
    wait_for(lambda: finished([job.id]), what="the job ran once the API recovered")
    assert ScaleEvent.objects.filter(action="create", outcome="ok").count() == 1


def test_a_job_that_times_out_has_its_machine_stopped_and_destroyed(
    fly: EmulatorControl,
) -> None:
    job = dedicated_jobs.render_too_long.delay(60)
    wait_for(
        lambda: FlyJob.objects.filter(job_id=job.id, status="failed").exists(),
        what="the job failed on its timeout",
    )
    assert "JobTimeoutException" in FlyJob.objects.get(job_id=job.id).error
    wait_for(lambda: all_destroyed(fly), what="its Machine destroyed")
    [info] = machines(fly).values()
    assert info["exit_codes"] == [0] and info["billed_seconds"] < 30


# -- scheduling, the commands -----------------------------------------------------------------


def test_a_scheduled_job_gets_its_machine_when_it_comes_due(fly: EmulatorControl) -> None:
    job = dedicated_jobs.render.enqueue_at(datetime.now(UTC) - timedelta(seconds=1))
    assert machines(fly) == {}  # nothing runs rq's scheduler for a dedicated queue
    out = StringIO()
    call_command("flyworkers_scale", QUEUE, stdout=out)
    print(out.getvalue())
    assert "1 job(s) waiting, 0 of 2 running, create 1" in out.getvalue()
    wait_for(lambda: finished([job.id]), what="the scheduled job ran")
    assert len(machines(fly)) == 1


def test_flyworkers_run_runs_the_named_job_only_and_only_once(
    fly: EmulatorControl, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": "off"}
    first = jobs.add.using(queue="other").delay(1, 2)
    second = jobs.add.using(queue="other").delay(3, 4)
    out = StringIO()
    call_command("flyworkers_run", second.id, stdout=out)
    assert out.getvalue().strip() == f"job {second.id} of queue 'other': finished"
    assert second.return_value() == 7
    assert django_rq.get_queue("other").job_ids == [first.id]  # left alone
    with pytest.raises(CommandError, match=f"job {second.id} of queue 'other' is finished"):
        call_command("flyworkers_run", second.id, stdout=StringIO())
    with pytest.raises(CommandError, match="no job 'nope' in the Redis of any queue"):
        call_command("flyworkers_run", "nope", stdout=StringIO())
    call_command("flyworkers_run", first.id, "--queue", "other", stdout=StringIO())
    assert first.return_value() == 3
    assert django_rq.get_queue("other").job_ids == []
    assert fly.stats()["machines"] == {}  # it ran here, in this process's worker


def test_a_dedicated_queue_has_no_pool_to_size(fly: EmulatorControl) -> None:
    with pytest.raises(CommandError, match="queue 'render' is dedicated"):
        call_command("flyworkers_scale", QUEUE, "--count", "1", stdout=StringIO())
