"""flyworkers_scale and flyworkers_reap on real parts: redis-server, the emulator, workers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import django_rq
import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone
from rq import Queue, Worker

from django_flyworkers import get_client
from django_flyworkers.emulator import EmulatorControl
from django_flyworkers.models import FlyJob, ScaleEvent, WorkerMachine
from django_flyworkers.scaling.spec import META_KEY, POOL_KEY
from django_flyworkers.testing import EMULATOR_TOKEN, free_port, processes
from tests.test_e2e import all_stopped, machine_of, machines_by_queue, wait_for
from tests.testapp import jobs

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(240)]

MANAGE = Path(__file__).parent / "manage.py"


@pytest.fixture
def fly(fly_emulator: Any, redis_flush: Any) -> EmulatorControl:
    return EmulatorControl(fly_emulator.url, EMULATOR_TOKEN)


@contextlib.contextmanager
def override_wake_off() -> Iterator[None]:
    from django.test import override_settings

    with override_settings(FLYWORKERS={**settings.FLYWORKERS, "WAKE_MODE": "off"}):
        yield


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def api_calls(fly: EmulatorControl) -> int:
    return sum(fly.stats()["calls"].values())


def machine_states(fly: EmulatorControl, queue: str) -> list[str]:
    """States of the queue's Machines that still exist."""
    machines = machines_by_queue(fly).get(queue, [])
    return sorted(m["state"] for m in machines if m["state"] != "destroyed")


# -- flyworkers_reap: jobs of dead Machines -----------------------------------------------------


@pytest.mark.parametrize("retries", [1, 0])
def test_killed_machine_job_is_recovered_at_once(
    fly: EmulatorControl, tmp_path: Path, retries: int
) -> None:
    job = jobs.slow_first_time.using(retry=retries).delay(str(tmp_path / "marker"), 120)
    wait_for(lambda: (tmp_path / "marker").exists())  # the job itself is running
    machine_id = machine_of(job.id)
    killed_at = time.monotonic()
    fly.kill(machine_id)  # the VM dies mid-job: no warm shutdown, no rq bookkeeping
    wait_for(lambda: fly.stats()["machines"][machine_id]["state"] == "stopped")

    output = run("flyworkers_reap", "other")
    assert f"Machine {machine_id} was stopped while the job ran" in output
    row = FlyJob.objects.get(job_id=job.id)
    if retries:
        assert "requeued job" in output
        wait_for(lambda: FlyJob.objects.filter(job_id=job.id, status="finished").exists())
        row = FlyJob.objects.get(job_id=job.id)
        assert row.attempts == 2
        assert WorkerMachine.objects.get(machine_id=machine_id).boots == 2  # a new boot ran it
        assert job.return_value() == "second run"
    else:
        assert "failed job" in output
        assert row.status == "failed"
        assert machine_id in row.error
        assert job.get_status() == "failed"
    assert time.monotonic() - killed_at < 60  # rq alone would wait ~90 s for a live worker


def test_job_dequeued_by_a_machine_that_died_before_starting_it(fly: EmulatorControl) -> None:
    """The window between rq's dequeue and the job's start: rq's own cleanup never sees it."""
    from django_flyworkers import ledger

    client = get_client()
    dead = client.create(
        {
            "image": "img",
            "init": {"cmd": ["python", "-c", "pass"]},
            "metadata": {META_KEY: "other"},
        },
        skip_launch=True,
    )
    ledger.record_machine_seen(dead.id, queue="other", state="started")
    queue = django_rq.get_queue("other")
    conn = queue.connection
    with override_wake_off():
        job = jobs.add.using(queue="other").delay(3, 4)
    # What a worker on that Machine did before it died: move the job to the intermediate list
    # and mark it started in the ledger. The job itself never began.
    conn.lmove(queue.key, queue.intermediate_queue_key, "LEFT", "RIGHT")
    ledger.record_started(job, "other", dead.id, f"{dead.id}-0badc0de")

    output = run("flyworkers_reap", "other")
    assert f"requeued job {job.id}: Machine {dead.id} was created while the job ran" in output
    wait_for(lambda: FlyJob.objects.filter(job_id=job.id, status="finished").exists())
    assert job.return_value() == 7
    assert conn.llen(queue.intermediate_queue_key) == 0


def test_reap_leaves_a_live_worker_off_fly_alone(fly: EmulatorControl) -> None:
    """A worker whose host name merely looks like "<id>-<8 hex>" is not a dead Machine."""
    queue = django_rq.get_queue("other")
    conn = queue.connection
    job = queue.create_job(jobs.add, args=(1, 1), status="started")
    job.worker_name = "3f2a9b1c4d5e-1a2b3c4d"  # a Docker-style host name, and alive
    job.save()
    conn.zadd(queue.started_job_registry.key, {f"{job.id}:exec1": time.time() + 100})
    conn.hset(f"{Worker.redis_worker_namespace_prefix}{job.worker_name}", "state", "busy")
    output = run("flyworkers_reap", "other")
    assert "nothing to do" in output
    assert job.get_status() == "started"


def test_reap_syncs_adopts_tidies_and_is_idempotent(fly: EmulatorControl) -> None:
    client = get_client()
    sleeper = {"init": {"cmd": ["python", "-c", "import time; time.sleep(600)"]}}

    def config(**extra: Any) -> dict[str, Any]:
        return {"image": "img:v1", **sleeper, "metadata": {META_KEY: "other"}, **extra}

    stuck = client.create(config(), name="stuck-started")  # started, but no worker ever announces
    created = client.create(config(), name="stuck-created", skip_launch=True)
    pool = client.create(
        config(metadata={META_KEY: "other", POOL_KEY: "true"}), name="pool", skip_launch=True
    )
    client.wait(stuck.id, "started", timeout=30)

    dry = run("flyworkers_reap", "other", "--dry-run", "--stuck-after", "0")
    assert "would stop" in dry and not WorkerMachine.objects.exists()

    output = run("flyworkers_reap", "other", "--stuck-after", "0")
    assert f"{stuck.id}: adopted" in output and f"{pool.id}: adopted" in output
    assert f"stop      {stuck.id}" in output
    assert f"destroy   {created.id}" in output  # sat in created, not created stopped on purpose
    # other's MAX_MACHINES is 1 and the stuck Machine counts: the idle pool Machine is surplus.
    assert f"destroy   {pool.id}" in output
    wait_for(lambda: machine_states(fly, "other") == ["stopped"])

    assert run("flyworkers_reap", "other", "--stuck-after", "0").splitlines()[:2] == [
        "other:",
        "  nothing to do",
    ]
    rows = dict(WorkerMachine.objects.values_list("machine_id", "state"))
    assert rows == {stuck.id: "stopped", created.id: "destroyed", pool.id: "destroyed"}


def test_reap_that_cannot_list_machines_says_so_and_records_it(fly: EmulatorControl) -> None:
    from django_flyworkers import reaper

    fly.fault("list", status=403, count=10, message="not yours")  # not retried
    dry = reaper.reap(["other", "images"], dry_run=True)
    assert [e.startswith("list Machines: ") and "not yours" in e for e in dry.errors] == [True]
    assert not ScaleEvent.objects.exists()  # a dry run records nothing
    report = reaper.reap(["other", "images"])
    assert [e.split(" (")[0] for e in report.errors] == [e.split(" (")[0] for e in dry.errors]
    events = ScaleEvent.objects.order_by("queue").values_list(
        "queue", "action", "outcome", "reason"
    )
    assert list(events) == [
        ("images", "list", "error", "flyworkers_reap"),
        ("other", "list", "error", "flyworkers_reap"),
    ]


def test_reap_prunes_only_old_finished_history(fly: EmulatorControl, settings: Any) -> None:
    settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": "off"}
    old = timezone.now() - timedelta(days=30)
    for job_id, status in [("old-done", "finished"), ("old-waiting", "queued"), ("new", "failed")]:
        FlyJob.objects.create(job_id=job_id, queue="other", status=status)
    FlyJob.objects.filter(job_id__startswith="old").update(updated_at=old)
    ScaleEvent.objects.create(queue="other", action="start")
    ScaleEvent.objects.update(created_at=old)
    output = run("flyworkers_reap", "other", "--prune-after", "7", "--json")
    assert json.loads(output)["pruned_jobs"] == 1
    assert set(FlyJob.objects.values_list("job_id", flat=True)) == {"old-waiting", "new"}
    assert not ScaleEvent.objects.filter(created_at__lt=timezone.now() - timedelta(days=7))


# -- flyworkers_scale ---------------------------------------------------------------------------


@pytest.mark.slow(6)
def test_scheduled_job_runs_within_one_watch_interval(fly: EmulatorControl) -> None:
    job = jobs.add.using(queue="other").enqueue_in(timedelta(seconds=5), 2, 3)
    due = FlyJob.objects.get(job_id=job.id).scheduled_for
    assert due is not None
    watcher = processes.ForkedPopen(
        [sys.executable, str(MANAGE), "flyworkers_scale", "other", "--watch", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: FlyJob.objects.filter(job_id=job.id, status="finished").exists(), 60)
    finally:
        watcher.terminate()
        output, _ = watcher.communicate(timeout=15)
    assert watcher.returncode == 0, output
    assert "reconciling other every 1s" in output and "stopped" in output
    wake = ScaleEvent.objects.filter(queue="other", outcome="ok", action__in=["create", "start"])
    first = wake.order_by("created_at").first()
    assert first is not None and "flyworkers_scale --watch" in first.reason
    # One interval, plus rq's whole-second scheduled times and the pass itself, which takes a
    # while when the suite's other processes keep both cores busy.
    assert (first.created_at - due).total_seconds() <= 3.0
    assert job.return_value() == 5


def test_job_pushed_through_plain_rq_is_picked_up(fly: EmulatorControl) -> None:
    plain = Queue("default", connection=django_rq.get_connection("default"))
    job = plain.enqueue(jobs.add, 20, 22)  # no FlyQueue: nothing woke a Machine
    assert fly.stats()["machines"] == {}
    output = run("flyworkers_scale", "default")
    assert "queued 1" in output and "create" in output
    wait_for(lambda: job.get_status() == "finished")
    assert job.return_value() == 42
    # No signal made a row at enqueue; the worker created it when it took the job.
    wait_for(lambda: FlyJob.objects.filter(job_id=job.id, status="finished").exists())


def test_count_sizes_the_pool_and_never_destroys_a_running_machine(
    fly: EmulatorControl, tmp_path: Path
) -> None:
    run("flyworkers_scale", "images", "--count", "3")
    assert machine_states(fly, "images") == ["created"] * 3
    run("flyworkers_scale", "images", "--count", "1")
    wait_for(lambda: machine_states(fly, "images") == ["created"])

    # A running Machine counts towards N but is never destroyed.
    run("flyworkers_scale", "images", "--count", "2")
    job = jobs.slow_add.delay(1, 1, seconds=30)
    busy = machine_of(job.id)
    output = run("flyworkers_scale", "images", "--count", "0")
    assert busy not in output.split("applied:")[-1]
    wait_for(lambda: machine_states(fly, "images") == ["started"])
    assert fly.stats()["machines"][busy]["state"] == "started"


def test_image_change_updates_a_stopped_machine_before_start(
    fly: EmulatorControl, settings: Any
) -> None:
    first = jobs.add.using(queue="other").delay(1, 1)
    wait_for(lambda: first.get_status() == "finished")
    wait_for(lambda: all_stopped(fly))
    (machine_id,) = fly.stats()["machines"]
    settings.FLYWORKERS = {**settings.FLYWORKERS, "IMAGE": "registry.fly.io/flyworkers-tests:v2"}

    second = jobs.add.using(queue="other").delay(2, 2)
    wait_for(lambda: second.get_status() == "finished")
    info = fly.stats()["machines"][machine_id]
    assert info["config"]["image"] == "registry.fly.io/flyworkers-tests:v2"
    actions = list(
        ScaleEvent.objects.filter(machine_id=machine_id)
        .order_by("id")
        .values_list("action", flat=True)
    )
    assert actions[-2:] == ["update", "start"]
    assert len(fly.stats()["machines"]) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["flyworkers_scale", "nope"], "unknown queue 'nope'"),
        (["flyworkers_scale", "images", "--count", "-1"], "--count: must be at least 0"),
        (["flyworkers_scale", "images", "--count", "4"], "above MAX_MACHINES (3)"),
        (["flyworkers_scale", "images", "--count", "two"], "--count: must be a whole number"),
        (["flyworkers_scale", "images", "--count", "1.5"], "--count: must be a whole number"),
        (["flyworkers_scale", "--count", "1"], "--count needs the QUEUE"),
        (["flyworkers_scale", "--watch", "soon"], "--watch: must be a number"),
        (["flyworkers_scale", "--watch", "0"], "--watch: must be more than 0"),
        (["flyworkers_scale", "--watch", "inf"], "--watch: must be a finite number"),
        (["flyworkers_scale", "--watch", "nan"], "--watch: must be a finite number"),
        (["flyworkers_scale", "--watch", "1e308"], "--watch: must be at most 31536000"),
        (["flyworkers_scale", "--watch", "1", "--reap-every", "-1"], "--reap-every: must be at"),
        (["flyworkers_reap", "nope"], "unknown queue 'nope'"),
        (["flyworkers_reap", "--stuck-after", "x"], "--stuck-after: must be a number"),
        (["flyworkers_reap", "--stuck-after", "1e308"], "--stuck-after: must be at most"),
        (["flyworkers_reap", "--prune-after", "-2"], "--prune-after: must be at least 0"),
        (["flyworkers_reap", "--prune-after", "1e308"], "--prune-after: must be at most 36500"),
        (["flyworkers_reap", "--prune-after", "inf"], "--prune-after: must be a finite number"),
        (["flyworkers_emulator", "--port", "70000"], "--port: must be at most 65535"),
        (["flyworkers_emulator", "--boot-delay", "-1"], "--boot-delay: must be at least 0"),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(
    fly: EmulatorControl, args: list[str], message: str
) -> None:
    before = api_calls(fly)
    with pytest.raises(CommandError, match=re.escape(message)) as info:
        call_command(*args)
    assert "\n" not in str(info.value)
    assert api_calls(fly) == before
    assert not ScaleEvent.objects.exists()


def test_bad_input_from_the_command_line_exits_non_zero() -> None:
    proc = processes.run(
        [sys.executable, str(MANAGE), "flyworkers_scale", "images", "--count", "9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "CommandError: --count 9 is above MAX_MACHINES (3) of queue 'images'."
    ]


@pytest.mark.parametrize(
    "args",
    [
        ["flyworkers_scale"],
        ["flyworkers_scale", "images", "--count", "1"],
        ["flyworkers_reap", "default"],
    ],
    ids=["scale", "scale --count", "reap"],
)
def test_redis_down_is_one_line(fly: EmulatorControl, settings: Any, args: list[str]) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings.RQ_QUEUES = {name: {"URL": dead} for name in settings.RQ_QUEUES}
    with pytest.raises(CommandError, match=r"^cannot reach Redis: .*127\.0\.0\.1") as info:
        call_command(*args)
    assert "\n" not in str(info.value)


def test_redis_down_from_the_command_line_is_one_line_not_a_traceback() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    for command in ("flyworkers_scale", "flyworkers_reap"):
        proc = processes.run(
            [sys.executable, str(MANAGE), command, "default"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "FLYWORKERS_TEST_REDIS_URL": dead},
        )
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("CommandError: cannot reach Redis"), lines


def test_bad_number_from_the_command_line_is_an_argparse_error_not_a_traceback() -> None:
    proc = processes.run(
        [sys.executable, str(MANAGE), "flyworkers_scale", "--watch", "inf"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith("error: argument --watch: must be a finite number, got inf")
    )


@pytest.mark.parametrize(("verbosity", "debug_lines"), [(0, False), (1, False), (2, True)])
def test_verbosity_sets_the_library_log_level(
    fly: EmulatorControl, caplog: pytest.LogCaptureFixture, verbosity: int, debug_lines: bool
) -> None:
    import logging

    library = logging.getLogger("django_flyworkers")
    before = library.level
    Queue("default", connection=django_rq.get_connection("default")).enqueue(jobs.add, 1, 1)
    run("flyworkers_scale", "default", "--dry-run", f"--verbosity={verbosity}")
    requests = [r for r in caplog.records if r.getMessage().startswith("request method=")]
    assert bool(requests) == debug_lines
    assert library.level == before  # the command leaves the project's logging as it was


def test_emulator_command_needs_no_app_name_or_image(tmp_path: Path) -> None:
    # tests/settings.py reads these variables; empty means "not set" to FLYWORKERS.
    env = {**os.environ, "FLY_APP_NAME": "", "FLY_IMAGE_REF": ""}

    def manage(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, str(MANAGE), *args]
        return processes.run(command, capture_output=True, text=True, timeout=60, env=env)

    check = manage("check")
    assert check.returncode == 1
    assert "flyworkers.E003" in check.stderr and "flyworkers.E004" in check.stderr
    missing = tmp_path / "missing"
    emulator = manage("flyworkers_emulator", "--workdir", str(missing))
    # The system checks did not stop it: it got as far as its own argument checks.
    assert emulator.returncode == 1
    assert emulator.stderr.strip().splitlines() == [
        f"CommandError: --workdir {missing} is not a directory."
    ]


def test_emulator_command_names_a_bad_token_without_showing_it(settings: Any) -> None:
    settings.FLYWORKERS = {**settings.FLYWORKERS, "API_TOKEN": "secret-token-value\n"}
    with pytest.raises(CommandError, match=r"API_TOKEN'\] contains whitespace") as info:
        call_command("flyworkers_emulator")
    assert "secret-token-value" not in str(info.value)


def test_verbosity_levels() -> None:
    import logging

    from django_flyworkers.management.commands._common import verbosity_logging

    library = logging.getLogger("django_flyworkers.scaling")
    enabled = {}
    for verbosity in (0, 1, 2, 3):
        with verbosity_logging(verbosity):
            enabled[verbosity] = [
                library.isEnabledFor(level) for level in (logging.DEBUG, logging.INFO)
            ]
    assert enabled == {0: [False, False], 1: [False, True], 2: [True, True], 3: [True, True]}


def test_scale_json_and_dry_run(fly: EmulatorControl) -> None:
    Queue("default", connection=django_rq.get_connection("default")).enqueue(jobs.add, 1, 1)
    data = json.loads(run("flyworkers_scale", "default", "--dry-run", "--json"))
    assert data[0]["queued"] == 1 and data[0]["planned"] == ["create 1"]
    assert data[0]["applied"] == [] and fly.stats()["machines"] == {}


def _concurrently(*calls: Any) -> None:
    import threading

    from django.db import connections

    barrier = threading.Barrier(len(calls))
    errors: list[BaseException] = []

    def run_one(call: Any) -> None:
        try:
            barrier.wait()
            call()
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run_one, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []


def test_reconcile_racing_wakes_never_exceeds_max_machines(fly: EmulatorControl) -> None:
    from django_flyworkers.scaling import scaler

    plain = Queue("default", connection=django_rq.get_connection("default"))
    for i in range(30):
        plain.enqueue(jobs.add, i, i)  # a backlog nobody has woken for yet
    _concurrently(
        lambda: scaler.reconcile("default", reason="test"),
        lambda: scaler.reconcile("default", reason="test"),
        lambda: scaler.wake("default"),
        lambda: scaler.wake("default"),
    )
    assert len(machines_by_queue(fly)["default"]) == 2  # MAX_MACHINES of "default"


def test_global_cap_holds_across_queues(fly: EmulatorControl, settings: Any) -> None:
    from django_flyworkers.scaling import scaler

    settings.FLYWORKERS = {**settings.FLYWORKERS, "GLOBAL_MAX_MACHINES": 1}
    for name in ("default", "images"):
        Queue(name, connection=django_rq.get_connection(name)).enqueue(jobs.add, 1, 1)
    _concurrently(lambda: scaler.wake("default"), lambda: scaler.wake("images"))
    assert sum(len(ms) for ms in machines_by_queue(fly).values()) == 1


def test_watch_also_recovers_jobs_of_dead_machines(fly: EmulatorControl, tmp_path: Path) -> None:
    job = jobs.slow_first_time.using(retry=1).delay(str(tmp_path / "marker"), 120)
    wait_for(lambda: (tmp_path / "marker").exists())
    fly.kill(machine_of(job.id))
    watcher = processes.ForkedPopen(
        [sys.executable, str(MANAGE), "flyworkers_scale", "other", "--watch", "0.5",
         "--reap-every", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: FlyJob.objects.filter(job_id=job.id, status="finished").exists(), 60)
    finally:
        watcher.terminate()
        output, _ = watcher.communicate(timeout=15)
    assert "requeued job" in output, output
    assert job.return_value() == "second run"
