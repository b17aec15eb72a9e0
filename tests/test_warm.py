"""The warm pool on real parts: workers that suspend their Machine when idle and carry on when
a wake-up resumes them, and the release rule across a deploy.

Real redis-server, the emulator over HTTP (suspend freezes a Machine's processes with
SIGSTOP, start resumes them with SIGCONT), real worker processes.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any

import django_rq
import pytest
from django.core.management import call_command
from redis import Redis
from rq import Worker, worker_registration

from django_flyworkers import presence, release
from django_flyworkers.emulator import EmulatorControl
from django_flyworkers.models import FlyJob, ScaleEvent, WorkerMachine
from django_flyworkers.reaper import reap
from django_flyworkers.scaling import scaler
from django_flyworkers.testing import EMULATOR_TOKEN, wait_for
from tests.procfs import proc_state
from tests.testapp import jobs

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(240)]

QUEUE = "other"  # MAX_MACHINES 1: one Machine, which sleeps and wakes


@pytest.fixture
def fly(fly_emulator: Any, redis_flush: Any) -> EmulatorControl:
    return EmulatorControl(fly_emulator.url, EMULATOR_TOKEN)


def deploy(settings: Any, image: str, **profile: Any) -> None:
    """This process now enqueues as release ``image``, with ``profile`` for QUEUE."""
    queues = {**settings.FLYWORKERS["QUEUES"], QUEUE: {"MAX_MACHINES": 1, **profile}}
    settings.FLYWORKERS = {**settings.FLYWORKERS, "IMAGE": image, "QUEUES": queues}


def new_image() -> str:
    # A fresh ref per test: first-seen times are per ref, and Redis is flushed between tests.
    return f"registry.fly.io/flyworkers-tests:{uuid.uuid4().hex[:8]}"


def machine(fly: EmulatorControl, machine_id: str) -> dict[str, Any]:
    info: dict[str, Any] = fly.stats()["machines"][machine_id]
    return info


def only_machine(fly: EmulatorControl) -> str | None:
    machines = list(fly.stats()["machines"])
    assert len(machines) <= 1
    return machines[0] if machines else None


def first_machine(fly: EmulatorControl) -> str:
    """The queue's Machine once the wake has created it; if none comes, what the wake did."""
    try:
        machine_id: str = wait_for(lambda: only_machine(fly), what="a Machine")
    except TimeoutError as exc:  # seen once (CI, oldest versions): say what the wake did
        events = list(ScaleEvent.objects.values_list("action", "outcome", "reason", "detail"))
        conn = django_rq.get_connection(QUEUE)
        seen = {
            key(QUEUE): conn.zrange(key(QUEUE), 0, -1, withscores=True)
            for key in (presence.active_key, presence.booting_key)
        }
        clients = [
            (client.get("name"), client.get("cmd"), client.get("age"))
            for client in conn.client_list()
        ]
        raise AssertionError(
            f"{exc}; events {events}; API {fly.stats()['calls']}; presence {seen}; "
            f"queued {conn.llen(django_rq.get_queue(QUEUE).key)}; Redis clients {clients}"
        ) from exc
    return machine_id


def state_is(fly: EmulatorControl, machine_id: str, state: str) -> bool:
    return machine(fly, machine_id)["state"] == state


def finished(job_id: str) -> bool:
    return FlyJob.objects.filter(job_id=job_id, status="finished").exists()


def runs(path: Path) -> list[tuple[str, int]]:
    """(image, worker pid) of every ``whoami`` job that wrote to ``path``."""
    if not path.exists():
        return []
    return [
        (image, int(pid))
        for image, pid in (line.split() for line in path.read_text().split("\n") if line)
    ]


def wait_time(job_id: str) -> str:
    """Enqueue to start of a job, as the ledger saw it (printed, never asserted on)."""
    row = FlyJob.objects.get(job_id=job_id)
    assert row.enqueued_at is not None and row.started_at is not None
    return f"{(row.started_at - row.enqueued_at).total_seconds():.3f}s"


def drop_other_clients(conn: Redis) -> list[str]:
    """CLIENT KILL every connection but this one (the frozen worker's among them)."""
    own = str(conn.client_id())
    others = [client["id"] for client in conn.client_list() if str(client["id"]) != own]
    for client_id in others:
        conn.client_kill_filter(_id=client_id)
    return others


@dataclass(frozen=True)
class Asleep:
    """A suspend worker's Machine after its first job: asleep, its worker frozen."""

    out: Path  # where ``whoami`` jobs write (image, worker pid)
    machine_id: str
    worker_name: str  # rq's name for the frozen worker
    pid: int


def asleep_after_one_job(
    fly: EmulatorControl,
    settings: Any,
    tmp_path: Path,
    image: str | None = None,
    **profile: Any,
) -> Asleep:
    """Deploy `image` with ``IDLE_ACTION="suspend"`` (and `profile`), run one job, wait for
    the Machine to suspend."""
    deploy(settings, image or new_image(), IDLE_ACTION="suspend", **profile)
    out = tmp_path / "runs"
    first = jobs.whoami.delay(str(out))
    machine_id = first_machine(fly)
    wait_for(lambda: finished(first.id), what="the first job")
    wait_for(lambda: state_is(fly, machine_id, "suspended"), what="the Machine suspended")
    worker_name = FlyJob.objects.get(job_id=first.id).worker_name
    return Asleep(out, machine_id, worker_name, machine(fly, machine_id)["pid"])


def test_an_idle_worker_suspends_and_a_wake_resumes_it_where_it_was(
    fly: EmulatorControl, settings: Any, tmp_path: Path
) -> None:
    asleep = asleep_after_one_job(fly, settings, tmp_path)
    out, machine_id, worker_name, pid = (
        asleep.out,
        asleep.machine_id,
        asleep.worker_name,
        asleep.pid,
    )
    first_id = FlyJob.objects.get(machine__machine_id=machine_id).job_id

    # Asleep: frozen, not exited; withdrawn from presence; unbilled; the ledger knows.
    assert proc_state(pid) == "T"
    conn = django_rq.get_connection(QUEUE)
    assert conn.zscore(presence.active_key(QUEUE), machine_id) is None
    assert WorkerMachine.objects.get(machine_id=machine_id).state == "suspended"

    # While it is frozen, Redis drops its connections and its rq registration expires (as
    # after a long sleep: the key's TTL ran out and rq's cleanup forgot the name).
    assert drop_other_clients(conn)
    assert [c for c in conn.client_list() if c["name"] == worker_name] == []
    key = f"{Worker.redis_worker_namespace_prefix}{worker_name}"
    conn.delete(key)
    conn.srem(worker_registration.REDIS_WORKER_KEYS, key)
    conn.srem(worker_registration.WORKERS_BY_QUEUE_KEY % QUEUE, key)

    # Neither the reaper nor flyworkers_scale takes a suspended Machine for stuck or dead.
    report = reap([QUEUE], stuck_after=0).queues[0]
    assert (report.stopped, report.destroyed, report.recovered) == ([], [], [])
    printed = StringIO()
    call_command("flyworkers_scale", QUEUE, "--json", "--dry-run", stdout=printed)
    assert json.loads(printed.getvalue())[0]["machines"] == {"suspended": 1}

    second = jobs.whoami.delay(str(out))
    wait_for(lambda: finished(second.id), what="the job after the resume")
    stats = machine(fly, machine_id)
    assert (stats["starts"], stats["resumes"]) == (1, 1)  # one boot; the rest was a resume
    assert [p for _, p in runs(out)] == [pid, pid]  # the same process, carried on
    assert ScaleEvent.objects.filter(action="start", machine_id=machine_id, detail="resumed")
    # The suspend's answer (and so its ScaleEvent) comes after the resume on the emulator.
    suspend = ScaleEvent.objects.get(action="suspend", machine_id=machine_id)
    assert suspend.outcome == "ok" and "through the local API socket" in suspend.reason

    # It reconnected and registered again: rq sees a live worker, not a dead one.
    assert conn.ttl(key) > 0 and key.encode() in conn.smembers(
        worker_registration.WORKERS_BY_QUEUE_KEY % QUEUE
    )
    assert worker_name in [
        w.name for w in Worker.all(connection=conn, queue=django_rq.get_queue(QUEUE))
    ]

    # And idle again, it suspends again.
    wait_for(lambda: machine(fly, machine_id)["suspends"] == 2, what="a second suspend")
    wait_for(lambda: state_is(fly, machine_id, "suspended"), what="the Machine suspended again")
    row = FlyJob.objects.get(job_id=second.id)
    assert row.machine is not None and row.machine.machine_id == machine_id
    print(f"\nenqueue to job start: cold {wait_time(first_id)}, resumed {wait_time(second.id)}")


def test_suspend_through_the_token_and_a_failed_suspend_stops_the_machine(
    fly: EmulatorControl, settings: Any, tmp_path: Path
) -> None:
    # No local API socket (an empty value turns it off): the worker uses the API token. It
    # waits a second idle first (rq's --max-idle-time) rather than suspend at once.
    asleep = asleep_after_one_job(
        fly, settings, tmp_path, IDLE_TIMEOUT=1, ENV={"FLYWORKERS_LOCAL_API_SOCKET": ""}
    )
    out, machine_id, pid = asleep.out, asleep.machine_id, asleep.pid

    # The next suspend fails: the worker leaves as IDLE_ACTION "stop" would.
    fly.fault("suspend", status=500, count=1)  # not retried: see warm.py
    second = jobs.whoami.delay(str(out))
    wait_for(lambda: finished(second.id), what="the job after the resume")
    suspend = ScaleEvent.objects.get(action="suspend", machine_id=machine_id, outcome="ok")
    assert "through the API token" in suspend.reason
    wait_for(lambda: state_is(fly, machine_id, "stopped"), what="the Machine stopped")
    assert machine(fly, machine_id)["exit_codes"] == [0]
    failed = ScaleEvent.objects.filter(action="suspend", machine_id=machine_id, outcome="error")
    assert failed.count() == 1

    # A stopped Machine is started like any other: a cold boot.
    fly.clear_faults()
    third = jobs.whoami.delay(str(out))
    wait_for(lambda: finished(third.id), what="the job after a cold start")
    stats = machine(fly, machine_id)
    assert (stats["starts"], stats["resumes"]) == (2, 1)
    pids = [p for _, p in runs(out)]
    assert pids[:2] == [pid, pid] and pids[2] != pid


def test_a_resume_answered_late_leaves_no_booting_mark_behind(
    fly: EmulatorControl, settings: Any, tmp_path: Path
) -> None:
    # Fly may resume a Machine well before its answer reaches the scaler, and the resumed
    # worker announces itself meanwhile. A booting mark written after that announcement would
    # outlive the worker: once it suspended again, the next job would look covered and wait
    # for BOOT_TIMEOUT with nobody serving it.
    asleep = asleep_after_one_job(fly, settings, tmp_path)
    out, machine_id = asleep.out, asleep.machine_id
    fly.latency("start", 2.0, after=True)
    second = jobs.whoami.delay(str(out))  # returns once the late answer came
    wait_for(lambda: finished(second.id), what="the job on the resumed Machine")
    conn = django_rq.get_connection(QUEUE)
    assert conn.zscore(presence.booting_key(QUEUE), machine_id) is None

    fly.latency("start", 0, after=True)
    wait_for(lambda: state_is(fly, machine_id, "suspended"), what="the Machine suspended again")
    third = jobs.whoami.delay(str(out))
    wait_for(lambda: finished(third.id), timeout=30, what="the next job, its wake not skipped")
    assert machine(fly, machine_id)["resumes"] == 2


def test_a_deploy_never_resumes_old_code_for_a_new_release(
    fly: EmulatorControl, settings: Any, tmp_path: Path
) -> None:
    old, new = new_image(), new_image()
    asleep = asleep_after_one_job(fly, settings, tmp_path, image=old)
    out, machine_id, old_pid = asleep.out, asleep.machine_id, asleep.pid

    deploy(settings, new, IDLE_ACTION="suspend")  # fly deploy: FLY_IMAGE_REF changes
    job = jobs.whoami.delay(str(out))
    assert job.meta[release.META_RELEASE] == new
    wait_for(lambda: finished(job.id), what="the new release's job")

    # The suspended Machine was updated and booted cold on the new image, not resumed.
    assert runs(out)[-1][0] == new and runs(out)[-1][1] != old_pid
    assert [image for image, _ in runs(out)] == [old, new]  # no old process ran it
    stats = machine(fly, machine_id)
    assert (stats["starts"], stats["resumes"]) == (2, 0)
    assert stats["config"]["image"] == new
    assert proc_state(old_pid) in ("", "Z")  # the frozen old worker is gone
    actions = list(
        ScaleEvent.objects.filter(machine_id=machine_id)
        .order_by("created_at")
        .values_list("action", flat=True)
    )
    assert actions[-2:] == ["update", "start"]


def test_an_old_worker_hands_a_newer_job_back_and_leaves(
    fly: EmulatorControl, settings: Any, tmp_path: Path
) -> None:
    # A running old worker (idle, waiting for work) when the deploy happens.
    old, new = new_image(), new_image()
    deploy(settings, old, IDLE_TIMEOUT=60)
    out = tmp_path / "runs"
    first = jobs.whoami.delay(str(out))
    machine_id = first_machine(fly)
    wait_for(lambda: finished(first.id), what="the first job")
    conn = django_rq.get_connection(QUEUE)
    assert conn.zscore(presence.active_key(QUEUE), machine_id) is not None  # live, waiting
    old_stamp = {release.META_RELEASE: old, release.META_SEEN: release.first_seen(conn, old)}

    deploy(settings, new, IDLE_TIMEOUT=60)
    # A job of the old release (an old web process) still runs on old code.
    older = jobs.whoami.using(meta=dict(old_stamp)).delay(str(out))
    wait_for(lambda: finished(older.id), what="the older release's job")
    assert runs(out)[-1][0] == old

    # Enqueued with wake-ups off, so that only the old worker sees it. (With them on, a
    # worker quick enough to hand it back before the enqueue's coverage check means the new
    # release wakes the Machine at once, on its new image: correct, but not this test.)
    settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": "off"}
    newer = jobs.whoami.delay(str(out))
    wait_for(lambda: state_is(fly, machine_id, "stopped"), what="the old worker left")
    # The newer job is back at the front of its queue and never started on old code.
    assert django_rq.get_queue(QUEUE).job_ids == [newer.id]
    assert FlyJob.objects.get(job_id=newer.id).attempts == 0
    assert [image for image, _ in runs(out)] == [old, old]
    assert machine(fly, machine_id)["exit_codes"] == [0]

    # The new release's wake path (the next enqueue, or flyworkers_scale --watch) updates
    # the Machine to the new image and starts it cold.
    settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": "sync"}
    scaler.wake(QUEUE, reason="flyworkers_scale")
    wait_for(lambda: finished(newer.id), what="the newer job on the new image")
    assert machine(fly, machine_id)["config"]["image"] == new
    assert FlyJob.objects.get(job_id=newer.id).attempts == 1
    # Old jobs run on the new image too.
    oldest = jobs.whoami.using(meta=dict(old_stamp)).delay(str(out))
    wait_for(lambda: finished(oldest.id), what="an older job on the new image")
    assert [image for image, _ in runs(out)] == [old, old, new, new]


def test_a_suspended_pool_from_count_resumes_on_the_first_job(
    fly: EmulatorControl, settings: Any, tmp_path: Path
) -> None:
    deploy(settings, new_image(), IDLE_ACTION="suspend")
    call_command("flyworkers_scale", QUEUE, "--count", "1", stdout=StringIO())
    machine_id = wait_for(lambda: only_machine(fly), what="a pool Machine")
    # Booted, found nothing to do, and suspended itself.
    wait_for(lambda: state_is(fly, machine_id, "suspended"), what="the pool Machine suspended")
    began = time.monotonic()
    job = jobs.whoami.delay(str(tmp_path / "runs"))
    wait_for(lambda: finished(job.id), what="the job", interval=0.01)
    took = time.monotonic() - began
    stats = machine(fly, machine_id)
    assert (stats["starts"], stats["resumes"]) == (1, 1)
    print(f"\nsuspended pool: enqueue to job finished {took:.3f}s")


def test_a_scheduled_job_that_came_due_while_asleep_runs_after_the_resume(
    fly: EmulatorControl, settings: Any, tmp_path: Path
) -> None:
    from datetime import timedelta

    asleep = asleep_after_one_job(fly, settings, tmp_path)
    out, machine_id, pid = asleep.out, asleep.machine_id, asleep.pid
    due = jobs.whoami.enqueue_in(timedelta(seconds=1), str(out))
    conn = django_rq.get_connection(QUEUE)
    wait_for(lambda: scaler.snapshot(django_rq.get_queue(QUEUE))[0].due_scheduled == 1)
    # flyworkers_scale (--watch) wakes the queue for it; the resumed worker promotes it.
    call_command("flyworkers_scale", QUEUE, stdout=StringIO())
    wait_for(lambda: finished(due.id), what="the scheduled job")
    assert machine(fly, machine_id)["resumes"] == 1
    assert [p for _, p in runs(out)] == [pid, pid]
    assert conn.zcard(f"rq:scheduled:{QUEUE}") == 0


def test_the_admin_filters_suspended_machines(admin_client: Any) -> None:
    from django_flyworkers import ledger

    ledger.record_machine_seen("5e1ee9a1b2c3d4", queue=QUEUE, state="suspended")
    ledger.record_machine_seen("0a1b2c3d4e5f60", queue=QUEUE, state="stopped")
    page = admin_client.get(
        "/admin/django_flyworkers/workermachine/", {"state__exact": "suspended"}
    )
    assert page.status_code == 200
    text = page.content.decode()
    assert "5e1ee9a1b2c3d4" in text and "0a1b2c3d4e5f60" not in text
    assert "?state__exact=suspended" in text  # offered in the list filter


def test_an_answer_before_the_freeze_is_not_taken_for_a_resume(
    fly: EmulatorControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Fly the suspend's answer may arrive before the freeze: the worker then waits until
    its Machine was suspended and started again, and gives up after RESUME_WAIT."""
    import threading

    from django_flyworkers import get_client, warm

    client = get_client()
    created = client.create({"image": "sleeper", "init": {"exec": ["sleep", "120"]}})
    client.wait(created.id, "started", timeout=30)
    worker = warm.SuspendingWorker([QUEUE], connection=django_rq.get_connection(QUEUE))
    client.suspend(created.id)  # answered at once: this process is not the one frozen
    client.wait(created.id, "suspended", timeout=30)

    outcome: list[bool] = []
    waiting = threading.Thread(
        target=lambda: outcome.append(worker._await_resume(client, created.id))
    )
    reads = fly.stats()["calls"].get("get", 0)
    waiting.start()
    wait_for(lambda: fly.stats()["calls"].get("get", 0) >= reads + 3, 30, "three reads")
    assert outcome == []  # suspended: still waiting
    client.start(created.id)
    waiting.join(30)
    assert outcome == [True]

    # Never resumed: it gives up and the worker leaves as IDLE_ACTION "stop" would.
    monkeypatch.setattr(warm, "RESUME_WAIT", 0.2)
    client.suspend(created.id)
    client.wait(created.id, "suspended", timeout=30)
    assert worker._await_resume(client, created.id) is False
