"""FlyTaskBackend through Django's tasks API, on real parts: redis-server, the emulator over
HTTP and worker processes on its Machines. Runs on Django 6 (django.tasks) and on Django 5.2
(the django-tasks backport)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import django_rq
import pytest
from django.core.checks import run_checks
from django.core.management import call_command
from django.db import transaction
from django.test import override_settings
from django.utils import timezone

from django_flyworkers.emulator import EmulatorControl
from django_flyworkers.models import FlyJob, ScaleEvent
from django_flyworkers.tasks import (
    E_OPTIONS,
    E_QUEUE,
    FlyTask,
    FlyTaskBackend,
    InvalidTask,
    TaskResultDoesNotExist,
    TaskResultStatus,
    task_backends,
)
from django_flyworkers.testing import EMULATOR_TOKEN, wait_for
from tests.testapp import jobs, tasks

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


@pytest.fixture
def fly(fly_emulator: Any, redis_flush: Any) -> EmulatorControl:
    return EmulatorControl(fly_emulator.url, EMULATOR_TOKEN)


@pytest.fixture
def no_wake(redis_flush: Any, settings: Any) -> Iterator[None]:
    """Redis only: pushes are recorded but start no Machine."""
    settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": "off"}
    yield


def finished(result: Any, timeout: float = 90) -> Any:
    """Poll get_result() (from this process, not the worker's) until the task has finished."""

    def done() -> Any:
        result.refresh()
        return result.is_finished

    wait_for(done, timeout, what=f"task {result.id} to finish")
    return result


def queued_ids(queue: str) -> list[str]:
    return list(django_rq.get_queue(queue).get_job_ids())


# -- a Machine runs tasks ---------------------------------------------------------------------


def test_tasks_run_on_a_machine_and_get_result_tells_all(fly: EmulatorControl) -> None:
    before = timezone.now()
    added = tasks.add.enqueue(20, 22)
    assert added.status == TaskResultStatus.READY and added.enqueued_at is not None
    located = tasks.where_am_i.enqueue(label="here")
    doubled = tasks.double_later.enqueue(21)  # an async def task
    plain = tasks.plain_add.enqueue(2, 3)  # Django's Task class, not our FlyTask

    finished(added)
    assert added.status == TaskResultStatus.SUCCESSFUL
    assert added.return_value == 42
    machines = fly.stats()["machines"]
    assert len(added.worker_ids) == 1 and added.worker_ids[0] in machines
    assert before <= added.enqueued_at <= added.started_at <= added.finished_at  # type: ignore[operator]
    assert added.last_attempted_at == added.started_at
    assert added.errors == [] and added.attempts == 1
    assert added.args == [20, 22] and added.kwargs == {}
    assert added.task.func is tasks.add.func and added.task.queue_name == "default"

    # Another lookup by id alone, as another request would make it.
    again = task_backends["default"].get_result(added.id)
    assert again.status == TaskResultStatus.SUCCESSFUL and again.return_value == 42
    assert tasks.add.get_result(added.id).worker_ids == added.worker_ids

    finished(located)
    assert located.return_value == {
        "label": "here",
        "attempt": 1,
        "result_id": located.id,
        "machine": located.worker_ids[0],
    }
    assert finished(doubled).return_value == 42
    assert finished(plain).return_value == 5
    assert plain.worker_ids[0] in fly.stats()["machines"]

    # The same job in the ledger: run by the Machine get_result names, which the scaler made.
    wait_for(lambda: FlyJob.objects.filter(job_id=added.id, status="finished").exists())
    row = FlyJob.objects.get(job_id=added.id)
    assert row.machine is not None
    assert row.machine.machine_id == added.worker_ids[0]
    assert row.func_name == "tests.testapp.tasks.add.execute"
    plain_row = FlyJob.objects.get(job_id=plain.id)
    assert plain_row.func_name == "django_flyworkers.tasks.execute_task"
    assert ScaleEvent.objects.filter(queue="default", action="create", outcome="ok").exists()


def test_failing_task_is_failed_with_its_traceback(fly: EmulatorControl) -> None:
    failing = tasks.fail.enqueue("kaput")
    not_json = tasks.returns_a_set.enqueue()

    finished(failing)
    assert failing.status == TaskResultStatus.FAILED
    [error] = failing.errors
    assert error.exception_class is tasks.TaskFailure
    assert error.traceback.startswith("Traceback (most recent call last):")
    assert "raise TaskFailure(message)" in error.traceback
    assert error.traceback.rstrip().endswith("tests.testapp.tasks.TaskFailure: kaput")
    assert failing.worker_ids and failing.worker_ids[0] in fly.stats()["machines"]
    assert failing.finished_at is not None
    with pytest.raises(ValueError, match="Task failed"):
        failing.return_value  # noqa: B018
    # The worker closes its ledger row just after rq has the result.
    wait_for(lambda: FlyJob.objects.filter(job_id=failing.id, status="failed").exists())

    finished(not_json)
    assert not_json.status == TaskResultStatus.FAILED
    assert not_json.errors[0].exception_class is TypeError


def test_retry_option_runs_a_failed_task_again(fly: EmulatorControl, settings: Any) -> None:
    settings.TASKS = {
        "default": {
            "BACKEND": "django_flyworkers.tasks.FlyTaskBackend",
            "QUEUES": ["default"],
            "OPTIONS": {"RETRY": 1},
        }
    }
    # Workers read the settings module, not this override: the retry is in the job itself.
    result = tasks.fail.enqueue("twice")
    finished(result)
    assert result.status == TaskResultStatus.FAILED
    assert [e.exception_class for e in result.errors] == [tasks.TaskFailure] * 2
    assert result.attempts == 2 and len(result.worker_ids) == 2
    wait_for(lambda: FlyJob.objects.filter(job_id=result.id, status="failed").exists())
    assert FlyJob.objects.get(job_id=result.id).attempts == 2


def test_run_after_runs_after_its_time_when_the_reconciler_wakes_a_machine(
    fly: EmulatorControl,
) -> None:
    due = timezone.now() + timedelta(seconds=3)
    result = tasks.mark_time.using(run_after=due).enqueue("later")
    assert result.status == TaskResultStatus.READY
    assert result.task.run_after == due
    assert fly.stats()["machines"] == {}  # scheduled: nothing to wake yet
    assert FlyJob.objects.get(job_id=result.id).status == "scheduled"
    assert tasks.mark_time.get_result(result.id).task.run_after == due

    def reconcile() -> bool:
        # What `flyworkers_scale --watch` does every interval.
        call_command("flyworkers_scale", "other", stdout=StringIO())
        return bool(fly.stats()["machines"])

    wait_for(reconcile, 60, what="flyworkers_scale to wake a Machine", interval=0.5)
    assert timezone.now() >= due  # not woken before the task was due
    finished(result)
    assert result.status == TaskResultStatus.SUCCESSFUL and result.return_value == "later ran"
    assert result.started_at is not None and result.started_at >= due


def test_killed_machine_fails_the_task_with_the_reapers_reason(
    fly: EmulatorControl, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    result = tasks.block.enqueue(str(marker), 120)
    wait_for(marker.exists, what="the task to start")
    result.refresh()
    assert result.status == TaskResultStatus.RUNNING and result.started_at is not None
    [machine_id] = result.worker_ids
    with pytest.raises(ValueError, match="not finished"):
        result.return_value  # noqa: B018

    fly.kill(machine_id)  # the VM dies mid-task
    wait_for(lambda: fly.stats()["machines"][machine_id]["state"] == "stopped")
    call_command("flyworkers_reap", "other", stdout=StringIO())

    result.refresh()
    assert result.status == TaskResultStatus.FAILED
    [error] = result.errors
    assert error.exception_class_path == "rq.exceptions.AbandonedJobError"
    assert f"Machine {machine_id} was stopped while the job ran" in error.traceback


# -- enqueueing: transactions, priority, bad input (Redis only) -------------------------------


def test_enqueue_inside_a_rolled_back_transaction_sends_nothing(no_wake: None) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        lost = tasks.add.enqueue(1, 2)
        raise RuntimeError("rollback")
    assert lost.enqueued_at is None
    with pytest.raises(TaskResultDoesNotExist):
        tasks.add.get_result(lost.id)
    assert queued_ids("default") == []
    assert not FlyJob.objects.exists()

    with transaction.atomic():
        kept = tasks.add.enqueue(3, 4)
        assert queued_ids("default") == []  # not before the commit
    assert queued_ids("default") == [kept.id]
    assert kept.enqueued_at is not None
    assert tasks.add.get_result(kept.id).status == TaskResultStatus.READY
    assert FlyJob.objects.get(job_id=kept.id).status == "queued"


def test_enqueue_on_commit_can_be_turned_off(no_wake: None, settings: Any) -> None:
    settings.TASKS = {
        "default": {
            "BACKEND": "django_flyworkers.tasks.FlyTaskBackend",
            "OPTIONS": {"ENQUEUE_ON_COMMIT": False},
        }
    }
    with transaction.atomic():
        result = tasks.add.enqueue(1, 1)
        assert queued_ids("default") == [result.id]  # pushed at once, as Django's docs say


def test_priority_above_zero_goes_to_the_front(no_wake: None) -> None:
    low = tasks.add.using(priority=-10).enqueue(1, 1)
    normal = tasks.add.enqueue(2, 2)
    urgent = tasks.add.using(priority=10).enqueue(3, 3)
    assert queued_ids("default") == [urgent.id, low.id, normal.id]
    assert tasks.add.get_result(urgent.id).task.priority == 10
    assert tasks.add.get_result(low.id).task.priority == -10


def test_run_after_in_the_past_is_enqueued_at_once(no_wake: None) -> None:
    result = tasks.add.using(run_after=timezone.now() - timedelta(minutes=1)).enqueue(1, 1)
    assert queued_ids("default") == [result.id]


def test_arguments_must_be_json(no_wake: None) -> None:
    with pytest.raises(TypeError):
        tasks.add.enqueue(timezone.now(), 1)
    assert queued_ids("default") == []
    # Arguments reach the worker after a JSON round trip, as Django's backends pass them.
    result = tasks.add.enqueue((1, 2), b=[3])
    assert tasks.add.get_result(result.id).args == [[1, 2]]


def test_invalid_tasks_are_refused_when_defined_or_enqueued(no_wake: None) -> None:
    with pytest.raises(InvalidTask, match="aware"):
        tasks.add.using(run_after=timezone.now().replace(tzinfo=None))
    with pytest.raises(InvalidTask, match="not valid"):
        tasks.add.using(queue_name="unknown")
    assert isinstance(tasks.add, FlyTask)


def test_get_result_of_an_unknown_id_or_a_plain_job(no_wake: None) -> None:
    with pytest.raises(TaskResultDoesNotExist):
        task_backends["default"].get_result("no-such-id")
    plain = jobs.add.delay(1, 2)  # an @flyjob job is not a Task
    with pytest.raises(TaskResultDoesNotExist):
        task_backends["default"].get_result(plain.id)


def test_execute_outside_a_worker_says_how_to_run_inline() -> None:
    with pytest.raises(RuntimeError, match=r"task\.call"):
        tasks.add.execute(1, 2)
    assert tasks.add.call(1, 2) == 3


# -- what the backend declares, and its checks ------------------------------------------------


def test_supports_flags() -> None:
    backend = task_backends["default"]
    assert isinstance(backend, FlyTaskBackend)
    assert backend.supports_defer and backend.supports_get_result
    assert backend.supports_priority and backend.supports_async_task


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("fast", "OPTIONS must be a dict, got str"),
        ({"RETRIES": 1}, "unknown OPTIONS key 'RETRIES'"),
        ({"RETRY": -1}, "OPTIONS['RETRY'] must be a whole number >= 0, got -1"),
        ({"TIMEOUT": 0}, "OPTIONS['TIMEOUT'] must be None or seconds > 0, got 0"),
        ({"RESULT_TTL": "1d"}, "OPTIONS['RESULT_TTL'] must be None, -1"),
        ({"ENQUEUE_ON_COMMIT": "yes"}, "OPTIONS['ENQUEUE_ON_COMMIT'] must be True or False"),
    ],
)
def test_bad_options_are_a_system_check_error(options: Any, message: str) -> None:
    config = {"fly": {"BACKEND": "django_flyworkers.tasks.FlyTaskBackend", "OPTIONS": options}}
    with override_settings(TASKS=config):
        errors = [e for e in run_checks() if e.id == E_OPTIONS]
        assert len(errors) == 1 and message in errors[0].msg
        assert errors[0].msg.startswith("TASKS['fly']: ")
        with pytest.raises(Exception, match=re.escape(message)):
            tasks.add.using(backend="fly").enqueue(1, 2)


def test_queue_missing_from_rq_queues_is_a_system_check_error() -> None:
    config = {"default": {"BACKEND": "django_flyworkers.tasks.FlyTaskBackend", "QUEUES": ["nope"]}}
    with override_settings(TASKS=config):
        [error] = [e for e in run_checks() if e.id == E_QUEUE]
    assert "queue 'nope' is not in RQ_QUEUES" in error.msg


def test_the_app_makes_django_run_the_backend_checks_at_startup() -> None:
    """Django registers its task checks only when django.tasks is imported: the app does it."""
    code = (
        "import django, sys; django.setup(); from django.core.checks import registry; "
        "print(sorted(check.__name__ for check in registry.registry.get_checks()))"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert "check_tasks" in run.stdout


def test_good_configuration_passes_the_checks() -> None:
    assert [e for e in run_checks() if e.id in (E_OPTIONS, E_QUEUE)] == []


def test_readme_documents_the_backend() -> None:
    match = re.search(r"^## Django's tasks framework\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match, "README has no tasks section"
    text = match.group(1)
    assert set(re.findall(r"flyworkers\.E\d{3}", text)) == {E_OPTIONS, E_QUEUE}
    from django_flyworkers.tasks.options import OPTION_DEFAULTS

    for key in OPTION_DEFAULTS:
        assert f"`{key}`" in text, key
