"""``make demo`` and ``make run`` as CI sees them: the sandbox's demo runner in a subprocess.

Everything is real: the embedded redis-server, the emulator over HTTP, worker processes running
``sandbox_project/manage.py rqworker``, runserver. Each run gets a marker in its environment,
inherited by every process it starts, so the leftover check finds exactly this run's processes.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from django_flyworkers.testing import free_port, processes, wait_for

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "sandbox_project" / "rundemo.py"
MARKER = "SANDBOX_DEMO_TEST_MARKER"

pytestmark = pytest.mark.timeout(120)


def demo_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This process's environment without what the test suite set for itself."""
    dropped = ("FLYWORKERS_", "FLY_", "DJANGO_", "DEMO_")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(dropped) and key not in ("REDIS_URL", "DATABASE_URL")
    }
    env.update(
        DATABASE_URL=f"sqlite:///{tmp_path / 'demo.sqlite3'}",
        DEMO_STATE_DIR=str(tmp_path / "state"),
        PYTHONUNBUFFERED="1",
        **{MARKER: uuid.uuid4().hex},
    )
    env.update(extra)
    return env


def processes_with(marker: str) -> list[str]:
    """Live processes (zombies are dead) whose environment carries ``MARKER=marker``."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            found.append(f"{entry.name}: {cmdline}")
        except OSError:
            continue
    return found


class Demo:
    """The runner in a subprocess, its output read line by line on a thread."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.env = env
        self.proc = processes.ForkedPopen(
            [sys.executable, str(RUNNER), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def text(self) -> str:
        while not self.lines.empty():
            self.output.append(self.lines.get())
        return "".join(self.output)

    def wait_for_output(self, pattern: str, timeout: float) -> re.Match[str]:
        found = wait_for(
            lambda: re.search(pattern, self.text(), re.M) or self.proc.poll() is not None,
            timeout,
            f"output matching {pattern!r}",
        )
        assert isinstance(found, re.Match), f"demo exited early:\n{self.text()}"
        return found

    def finish(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self.pump.join(10)  # the last lines, up to end of file
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def demo_runs() -> Iterator[list[Demo]]:
    """Runs started by a test; whatever happens, none of their processes outlives it."""
    runs: list[Demo] = []
    yield runs
    for run in runs:
        run.kill()
        left = processes_with(run.env[MARKER])
        for line in left:
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        assert left == [], f"processes left behind: {left}\n{run.text()}"


def query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db, timeout=30) as conn:
        return conn.execute(sql).fetchall()


def summary_row(output: str, name: str) -> dict[str, str]:
    table = output.rpartition("\nSummary\n")[2]
    header = re.search(r"^  queue .*$", table, re.M)
    row = re.search(rf"^  {name} .*$", table, re.M)
    assert header and row, output
    return dict(zip(header.group().split(), row.group().split(), strict=True))


@pytest.mark.slow(9)
def test_short_demo_runs_every_job_and_leaves_nothing_behind(
    tmp_path: Path, demo_runs: list[Demo]
) -> None:
    began = time.monotonic()
    demo = Demo(demo_env(tmp_path, DEMO_JOBS="10", DEMO_SCHEDULE_IN="3"))
    demo_runs.append(demo)
    code = demo.finish(timeout=90)
    output = demo.text()
    assert code == 0, output
    assert time.monotonic() - began < 60, output

    total = summary_row(output, "total")
    assert (total["jobs"], total["done"], total["failed"]) == ("10", "10", "0"), output
    assert int(total["created"]) >= 2  # one per queue at least, from zero
    assert int(total["started"]) >= 1  # wave 2 and the digest reuse stopped Machines
    assert float(total["billed"].rstrip("s")) > 0, output
    assert re.search(r"p50 \d+\.\ds", output), output
    assert "Admin:    user 'admin', password 'flyworkers'" in output
    assert "The scheduled digest started" in output
    assert "WARNING" not in output, output  # MAX_MACHINES held per queue
    assert "Stopped everything this demo started: no process left behind." in output
    assert processes_with(demo.env[MARKER]) == []

    # The work really happened, written by the worker processes into the demo's database.
    db = tmp_path / "demo.sqlite3"
    statuses = dict(query(db, "SELECT status, COUNT(*) FROM django_flyworkers_flyjob GROUP BY 1"))
    assert statuses == {"finished": 10}
    assert query(db, "SELECT COUNT(*) FROM gallery_photo WHERE thumbnail_sha256 != ''") == [(5,)]
    assert query(db, "SELECT COUNT(*) FROM gallery_digest") == [(1,)]
    # Receipts of photos 1 and 5 fail once ("mail server busy") and succeed on their retry.
    retried = "SELECT func_name, attempts FROM django_flyworkers_flyjob WHERE attempts > 1"
    assert query(db, retried) == [("gallery.jobs.send_receipt", 2)] * 2
    assert summary_row(output, "default")["retried"] == "2"
    machine_logs = list((tmp_path / "state" / "machines").glob("*.log"))
    assert machine_logs and all("rqworker" in log.read_text() for log in machine_logs)


@pytest.mark.slow(8)
def test_warm_pool_demo_resumes_suspended_machines(tmp_path: Path, demo_runs: list[Demo]) -> None:
    env = demo_env(tmp_path, DEMO_JOBS="10", DEMO_SCHEDULE_IN="3", DEMO_IDLE_ACTION="suspend")
    demo = Demo(env)
    demo_runs.append(demo)
    code = demo.finish(timeout=90)
    output = demo.text()
    assert code == 0, output
    total = summary_row(output, "total")
    assert (total["jobs"], total["done"], total["failed"]) == ("10", "10", "0"), output
    assert int(total["resumed"]) >= 1, output  # wave 2 and the digest resume, not boot
    assert "Wave 2 (suspended Machines resumed)" in output, output
    assert "every Machine is stopped or suspended" in output, output
    assert "no process left behind" in output, output
    assert processes_with(demo.env[MARKER]) == []


@pytest.mark.slow(7)
def test_ctrl_c_stops_everything(tmp_path: Path, demo_runs: list[Demo]) -> None:
    demo = Demo(demo_env(tmp_path, DEMO_JOBS="40"))
    demo_runs.append(demo)
    demo.wait_for_output(r"^  Machines .*\bstarted\b", timeout=40)
    assert processes_with(demo.env[MARKER])  # redis, the scaler, workers are running
    demo.proc.send_signal(signal.SIGINT)
    assert demo.finish(timeout=30) == 130
    output = demo.text()
    assert "Interrupted (SIGINT): stopping everything." in output
    assert "no process left behind" in output, output
    assert processes_with(demo.env[MARKER]) == []


@pytest.mark.slow(6)
def test_serve_keeps_the_site_up_to_enqueue_more(tmp_path: Path, demo_runs: list[Demo]) -> None:
    port = free_port()
    demo = Demo(demo_env(tmp_path, DEMO_JOBS="0"), "--serve", "--port", str(port))
    demo_runs.append(demo)
    demo.wait_for_output(r"^Serving http://127\.0\.0\.1:\d+/", timeout=40)

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as web:
        assert web.get("/").status_code == 302  # staff only
        login = web.get("/admin/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login.text)
        assert token is not None
        answer = web.post(
            "/admin/login/?next=/",
            data={
                "username": "admin",
                "password": "flyworkers",
                "csrfmiddlewaretoken": token.group(1),
                "next": "/",
            },
        )
        assert answer.status_code == 302, answer.text
        page = web.get("/")
        assert page.status_code == 200 and "Upload photos" in page.text
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        assert token is not None
        answer = web.post(
            "/", data={"count": "2", "action": "upload", "csrfmiddlewaretoken": token.group(1)}
        )
        assert answer.status_code == 302

    db = tmp_path / "demo.sqlite3"
    finished = "SELECT COUNT(*) FROM django_flyworkers_flyjob WHERE status = 'finished'"
    wait_for(lambda: query(db, finished) == [(4,)], 60, "the 4 jobs enqueued from the page")
    demo.wait_for_output(r"4 jobs enqueued since the demo ended", timeout=10)

    demo.proc.send_signal(signal.SIGINT)
    assert demo.finish(timeout=30) == 130
    assert "no process left behind" in demo.text(), demo.text()
    assert processes_with(demo.env[MARKER]) == []
