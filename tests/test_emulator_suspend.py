"""Suspend and resume on the emulator, over real HTTP, with real Machine processes.

Suspend freezes a Machine's whole session (work-horses in groups of their own included),
start resumes the same processes, billing pauses in between, and a Machine can suspend
itself through its local API socket without a token, as through ``/.fly/api`` on Fly.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from django_flyworkers.emulator import LOCAL_API_ENV, EmulatorControl, EmulatorServer
from django_flyworkers.testing import wait_for
from tests.procfs import proc_state

TOKEN = "emu-suspend-token"
APP = "suspend-app"

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")

# A main process and a child in a process group of its own (as an rq work-horse is), each
# counting heartbeats into a file every 20 ms.
BEATING = """
import os, time
mid = os.environ["FLY_MACHINE_ID"]
def beat(name):
    n = 0
    while True:
        n += 1
        with open(f"{name}-{mid}.tmp", "w") as f:
            f.write(str(n))
        os.replace(f"{name}-{mid}.tmp", f"{name}-{mid}")
        time.sleep(0.02)
pid = os.fork()
if pid == 0:
    os.setpgrp()
    beat("horse")
with open(f"horse-pid-{mid}", "w") as f:
    f.write(str(pid))
beat("main")
"""

# Suspends its own Machine through the local API socket, without a token, then records the
# answer: it can only do so after it has been resumed.
SELF_SUSPEND = """
import json, os, time
import httpx
mid, app = os.environ["FLY_MACHINE_ID"], os.environ["FLY_APP_NAME"]
transport = httpx.HTTPTransport(uds=os.environ["FLYWORKERS_LOCAL_API_SOCKET"])
with httpx.Client(transport=transport, base_url="http://flaps") as api:
    response = api.post(f"/v1/apps/{app}/machines/{mid}/suspend")
with open(f"answer-{mid}.tmp", "w") as f:
    json.dump({"status": response.status_code, "body": response.json()}, f)
os.replace(f"answer-{mid}.tmp", f"answer-{mid}")
time.sleep(60)
"""


@dataclass
class Rig:
    """An emulator on a real socket, a Machines API client and a control client."""

    server: EmulatorServer
    fly: httpx.Client
    ctl: EmulatorControl


@contextlib.contextmanager
def running_emulator(workdir: Path, **options: Any) -> Iterator[Rig]:
    server = EmulatorServer(token=TOKEN, workdir=workdir, rate_limits=False, **options).start()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with (
            httpx.Client(base_url=server.url + "/v1", headers=headers, timeout=30) as fly,
            EmulatorControl(server.url, TOKEN) as ctl,
        ):
            yield Rig(server, fly, ctl)
    finally:
        server.stop()
    assert server.emulator.leftover_pids() == []


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with running_emulator(tmp_path) as made:
        yield made


@pytest.fixture
def fly(rig: Rig) -> httpx.Client:
    return rig.fly


@pytest.fixture
def ctl(rig: Rig) -> EmulatorControl:
    return rig.ctl


def create(fly: httpx.Client, cmd: list[str], **extra: Any) -> Any:
    config = {"image": "test:latest", "init": {"exec": cmd}, "restart": {"policy": "no"}, **extra}
    response = fly.post(f"/apps/{APP}/machines", json={"config": config})
    assert response.status_code == 200, response.text
    return response.json()


def post(fly: httpx.Client, machine: dict[str, Any], action: str) -> httpx.Response:
    return fly.post(f"/apps/{APP}/machines/{machine['id']}/{action}")


def wait(fly: httpx.Client, machine: dict[str, Any], state: str, timeout: int = 10) -> Any:
    params: dict[str, Any] = {"state": state, "timeout": timeout}
    if state == "stopped":
        params["instance_id"] = machine["instance_id"]
    return fly.get(f"/apps/{APP}/machines/{machine['id']}/wait", params=params)


def reach(fly: httpx.Client, machine: dict[str, Any], state: str) -> None:
    response = wait(fly, machine, state)
    assert response.status_code == 200, response.text


def beats(workdir: Path, name: str, machine_id: str) -> int:
    path = workdir / f"{name}-{machine_id}"
    return int(path.read_text()) if path.exists() else 0


class Beating:
    """A started BEATING Machine: its id, main pid and work-horse pid."""

    def __init__(self, fly: httpx.Client, ctl: EmulatorControl, workdir: Path) -> None:
        self.machine = create(fly, ["python", "-c", BEATING])
        self.id = self.machine["id"]
        self.workdir = workdir
        wait_for(lambda: self.beats("main") > 2 and self.beats("horse") > 2, 10, interval=0.02)
        self.main = ctl.stats()["machines"][self.id]["pid"]
        self.horse = int((workdir / f"horse-pid-{self.id}").read_text())

    def beats(self, name: str) -> int:
        return beats(self.workdir, name, self.id)

    def states(self) -> set[str]:
        return {proc_state(self.main), proc_state(self.horse)}

    def suspend(self, fly: httpx.Client) -> None:
        """Suspend it and wait until Fly's API says it is suspended."""
        assert post(fly, self.machine, "suspend").json() == {"ok": True}
        reach(fly, self.machine, "suspended")

    def dead(self) -> bool:
        """Both processes gone (an orphan may stay a zombie where PID 1 does not reap)."""
        return self.states() <= {"", "Z", "X"}


def machine_stats(ctl: EmulatorControl, machine_id: str) -> Any:
    return ctl.stats()["machines"][machine_id]


def test_suspend_freezes_the_whole_session_and_start_resumes_it(
    fly: httpx.Client, ctl: EmulatorControl, tmp_path: Path
) -> None:
    m = Beating(fly, ctl, tmp_path)
    assert os.getpgid(m.horse) != m.main  # the work-horse left the main process's group
    m.suspend(fly)
    wait_for(lambda: m.states() == {"T"}, 5, interval=0.01)
    frozen = (m.beats("main"), m.beats("horse"))
    billed = machine_stats(ctl, m.id)["billed_seconds"]

    # A wait for "started" on a suspended Machine runs out (as on Fly): a second in which
    # nothing may run and nothing may be billed.
    assert wait(fly, m.machine, "started", timeout=1).status_code == 408
    assert (m.beats("main"), m.beats("horse")) == frozen
    assert m.states() == {"T"}
    assert machine_stats(ctl, m.id)["billed_seconds"] == billed

    response = post(fly, m.machine, "start")
    assert response.json() == {"previous_state": "suspended", "migrated": False, "new_host": ""}
    reach(fly, m.machine, "started")
    # The same processes carry on from where they were frozen.
    wait_for(lambda: m.beats("main") > frozen[0] and m.beats("horse") > frozen[1], 10)
    assert m.states() <= {"R", "S"}
    assert machine_stats(ctl, m.id)["pid"] == m.main
    wait_for(lambda: machine_stats(ctl, m.id)["billed_seconds"] > billed, 10, interval=0.02)
    stats = machine_stats(ctl, m.id)
    assert (stats["starts"], stats["suspends"], stats["resumes"]) == (1, 1, 1)
    events = fly.get(f"/apps/{APP}/machines/{m.id}/events").json()
    assert [(e["type"], e["status"], e["source"]) for e in events[:3]] == [
        ("start", "started", "flyd"),
        ("suspend", "suspended", "flyd"),
        ("suspend", "suspending", "user"),
    ]


def test_suspend_refusals_are_fly_shaped(fly: httpx.Client) -> None:
    parked = fly.post(
        f"/apps/{APP}/machines",
        json={"config": {"image": "t", "init": {"exec": ["sleep", "30"]}}, "skip_launch": True},
    ).json()
    response = post(fly, parked, "suspend")
    assert (response.status_code, response.json()) == (
        412,
        {"error": "failed_precondition: unable to suspend machine from current state: 'created'"},
    )
    big = create(fly, ["sleep", "30"], guest={"cpus": 2, "memory_mb": 4096})
    reach(fly, big, "started")
    response = post(fly, big, "suspend")
    assert (response.status_code, response.json()) == (
        412,
        {
            "error": "failed_precondition: machine cannot be suspended: its memory (4096 MB) "
            "is over the 2048 MB limit for suspend"
        },
    )
    assert fly.get(f"/apps/{APP}/machines/{big['id']}").json()["state"] == "started"


def test_stop_of_a_suspended_machine_kills_it_and_the_next_start_is_cold(
    fly: httpx.Client, ctl: EmulatorControl, tmp_path: Path
) -> None:
    m = Beating(fly, ctl, tmp_path)
    m.suspend(fly)
    assert post(fly, m.machine, "stop").json() == {"ok": True}
    reach(fly, m.machine, "stopped")
    wait_for(m.dead, 10, interval=0.02)  # the work-horse died too
    events = fly.get(f"/apps/{APP}/machines/{m.id}/events").json()
    exit_event = next(e for e in events if e["type"] == "exit")["request"]["exit_event"]
    assert (exit_event["exit_code"], exit_event["requested_stop"]) == (137, True)
    assert post(fly, m.machine, "start").json()["previous_state"] == "stopped"
    reach(fly, m.machine, "started")
    stats = machine_stats(ctl, m.id)
    assert (stats["starts"], stats["resumes"]) == (2, 0)
    assert stats["pid"] != m.main


def test_destroy_of_a_suspended_machine_needs_no_force(
    fly: httpx.Client, ctl: EmulatorControl, tmp_path: Path
) -> None:
    m = Beating(fly, ctl, tmp_path)
    m.suspend(fly)
    assert fly.delete(f"/apps/{APP}/machines/{m.id}").json() == {"ok": True}
    reach(fly, m.machine, "destroyed")
    wait_for(m.dead, 10, interval=0.02)


def test_start_interrupts_a_suspend_in_progress(tmp_path: Path) -> None:
    # Fly: "Machines can now start from the suspending state" (the VM is resumed as if the
    # suspend never happened).
    with running_emulator(tmp_path, suspend_delay=30) as rig:
        fly, ctl = rig.fly, rig.ctl
        m = Beating(fly, ctl, tmp_path)
        post(fly, m.machine, "suspend")
        assert fly.get(f"/apps/{APP}/machines/{m.id}").json()["state"] == "suspending"
        wait_for(lambda: m.states() == {"T"}, 5, interval=0.01)
        assert post(fly, m.machine, "start").json()["previous_state"] == "suspending"
        reach(fly, m.machine, "started")
        frozen = m.beats("main")
        wait_for(lambda: m.beats("main") > frozen, 10, interval=0.02)
        events = fly.get(f"/apps/{APP}/machines/{m.id}/events").json()
        assert ("suspend", "suspended") not in {(e["type"], e["status"]) for e in events}
        assert machine_stats(ctl, m.id)["resumes"] == 1


def test_stopping_the_emulator_kills_suspended_sessions(tmp_path: Path) -> None:
    with running_emulator(tmp_path) as rig:
        fly, ctl = rig.fly, rig.ctl
        kept, reset = Beating(fly, ctl, tmp_path), Beating(fly, ctl, tmp_path)
        for m in (kept, reset):
            m.suspend(fly)
            wait_for(lambda m=m: m.states() == {"T"}, 5, interval=0.01)
        sockets = [Path(p["local_api_socket"]) for p in ctl.stats()["machines"].values()]
        assert all(path.is_socket() for path in sockets)
        ctl.reset()
        assert reset.dead() and kept.dead()
        assert not any(path.exists() for path in sockets)
        kept = Beating(fly, ctl, tmp_path)
        kept.suspend(fly)
        rig.server.stop()
        assert rig.server.emulator.leftover_pids() == []
        assert kept.dead()


def test_a_machine_suspends_itself_through_its_local_api(
    fly: httpx.Client, ctl: EmulatorControl, tmp_path: Path
) -> None:
    machine = create(fly, ["python", "-c", SELF_SUSPEND])
    answer = tmp_path / f"answer-{machine['id']}"
    reach(fly, machine, "suspended")
    # Frozen before the answer could reach it: it cannot have written it.
    assert not answer.exists()
    assert post(fly, machine, "start").json()["previous_state"] == "suspended"
    wait_for(answer.exists, 10, interval=0.02)
    assert answer.read_text() == '{"status": 200, "body": {"ok": true}}'
    stats = ctl.stats()
    assert stats["calls"]["suspend"] == 1
    assert (
        stats["machines"][machine["id"]]["starts"],
        stats["machines"][machine["id"]]["resumes"],
    ) == (1, 1)


def test_the_local_api_acts_on_its_own_machine_only(
    fly: httpx.Client, ctl: EmulatorControl
) -> None:
    own, other = create(fly, ["sleep", "30"]), create(fly, ["sleep", "30"])
    reach(fly, own, "started")
    path = ctl.stats()["machines"][own["id"]]["local_api_socket"]
    assert Path(path).is_socket()
    transport = httpx.HTTPTransport(uds=path)
    with httpx.Client(transport=transport, base_url="http://flaps", timeout=10) as local:
        mine = local.get(f"/v1/apps/{APP}/machines/{own['id']}")  # no token
        assert (mine.status_code, mine.json()["id"]) == (200, own["id"])
        assert local.get(f"/v1/apps/{APP}").json()["name"] == APP
        for denied in (
            local.get(f"/v1/apps/{APP}/machines/{other['id']}"),
            local.post(f"/v1/apps/{APP}/machines/{other['id']}/stop"),
            local.get(f"/v1/apps/{APP}/machines"),
            local.get("/v1/apps/another-app"),
        ):
            assert denied.status_code == 403
            assert denied.json()["error"].startswith("permission_denied: ")
        assert local.get("/_emulator/stats").status_code == 404
        assert local.post(f"/v1/apps/{APP}/machines/{own['id']}/suspend").json() == {"ok": True}
    reach(fly, own, "suspended")
    assert fly.delete(f"/apps/{APP}/machines/{own['id']}").status_code == 200
    reach(fly, own, "destroyed")
    wait_for(lambda: not Path(path).exists(), 10, interval=0.02)


def test_machines_get_the_local_api_socket_in_their_environment(
    fly: httpx.Client, ctl: EmulatorControl, tmp_path: Path
) -> None:
    script = (
        "import os; open('env-' + os.environ['FLY_MACHINE_ID'], 'w')"
        f".write(os.environ['{LOCAL_API_ENV}'])"
    )
    machine = create(fly, ["python", "-c", script])
    reach(fly, machine, "stopped")
    written = (tmp_path / f"env-{machine['id']}").read_text()
    assert written == ctl.stats()["machines"][machine["id"]]["local_api_socket"]
    assert LOCAL_API_ENV == "FLYWORKERS_LOCAL_API_SOCKET"


def test_ps_lists_the_session_of_a_started_machine(
    fly: httpx.Client, ctl: EmulatorControl, tmp_path: Path
) -> None:
    m = Beating(fly, ctl, tmp_path)
    response = fly.get(f"/apps/{APP}/machines/{m.id}/ps")
    assert response.status_code == 200
    processes = {p["pid"]: p for p in response.json()}
    assert {m.main, m.horse} <= set(processes)
    main = processes[m.main]
    assert set(main) == {
        "pid",
        "command",
        "directory",
        "cpu",
        "rss",
        "stime",
        "rtime",
        "listen_sockets",
    }
    assert "python" in main["command"] and "FLY_MACHINE_ID" in main["command"]
    assert Path(main["directory"]) == tmp_path.resolve()
    assert main["rss"] > 0
    m.suspend(fly)
    response = fly.get(f"/apps/{APP}/machines/{m.id}/ps")
    assert response.status_code == 412
    assert "is not running" in response.json()["error"]
