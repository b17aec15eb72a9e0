"""Tasks (Django's tasks framework) the tests enqueue; worker Machines import them from here."""

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from django_flyworkers.tasks import Task, TaskContext, task


class TaskFailure(RuntimeError):
    pass


@task(queue_name="default")
def add(a: int, b: int) -> int:
    return a + b


@task(queue_name="default", takes_context=True)
def where_am_i(context: TaskContext, label: str) -> dict[str, Any]:
    return {
        "label": label,
        "attempt": context.attempt,
        "result_id": context.task_result.id,
        "machine": os.environ.get("FLY_MACHINE_ID"),
    }


@task(queue_name="default")
async def double_later(value: int) -> int:
    await asyncio.sleep(0)
    return value * 2


def plain_add(a: int, b: int) -> int:
    return a + b


# A Task of Django's own class (as another backend's @task makes them), not a FlyTask.
plain_add = Task(func=plain_add, queue_name="default")  # type: ignore[assignment,misc]


@task(queue_name="default")
def fail(message: str) -> None:
    raise TaskFailure(message)


@task(queue_name="default")
def returns_a_set() -> Any:
    return {1, 2}  # not JSON: the task fails, as with Django's own backends


@task(queue_name="other")
def mark_time(label: str) -> str:
    return f"{label} ran"


@task(queue_name="other")
def block(marker: str, seconds: float) -> str:
    Path(marker).write_text("running")
    time.sleep(seconds)
    return "woke up"
