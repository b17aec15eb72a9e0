"""The emulator over a real socket, its CLI, and what happens to Machine processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from django_flyworkers.emulator import EmulatorControl, EmulatorServer
from django_flyworkers.emulator.runner import group_members, local_argv
from django_flyworkers.testing import wait_for

TOKEN = "emu-proc-token"
APP = "proc-app"


def alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # pragma: no cover - no /proc
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat[stat.rindex(")") + 2] not in "ZX"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmulatorServer]:
    srv = EmulatorServer(token=TOKEN, workdir=tmp_path, rate_limits=False, boot_delay=0.05)
    srv.start()
    yield srv
    srv.stop()
    assert srv.emulator.leftover_pids() == []


@pytest.fixture
def fly(server: EmulatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=server.url + "/v1", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    ) as client:
        yield client


def create(fly: httpx.Client, cmd: list[str], **extra: Any) -> Any:
    config = {"image": "test:latest", "init": {"exec": cmd}, "restart": {"policy": "no"}, **extra}
    response = fly.post(f"/apps/{APP}/machines", json={"config": config})
    assert response.status_code == 200, response.text
    return response.json()


def wait(fly: httpx.Client, machine: dict[str, Any], state: str, timeout: int = 10) -> None:
    response = fly.get(
        f"/apps/{APP}/machines/{machine['id']}/wait",
        params={"state": state, "timeout": timeout, "instance_id": machine["instance_id"]},
    )
    assert response.status_code == 200, response.text


# A main process with a child in its group. On SIGINT it checks, after a moment, whether the
# child is still alive (it is, if only the main process was signalled), reports and exits.
FAMILY = """
import os, signal, subprocess, sys, time
child = subprocess.Popen(["sleep", "60"])
open("child.pid", "w").write(str(child.pid))
def on_int(signum, frame):
    time.sleep(0.2)
    open("report", "w").write("child alive" if child.poll() is None else "child dead")
    sys.exit(0)
signal.signal(signal.SIGINT, on_int)
open("ready", "w").close()
time.sleep(60)
"""


def test_stop_signals_main_process_and_exit_reaps_group(
    fly: httpx.Client, server: EmulatorServer, tmp_path: Path
) -> None:
    machine = create(fly, ["python", "-c", FAMILY])
    wait_for(lambda: (tmp_path / "ready").exists(), 10, interval=0.02)
    child = int((tmp_path / "child.pid").read_text())
    assert alive(child)
    assert fly.post(f"/apps/{APP}/machines/{machine['id']}/stop").status_code == 200
    wait(fly, machine, "stopped")
    # Fly signals the main process only, so an RQ work-horse can finish its job...
    assert (tmp_path / "report").read_text() == "child alive"
    # ...and when the main process is gone the rest of the group goes too, as with a VM.
    wait_for(lambda: not alive(child), 10, interval=0.02)
    assert server.emulator.leftover_pids() == []


def test_server_stop_kills_every_process_group(tmp_path: Path) -> None:
    srv = EmulatorServer(token=TOKEN, workdir=tmp_path, rate_limits=False).start()
    with httpx.Client(
        base_url=srv.url + "/v1", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    ) as fly:
        machines = [create(fly, ["sh", "-c", "sleep 60 & sleep 60 & wait"]) for _ in range(3)]
        machines.append(create(fly, ["python", "-c", FAMILY]))
        for machine in machines:
            wait(fly, machine, "started")
        pgids = srv.emulator.all_pids()
        assert len(pgids) == 4
        wait_for(lambda: len(group_members(pgids)) >= 9, 10, interval=0.02)
    srv.stop()
    assert group_members(pgids) == []
    assert not any(alive(pid) for pid in pgids)
    srv.stop()  # idempotent


def test_many_concurrent_waits(fly: httpx.Client, server: EmulatorServer) -> None:
    config = {"image": "t", "init": {"exec": ["sleep", "30"]}}
    machine = fly.post(f"/apps/{APP}/machines", json={"config": config, "skip_launch": True})
    machine_id = machine.json()["id"]
    url = f"/apps/{APP}/machines/{machine_id}/wait"

    def waiter(_: int) -> tuple[int, float]:
        with httpx.Client(base_url=str(fly.base_url), headers=dict(fly.headers), timeout=30) as c:
            response = c.get(url, params={"state": "started", "timeout": 20})
            return response.status_code, time.monotonic()

    with ThreadPoolExecutor(max_workers=40) as pool:
        futures = [pool.submit(waiter, i) for i in range(40)]
        wait_for(lambda: server.emulator.stats()["waiters"] == 40, 20, interval=0.02)
        started = time.monotonic()
        fly.post(f"/apps/{APP}/machines/{machine_id}/start")
        results = [f.result(timeout=30) for f in futures]
    assert {status for status, _ in results} == {200}
    assert max(at for _, at in results) - started < 2.0


def test_control_client_over_socket(fly: httpx.Client, server: EmulatorServer) -> None:
    with EmulatorControl(server.url, TOKEN) as ctl:
        machine = create(fly, ["sleep", "30"])
        wait(fly, machine, "started")
        ctl.kill(machine["id"])
        wait(fly, machine, "stopped")
        stats = ctl.stats()
        assert stats["machines"][machine["id"]]["exit_codes"] == [137]
        assert stats["log_dir"] == str(tmp_log_dir(server))
        ctl.reset()
        assert ctl.stats()["machines"] == {}


def tmp_log_dir(server: EmulatorServer) -> Path:
    return server.emulator.workdir / ".emulator" / "logs"


def test_command_that_cannot_start_exits_127(fly: httpx.Client, server: EmulatorServer) -> None:
    machine = create(fly, ["/nonexistent/worker"])
    wait(fly, machine, "stopped")
    events = fly.get(f"/apps/{APP}/machines/{machine['id']}").json()["events"]
    assert events[0]["request"]["exit_event"]["exit_code"] == 127
    log = server.emulator.log_path(machine["id"]).read_text()
    assert "could not start" in log and "/nonexistent/worker" in log


def test_local_argv() -> None:
    assert local_argv(["python", "-V"]) == [sys.executable, "-V"]
    assert local_argv(["python3"]) == [sys.executable]
    assert local_argv(["python3.11", "x"]) == ["python3.11", "x"]
    assert local_argv([]) == []


def test_cli_serves_until_sigterm_and_kills_machines(tmp_path: Path) -> None:
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "django_flyworkers.emulator",
            "--port",
            "0",
            "--token",
            TOKEN,
            "--workdir",
            str(tmp_path),
            "--no-rate-limits",
            "--boot-delay",
            "0.05",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert cli.stdout is not None
        line = cli.stdout.readline()
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        assert match, line
        with httpx.Client(
            base_url=match.group(1) + "/v1",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        ) as fly:
            machine = create(fly, ["sleep", "60"])
            wait(fly, machine, "started")
            stats = httpx.get(
                match.group(1) + "/_emulator/stats", headers={"Authorization": f"Bearer {TOKEN}"}
            ).json()
            pid = stats["machines"][machine["id"]]["pid"]
            assert alive(pid)
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(10) == 0
        assert not alive(pid)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()


def test_emulator_imports_nothing_from_django() -> None:
    code = (
        "import sys, django_flyworkers.emulator, django_flyworkers.emulator.__main__; "
        "assert not [m for m in sys.modules if m == 'django' or m.startswith('django.')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_cli_requires_a_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FLY_API_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "django_flyworkers.emulator", "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--token is required" in result.stderr
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "django_flyworkers.emulator",
            "--token",
            "T",
            "--port",
            "0",
            "--workdir",
            str(tmp_path / "missing"),
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=30,
    )
    assert result.returncode == 2
    assert "is not a directory" in result.stderr


def test_shutdown_wakes_pending_waits(tmp_path: Path) -> None:
    srv = EmulatorServer(token=TOKEN, workdir=tmp_path, rate_limits=False).start()
    config = {"image": "t", "init": {"exec": ["sleep", "30"]}}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    machine = httpx.post(
        f"{srv.url}/v1/apps/{APP}/machines",
        headers=headers,
        json={"config": config, "skip_launch": True},
    ).json()
    result: dict[str, Any] = {}

    def waiter() -> None:
        result["response"] = httpx.get(
            f"{srv.url}/v1/apps/{APP}/machines/{machine['id']}/wait",
            params={"state": "started", "timeout": 60},
            headers=headers,
            timeout=30,
        )

    thread = threading.Thread(target=waiter)
    thread.start()
    wait_for(lambda: srv.emulator.stats()["waiters"] == 1, 10, interval=0.01)
    begun = time.monotonic()
    srv.stop()
    thread.join(10)
    assert time.monotonic() - begun < 5
    assert result["response"].status_code == 503
