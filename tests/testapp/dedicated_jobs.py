"""Jobs for the dedicated queue ("render", MODE "dedicated"): each runs on a Machine of its own."""

import os
import time
from pathlib import Path
from typing import Any

from django_flyworkers import flyjob
from django_flyworkers.tasks import task


def where() -> dict[str, Any]:
    """The Machine this runs on, as Fly tells its processes."""
    return {
        "machine": os.environ.get("FLY_MACHINE_ID"),
        "memory_mb": int(os.environ.get("FLY_VM_MEMORY_MB", "0")),
    }


@flyjob("render", dedicated=True)
def render(seconds: float = 0.0) -> dict[str, Any]:
    time.sleep(seconds)
    return where()


@flyjob("render", dedicated=True)
def render_slowly_first_time(marker: str, seconds: float) -> dict[str, Any]:
    """Sleeps ``seconds`` on its first run only, so a Machine killed mid-job is retried fast."""
    path = Path(marker)
    first = not path.exists()
    path.write_text("ran")
    if first:
        time.sleep(seconds)
    return {**where(), "first": first}


@flyjob("render", dedicated=True, timeout=1)
def render_too_long(seconds: float) -> None:
    time.sleep(seconds)


@task(queue_name="render")
def render_task(label: str) -> dict[str, Any]:
    """A task of Django's tasks framework on the dedicated queue."""
    return {**where(), "label": label}
