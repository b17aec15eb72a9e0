"""Job functions the tests enqueue; worker Machines import them from here."""

import os
import time
from pathlib import Path

from django_flyworkers import flyjob


@flyjob("default")
def add(a: int, b: int) -> int:
    return a + b


@flyjob("images")
def slow_add(a: int, b: int, seconds: float = 0.05) -> int:
    time.sleep(seconds)
    return a + b


@flyjob("default")
def fail(message: str = "boom", seconds: float = 0) -> None:
    time.sleep(seconds)
    raise RuntimeError(message)


@flyjob("default", retry=2)
def flaky(marker_dir: str, succeed_on: int) -> str:
    """Fails until it has been called ``succeed_on`` times (counted with files)."""
    directory = Path(marker_dir)
    directory.mkdir(parents=True, exist_ok=True)
    calls = len(list(directory.iterdir())) + 1
    (directory / f"call-{calls}-{os.getpid()}").touch()
    if calls < succeed_on:
        raise RuntimeError(f"flaky failure {calls}")
    return f"ok after {calls}"


@flyjob("other")
def sleep_then_write(path: str, seconds: float) -> str:
    time.sleep(seconds)
    Path(path).write_text("done")
    return "done"


def plain_add(a: int, b: int) -> int:
    """Undecorated: benchmarks wrap it in django-rq's own @job for a baseline."""
    return a + b


@flyjob("other")
def slow_first_time(marker: str, seconds: float) -> str:
    """Sleeps ``seconds`` on its first run only (so a killed first attempt can be retried fast)."""
    path = Path(marker)
    if path.exists():
        return "second run"
    path.write_text("first run")
    time.sleep(seconds)
    return "first run"


@flyjob("other")
def whoami(path: str) -> str:
    """Appends the image and the worker's pid (the work horse's parent) to ``path``; returns
    the image."""
    image = os.environ.get("FLY_IMAGE_REF", "")
    with open(path, "a") as out:
        out.write(f"{image} {os.getppid()}\n")
    return image


@flyjob("default", retry=1)
def fail_first(value: int, seconds: float = 0.0) -> int:
    """Fails on its first run (after ``seconds``) and succeeds on the second (counted in Redis,
    per job)."""
    from rq import get_current_job

    job = get_current_job()
    assert job is not None
    if job.connection.incr(f"flyworkers:test:runs:{job.id}") == 1:
        time.sleep(seconds)
        raise RuntimeError(f"first run of {value} fails")
    return value


@flyjob("default")
def enqueue_on_other(value: int) -> str:
    """Enqueues a job on the queue "other" from inside the work horse."""
    return str(add.using(queue="other").delay(value, 1).id)


@flyjob("default")
def count_jobs() -> int:
    """Uses the database from inside the work horse."""
    from django_flyworkers.models import FlyJob

    return FlyJob.objects.count()


@flyjob("default", retry=3)
def soak_job(seconds: float) -> str:
    """Works ``seconds``, then counts its completion in Redis (benchmarks/soak.py)."""
    from rq import get_current_job

    time.sleep(seconds)
    job = get_current_job()
    assert job is not None
    job.connection.hincrby("flyworkers:soak:done", job.id, 1)
    return "done"
