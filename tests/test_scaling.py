"""The scaler on real parts: actions, boot crashes, list reuse, idle watch, locks, caps, keys."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import django_rq
import pytest
import redis
from django.utils import timezone
from rq import Queue

from django_flyworkers import get_client, presence
from django_flyworkers.emulator import EmulatorControl
from django_flyworkers.models import FlyJob, ScaleEvent, WorkerMachine
from django_flyworkers.queue import FlyQueue
from django_flyworkers.scaling import actions, fleet, locks, scaler, spec
from django_flyworkers.signals import machine_created, machine_stopped
from django_flyworkers.testing import EMULATOR_TOKEN, processes, wait_for
from tests.testapp import jobs

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(240)]

MANAGE = Path(__file__).parent / "manage.py"
SCRIPTS = Path(__file__).parent / "scripts"


@pytest.fixture
def fly(fly_emulator: Any, redis_flush: Any) -> EmulatorControl:
    return EmulatorControl(fly_emulator.url, EMULATOR_TOKEN)


def sleeper(queue: str = "other") -> dict[str, Any]:
    return {
        "image": "img",
        "init": {"cmd": ["python", "-c", "import time; time.sleep(600)"]},
        "metadata": {spec.META_KEY: queue},
    }


def list_calls(fly: EmulatorControl) -> int:
    return int(fly.stats()["calls"].get("list", 0))


# -- actions ------------------------------------------------------------------------------------


def test_actions_call_once_record_once_and_never_raise(fly: EmulatorControl) -> None:
    client = get_client()
    created = actions.create(client, "other", sleeper(), reason="test", user="alice")
    assert created and created.machine is not None and created.machine_id == created.machine.id
    stopped = actions.stop(client, "other", created.machine_id, reason="test", user="alice")
    assert stopped.ok and bool(stopped)
    missing = actions.start(client, "other", "0000deadbeef00", reason="test", user="alice")
    assert not missing and "not found" in missing.detail.lower()

    events = list(ScaleEvent.objects.order_by("id").values_list("action", "outcome", "user"))
    assert events == [
        ("create", "ok", "alice"),
        ("stop", "ok", "alice"),
        ("start", "error", "alice"),
    ]
    assert ScaleEvent.objects.get(action="start").machine_id == "0000deadbeef00"
    assert fly.stats()["calls"] == {"create": 1, "stop": 1, "start": 1}


# -- no stall after a Machine dies while booting ------------------------------------------------


def _kill_before_announcing(fly: EmulatorControl, server: Any) -> str:
    """Enqueue one job on "other"; kill its new Machine's process before the worker announces.

    The process is frozen (SIGSTOP) as soon as it is launched: a Machine forked from the
    emulator's zygote boots, runs the job and leaves in less time than a kill takes to ask.
    """
    runner = server.emulator.runner
    launch = runner.launch

    def launch_frozen(machine_id: str, run_id: int, *args: Any) -> None:
        launch(machine_id, run_id, *args)
        pid = runner.pid(run_id)
        if pid is not None:
            os.kill(pid, signal.SIGSTOP)

    conn = django_rq.get_connection("other")
    runner.launch = launch_frozen
    try:
        jobs.sleep_then_write.delay("/dev/null", 0)  # WAKE_MODE "sync": created now
    finally:
        del runner.launch  # the class's own again, for the restart
    (machine_id,) = fly.stats()["machines"]
    fly.kill(machine_id)
    assert conn.zscore(presence.active_key("other"), machine_id) is None, "announced too early"
    assert conn.zscore(presence.booting_key("other"), machine_id) is not None
    wait_for(lambda: fly.stats()["machines"][machine_id]["state"] == "stopped", 30, "stopped")
    return machine_id


def test_a_machine_killed_while_booting_stops_counting_at_the_next_list(
    fly: EmulatorControl, fly_emulator: Any
) -> None:
    heard: list[tuple[Any, str, int | None]] = []

    def on_stopped(sender: Any, machine_id: str, exit_code: int | None, **kwargs: Any) -> None:
        heard.append((sender, machine_id, exit_code))

    machine_stopped.connect(on_stopped, weak=False)
    try:
        machine_id = _kill_before_announcing(fly, fly_emulator)
        # Redis alone still counts it as booting, so an enqueue's cheap check is satisfied...
        assert scaler.wake("other") is None
        # ...but the first pass that lists sees it stopped and starts it again. (Within a
        # second this process would reuse its list from before the crash: drop it.)
        fleet.forget()
        result = scaler.reconcile("other", reason="test")
    finally:
        machine_stopped.disconnect(on_stopped)
    assert result.actions == [f"start {machine_id}"]
    assert heard == [("other", machine_id, 137)]
    assert WorkerMachine.objects.get(machine_id=machine_id).last_exit_code == 137
    wait_for(lambda: FlyJob.objects.filter(queue="other", status="finished").exists())


def test_watch_restarts_a_machine_killed_while_booting_within_ten_seconds(
    fly: EmulatorControl, fly_emulator: Any
) -> None:
    machine_id = _kill_before_announcing(fly, fly_emulator)
    killed_at = timezone.now()
    watcher = processes.ForkedPopen(
        [sys.executable, str(MANAGE), "flyworkers_scale", "other", "--watch", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    began = FlyJob.objects.filter(queue="other", started_at__isnull=False)
    try:
        wait_for(began.exists, 60, "the job to start on another start")
    finally:
        watcher.terminate()
        output, _ = watcher.communicate(timeout=15)
    assert f"start {machine_id}" in output, output
    started_at = began.get().started_at
    assert started_at is not None
    waited = (started_at - killed_at).total_seconds()
    assert waited < 10, f"the job waited {waited:.1f}s after the boot crash"


# -- fewer API calls ----------------------------------------------------------------------------


def test_an_idle_watch_asks_the_api_at_most_twice(fly: EmulatorControl) -> None:
    watcher = subprocess.Popen(
        [sys.executable, str(MANAGE), "flyworkers_scale", "--watch", "0.1", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        passes = 0
        assert watcher.stdout is not None
        for line in watcher.stdout:  # one JSON object per queue and pass
            if line.strip() == '"queue": "other",':
                passes += 1
                if passes == 20:
                    break
    finally:
        watcher.terminate()
        watcher.communicate(timeout=15)
    assert passes == 20
    assert list_calls(fly) <= 2
    assert sum(fly.stats()["calls"].values()) == list_calls(fly)


def test_a_watch_with_demand_still_lists(fly: EmulatorControl) -> None:
    fleet.forget()
    scaler.reconcile("other", skip_idle=True)  # no list yet in this process: must ask
    assert list_calls(fly) == 1
    assert not scaler.reconcile("other", skip_idle=True).listed
    Queue("other", connection=django_rq.get_connection("other")).enqueue(jobs.add, 1, 1)
    result = scaler.reconcile("other", skip_idle=True)
    assert result.listed and result.actions and result.actions[0].startswith("create")


def test_a_burst_on_three_queues_lists_at_most_twice_and_meets_no_429(
    fly: EmulatorControl, settings: Any
) -> None:
    from django_flyworkers.scaling.background import waker

    settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": "thread"}
    enqueued = []
    for i in range(5):
        enqueued += [
            jobs.add.delay(i, 1),
            jobs.slow_add.delay(i, 1),
            jobs.sleep_then_write.delay("/dev/null", 0),
        ]
    assert waker.drain(30)
    ids = [job.id for job in enqueued]
    wait_for(lambda: FlyJob.objects.filter(job_id__in=ids, status="finished").count() == 15)
    stats = fly.stats()
    assert stats["rate_limited"] == {}
    assert stats["calls"]["list"] <= 2, stats["calls"]
    assert len(stats["machines"]) == 3  # one per queue: 5 jobs are under JOBS_PER_MACHINE


# -- the global cap -----------------------------------------------------------------------------


def test_a_wake_blocked_by_the_global_cap_is_recorded(fly: EmulatorControl, settings: Any) -> None:
    settings.FLYWORKERS = {**settings.FLYWORKERS, "GLOBAL_MAX_MACHINES": 1, "WAKE_MODE": "off"}
    get_client().create(sleeper("default"))  # one running Machine: the cap is reached
    Queue("images", connection=django_rq.get_connection("images")).enqueue(jobs.add, 1, 1)
    result = scaler.reconcile("images", reason="test")
    assert result.actions == [] and result.plan.capped == 1
    event = ScaleEvent.objects.get(queue="images")
    assert (event.action, event.outcome) == ("capped", "skipped")
    assert "global cap of 1" in event.reason and "GLOBAL_MAX_MACHINES (1)" in event.detail


# -- locks --------------------------------------------------------------------------------------


def test_the_locks_are_renewed_between_api_calls(
    fly: EmulatorControl, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Two creates that take 1 s each under locks that live 1.5 s unless renewed."""
    monkeypatch.setattr(scaler, "lock_ttl", lambda settings: 1.5)
    fly.latency("create", 1.0)
    conn = django_rq.get_connection("default")
    held: list[tuple[bool, bool]] = []

    def on_created(sender: Any, **kwargs: Any) -> None:
        held.append(
            (bool(conn.exists(scaler._lock_key("default"))), bool(conn.exists(scaler.GLOBAL_LOCK)))
        )

    queue = Queue("default", connection=conn)
    for i in range(20):
        queue.enqueue(jobs.add, i, i)  # 2 Machines' worth (JOBS_PER_MACHINE 10)
    machine_created.connect(on_created, weak=False)
    try:
        with caplog.at_level(logging.WARNING, logger="django_flyworkers.scaler"):
            result = scaler.reconcile("default", reason="test")
    finally:
        machine_created.disconnect(on_created)
    assert [a.split()[0] for a in result.actions] == ["create", "create"]
    assert held == [(True, True), (True, True)]
    assert "lock" not in caplog.text
    assert not conn.exists(scaler._lock_key("default"))  # released at the end


def test_lock_ttl_outlasts_one_api_call() -> None:
    from django_flyworkers.conf import get_settings

    settings = get_settings()
    assert locks.lock_ttl(settings) > settings.http_timeout + settings.api_retry_seconds


# -- rq's keys and connections ------------------------------------------------------------------


def test_a_custom_rq_key_prefix_is_served(fly: EmulatorControl) -> None:
    env = {**os.environ, "RQ_KEY_PREFIX": "myapp"}
    proc = processes.run(
        [sys.executable, str(SCRIPTS / "prefixed_queue.py"), "other"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    import rq

    if not hasattr(rq.defaults, "RQ_KEY_PREFIX"):  # rq 2.x has no prefix: the default keys
        assert data["queue_key"] == "rq:queue:other"
    else:
        assert data["queue_key"] == "myapp:queue:other"
    assert data["queued_seen"] == 1  # the scaler read the prefixed queue
    assert data["actions"] == ["create"]
    assert data["booting_seen"] == [m for m in fly.stats()["machines"]]
    assert data["result"] == 5


def test_a_queue_on_another_redis_is_rejected_clearly(
    fly: EmulatorControl, redis_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    elsewhere = redis.Redis.from_url(redis_server.url.rsplit("/", 1)[0] + "/3")
    try:
        queue = FlyQueue("other", connection=elsewhere)
        with caplog.at_level(logging.ERROR, logger="django_flyworkers.scaler"):
            queue.enqueue(jobs.add, 1, 1)
    finally:
        elsewhere.flushdb()
        elsewhere.close()
    assert fly.stats()["machines"] == {}
    event = ScaleEvent.objects.get()
    assert (event.action, event.outcome) == ("wake", "error")
    assert "RQ_QUEUES names" in event.detail and "/3" in event.detail
    assert "pushed on Redis" in caplog.text
