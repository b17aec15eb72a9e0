"""The emulator's HTTP API in-process (httpx.WSGITransport), with real Machine processes."""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from django_flyworkers.emulator import Emulator, EmulatorControl, EmulatorControlError
from django_flyworkers.testing import wait_for

TOKEN = "emu-test-token"
APP = "emu-app"
SLEEP = ["sleep", "30"]


@pytest.fixture
def make_emulator(tmp_path: Path) -> Iterator[Callable[..., Emulator]]:
    made: list[Emulator] = []

    def make(**options: Any) -> Emulator:
        options = {"rate_limits": False, "destroyed_ttl": 0.5, **options}
        emulator = Emulator(token=TOKEN, workdir=tmp_path, **options)
        made.append(emulator)
        return emulator

    yield make
    for emulator in made:
        emulator.shutdown()
        assert emulator.leftover_pids() == []


@pytest.fixture
def emu(make_emulator: Callable[..., Emulator]) -> Emulator:
    return make_emulator()


def client_for(emulator: Emulator, **headers: str) -> httpx.Client:
    return httpx.Client(
        transport=httpx.WSGITransport(app=emulator),
        base_url="http://fly.invalid/v1",
        headers={"Authorization": f"Bearer {TOKEN}", **headers},
        timeout=30,
    )


@pytest.fixture
def fly(emu: Emulator) -> Iterator[httpx.Client]:
    with client_for(emu) as client:
        yield client


@pytest.fixture
def ctl(emu: Emulator) -> EmulatorControl:
    return EmulatorControl("http://fly.invalid", TOKEN, transport=httpx.WSGITransport(app=emu))


def machine_config(cmd: list[str], **extra: Any) -> dict[str, Any]:
    return {"image": "test:latest", "init": {"cmd": cmd}, "restart": {"policy": "no"}, **extra}


def create(fly: httpx.Client, cmd: list[str] = SLEEP, body: Any = None, **extra: Any) -> Any:
    response = fly.post(
        f"/apps/{APP}/machines", json={"config": machine_config(cmd, **extra), **(body or {})}
    )
    assert response.status_code == 200, response.text
    return response.json()


def wait(
    fly: httpx.Client, machine: dict[str, Any], state: str, timeout: int = 10, **params: Any
) -> httpx.Response:
    if state == "stopped":
        params.setdefault("instance_id", machine["instance_id"])
    return fly.get(
        f"/apps/{APP}/machines/{machine['id']}/wait",
        params={"state": state, "timeout": timeout, **params},
    )


def reach(fly: httpx.Client, machine: dict[str, Any], state: str, timeout: int = 10) -> None:
    response = wait(fly, machine, state, timeout)
    assert response.status_code == 200, response.text


def get(fly: httpx.Client, machine: dict[str, Any]) -> Any:
    response = fly.get(f"/apps/{APP}/machines/{machine['id']}")
    assert response.status_code == 200, response.text
    return response.json()


def post(fly: httpx.Client, machine: dict[str, Any], action: str, **kwargs: Any) -> httpx.Response:
    return fly.post(f"/apps/{APP}/machines/{machine['id']}/{action}", **kwargs)


def exits(fly: httpx.Client, machine: dict[str, Any]) -> list[dict[str, Any]]:
    """Exit events, oldest first."""
    events = get(fly, machine)["events"]
    return [e["request"] for e in reversed(events) if e["type"] == "exit"]


# -- auth, routing, shapes ----------------------------------------------------------------


def test_auth(emu: Emulator) -> None:
    transport = httpx.WSGITransport(app=emu)
    with httpx.Client(transport=transport, base_url="http://fly.invalid/v1") as raw:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = raw.get(f"/apps/{APP}/machines", headers=headers)
            assert (response.status_code, response.json()) == (401, {"error": "unauthorized"})
        for scheme in ("Bearer", "FlyV1", "Bearer FlyV1"):
            response = raw.get(
                f"/apps/{APP}/machines", headers={"Authorization": f"{scheme} {TOKEN}"}
            )
            assert (response.status_code, response.json()) == (200, [])
        assert raw.post("/../_emulator/reset").status_code == 401


def test_unknown_route_and_method(fly: httpx.Client) -> None:
    for response in (
        fly.get("/apps/x/volumes"),
        fly.post(f"/apps/{APP}/machines/0123456789abcd/exec"),
        fly.get(f"/apps/{APP}/machines/0123456789abcd/memory"),
        fly.get("/orgs/personal/machines"),
        fly.delete("/nothing/here"),
    ):
        assert (response.status_code, response.text) == (404, "404 page not found")
        assert response.headers["content-type"].startswith("text/plain")
    wrong_method = fly.put(f"/apps/{APP}/machines")
    assert wrong_method.status_code == 405
    assert wrong_method.headers["allow"] == "GET, POST"


def test_machine_json_shape(fly: httpx.Client) -> None:
    before = time.time()
    extra = {"services": [], "dns": {}, "guest": {"cpus": 1, "memory_mb": 512}}
    machine = create(fly, SLEEP, body={"skip_secrets": True, "lsvd": False, "nonsense": 1}, **extra)
    assert machine["state"] == "created"
    assert re.fullmatch(r"[0-9a-f]{14}", machine["id"])
    assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", machine["instance_id"])
    assert machine["version"] == machine["instance_id"]
    assert re.fullmatch(r"[a-z]+-[a-z]+-\d{4}", machine["name"])
    assert machine["region"] == "iad"
    assert re.fullmatch(r"127\.\d+\.\d+\.\d+", machine["private_ip"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", machine["created_at"])
    assert machine["image_ref"]["repository"] == "library/test"
    assert machine["config"] == machine_config(SLEEP, **extra)
    assert (machine["host_status"], machine["cordoned"], machine["checks"]) == ("ok", False, [])
    assert "nonce" not in machine
    (launch,) = machine["events"]
    assert (launch["type"], launch["status"], launch["source"]) == ("launch", "created", "user")
    assert before * 1000 - 1000 <= launch["timestamp"] <= time.time() * 1000 + 1000
    reach(fly, machine, "started")
    events = get(fly, machine)["events"]
    assert [e["type"] for e in events] == ["start", "launch"]  # newest first


def test_not_found_and_bad_requests(fly: httpx.Client) -> None:
    response = fly.get(f"/apps/{APP}/machines/0123456789abcd")
    assert (response.status_code, response.json()) == (
        404,
        {"error": "not_found: machine not found"},
    )
    response = fly.post(f"/apps/{APP}/machines", content=b"{nope")
    assert response.status_code == 400
    assert response.json()["error"].startswith("invalid_argument: request body is not valid JSON")
    response = fly.post(f"/apps/{APP}/machines", json={"config": {"image": "x"}})
    assert response.status_code == 400
    assert "config.init.exec, config.init.cmd" in response.json()["error"]


def test_apps_exist_on_first_use(fly: httpx.Client) -> None:
    assert fly.get("/apps/anything").json()["name"] == "anything"
    response = fly.post("/apps", json={"app_name": "new-app", "org_slug": "personal"})
    assert response.status_code == 201
    assert set(response.json()) == {"id", "created_at"}


def test_apps_list_create_delete(fly: httpx.Client, emu: Emulator) -> None:
    # The calls fly-admin (npm, typed from Fly's OpenAPI spec) makes.
    assert fly.post("/apps", json={"app_name": "other", "org_slug": "acme"}).status_code == 201
    machine = create(fly, SLEEP)
    reach(fly, machine, "started")
    listed = fly.get("/apps", params={"org_slug": "personal"})
    assert listed.status_code == 200
    body = listed.json()
    assert body["total_apps"] == 1
    (app,) = body["apps"]
    assert (app["name"], app["machine_count"], app["network"]) == (APP, 1, "default")
    assert fly.get("/apps", params={"org_slug": "acme"}).json()["apps"][0]["name"] == "other"
    missing = fly.get("/apps")
    assert missing.status_code == 400
    assert "org_slug is required" in missing.json()["error"]
    taken = fly.post("/apps", json={"app_name": APP, "org_slug": "personal"})
    assert (taken.status_code, taken.json()["status"]) == (422, "name_taken")

    refused = fly.delete(f"/apps/{APP}")
    assert refused.status_code == 412
    assert "still active" in refused.json()["error"]
    deleted = fly.delete(f"/apps/{APP}", params={"force": "true"})
    assert (deleted.status_code, deleted.content) == (202, b"")
    reach(fly, machine, "destroyed")
    assert fly.get("/apps", params={"org_slug": "personal"}).json() == {
        "total_apps": 0,
        "apps": [],
    }
    assert fly.get(f"/apps/{APP}/machines").json() == []
    assert fly.delete(f"/apps/{APP}").status_code == 404
    assert fly.delete("/apps/other").status_code == 202
    wait_for(lambda: emu.stats()["live_processes"] == 0, 10, interval=0.02)


def test_duplicate_name_is_409(fly: httpx.Client) -> None:
    create(fly, SLEEP, body={"name": "w1", "skip_launch": True})
    response = fly.post(
        f"/apps/{APP}/machines", json={"name": "w1", "config": machine_config(SLEEP)}
    )
    assert response.status_code == 409
    assert response.json()["status"] == "name_taken"


# -- acceptance: lifecycle, billing, rate limits ------------------------------------------


def test_run_to_exit_twice_bills_about_two_seconds(fly: httpx.Client, ctl: EmulatorControl) -> None:
    machine = create(fly, ["python", "-c", "import time; time.sleep(1)"])
    reach(fly, machine, "started")
    reach(fly, machine, "stopped")
    response = post(fly, machine, "start")
    assert response.json() == {"previous_state": "stopped", "migrated": False, "new_host": ""}
    reach(fly, machine, "stopped")
    stats = ctl.stats()
    mine = stats["machines"][machine["id"]]
    assert 1.7 <= mine["billed_seconds"] <= 3.5
    assert 1.7 <= stats["total_billed_seconds"] <= 3.5
    assert (mine["state"], mine["starts"], mine["exit_codes"]) == ("stopped", 2, [0, 0])
    assert Path(mine["log"]).read_text().count("exited: returncode 0") == 2
    assert [e["exit_event"]["requested_stop"] for e in exits(fly, machine)] == [False, False]
    assert stats["calls"]["start"] == 1 and stats["calls"]["wait"] == 3


class SteppedClock:
    """A clock that moves only when told to, so token buckets refill exactly when we say."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limits(make_emulator: Callable[..., Emulator]) -> None:
    clock = SteppedClock()
    emulator = make_emulator(rate_limits=True, rate_limit_clock=clock)
    ctl = EmulatorControl("http://x", TOKEN, transport=httpx.WSGITransport(app=emulator))
    with client_for(emulator) as fly:
        machine = create(fly, SLEEP)
        reach(fly, machine, "started")
        responses = [post(fly, machine, "start") for _ in range(10)]
        limited = [r for r in responses if r.status_code == 429]
        # Fly's default bucket: a burst of 3, then nothing until it refills (1/s).
        assert [r.status_code for r in responses] == [200] * 3 + [429] * 7
        for response in limited:
            assert response.json() == {"error": "resource_exhausted: rate limit exceeded"}
            assert "retry-after" not in response.headers
        assert ctl.stats()["rate_limited"]["start"] == len(limited)
        clock.now += 1.0
        assert [post(fly, machine, "start").status_code for _ in range(2)] == [200, 429]
        ctl.set_rate_limits(False)
        assert all(post(fly, machine, "start").status_code == 200 for _ in range(10))
        ctl.set_rate_limits(True)
        gets = [get_status(fly, machine) for _ in range(15)]
        assert gets == [200] * 10 + [429] * 5  # get: a burst of 10
        clock.now += 0.21  # get refills 5/s: one token (and a bit)
        assert get_status(fly, machine) == 200
        post(fly, machine, "stop", json={"timeout": "1s"})


def test_rate_limit_speed_keeps_bursts_and_scales_refill(
    make_emulator: Callable[..., Emulator],
) -> None:
    clock = SteppedClock()
    emulator = make_emulator(rate_limits=True, rate_limit_clock=clock)
    ctl = EmulatorControl("http://x", TOKEN, transport=httpx.WSGITransport(app=emulator))
    with client_for(emulator) as fly:
        assert ctl.stats()["rate_limit_speed"] == 1.0
        ctl.set_rate_limits(True, speed=20)
        assert [fly.get(f"/apps/{APP}/machines").status_code for _ in range(4)] == [200] * 3 + [429]
        clock.now += 0.06  # one token (and a bit) at 20 x Fly's 1/s
        assert [fly.get(f"/apps/{APP}/machines").status_code for _ in range(2)] == [200, 429]
        with pytest.raises(EmulatorControlError, match="speed must be a positive number"):
            ctl.set_rate_limits(True, speed=0)


def get_status(fly: httpx.Client, machine: dict[str, Any]) -> int:
    return fly.get(f"/apps/{APP}/machines/{machine['id']}").status_code


# -- processes: env, policies, stop, suspend ----------------------------------------------

ENV_DUMP = """
import json, os, sys
keys = [k for k in os.environ if k.startswith("FLY") or k in ("FOO", "SECRET", "PATH")]
data = {"env": {k: os.environ[k] for k in keys}, "python": sys.executable, "cwd": os.getcwd()}
with open(f"env-{os.environ['FLY_MACHINE_ID']}.json", "w") as f:
    json.dump(data, f)
"""


def test_env_injection_and_python_rewrite(
    make_emulator: Callable[..., Emulator], tmp_path: Path
) -> None:
    emulator = make_emulator(env={"SECRET": "app-secret", "FOO": "from-secrets"})
    with client_for(emulator) as fly:
        machine = create(
            fly,
            ["python", "-c", ENV_DUMP],
            env={"FOO": "from-config"},
            guest={"memory_mb": 1024},
            body={"region": "ams"},
        )
        reach(fly, machine, "stopped")
        dump = json.loads((tmp_path / f"env-{machine['id']}.json").read_text())
    assert dump["python"] == sys.executable
    assert Path(dump["cwd"]) == tmp_path.resolve()
    env = dump["env"]
    assert env["SECRET"] == "app-secret"
    assert env["FOO"] == "from-config"
    assert env["PATH"]
    assert env["FLY_APP_NAME"] == APP
    assert env["FLY_MACHINE_ID"] == env["FLY_ALLOC_ID"] == machine["id"]
    assert env["FLY_REGION"] == "ams"
    assert env["FLY_IMAGE_REF"] == "test:latest"
    assert env["FLY_MACHINE_VERSION"] == machine["instance_id"]
    assert env["FLY_PRIVATE_IP"] == machine["private_ip"]
    assert env["FLY_VM_MEMORY_MB"] == "1024"
    assert env["FLYWORKERS_LOCAL_API_SOCKET"].endswith(f"/{machine['id']}.sock")


def test_on_failure_retries_then_stops(fly: httpx.Client, ctl: EmulatorControl) -> None:
    machine = create(
        fly, ["sh", "-c", "exit 3"], restart={"policy": "on-failure", "max_retries": 2}
    )
    wait_for(
        lambda: get(fly, machine)["state"] == "stopped" and len(exits(fly, machine)) == 3,
        10,
        interval=0.02,
    )
    events = [e["exit_event"] for e in exits(fly, machine)]
    assert [e["exit_code"] for e in events] == [3, 3, 3]
    assert [e["restarting"] for e in events] == [True, True, False]
    assert [e["restart_count"] for e in exits(fly, machine)] == [1, 2, 2]
    stats = ctl.stats()["machines"][machine["id"]]
    assert (stats["starts"], stats["exit_codes"]) == (3, [3, 3, 3])


def test_always_restarts(fly: httpx.Client, ctl: EmulatorControl) -> None:
    machine = create(fly, ["true"], restart={"policy": "always"}, auto_destroy=True)
    wait_for(lambda: ctl.stats()["machines"][machine["id"]]["starts"] >= 4, 10, interval=0.02)
    assert get(fly, machine)["state"] == "started"
    assert all(e["exit_event"]["restarting"] for e in exits(fly, machine))
    assert post(fly, machine, "stop").status_code == 200
    # Stopped by request, so auto_destroy now applies.
    reach(fly, machine, "destroyed")


def test_auto_destroy(fly: httpx.Client) -> None:
    machine = create(fly, ["sh", "-c", "exit 0"], auto_destroy=True)
    reach(fly, machine, "destroyed")
    body = get(fly, machine)
    assert body["state"] == "destroyed"
    assert [e["type"] for e in body["events"]][:2] == ["destroy", "exit"]
    assert wait(fly, machine, "started", 1).status_code == 404
    wait_for(lambda: get_status(fly, machine) == 404, 10, interval=0.02)
    assert fly.get(f"/apps/{APP}/machines").json() == []
    listed = fly.get(f"/apps/{APP}/machines", params={"include_deleted": "true"}).json()
    assert [m["id"] for m in listed] == [machine["id"]]


IGNORE_TERM = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open("ready-" + __import__("os").environ["FLY_MACHINE_ID"], "w").close()
time.sleep(60)
"""


def test_stop_escalates_to_sigkill(fly: httpx.Client, tmp_path: Path) -> None:
    machine = create(fly, ["python", "-c", IGNORE_TERM])
    wait_for(lambda: (tmp_path / f"ready-{machine['id']}").exists(), 10, interval=0.02)
    started = time.monotonic()
    assert post(fly, machine, "stop", json={"signal": "SIGTERM", "timeout": "1s"}).json() == {
        "ok": True
    }
    assert get(fly, machine)["state"] == "stopping"
    reach(fly, machine, "stopped")
    assert 0.9 <= time.monotonic() - started <= 4
    (event,) = exits(fly, machine)
    assert event["exit_event"]["exit_code"] == 137
    assert event["exit_event"]["signal"] == 9
    assert event["exit_event"]["requested_stop"] is True


def test_stop_fly_go_body_and_noops(fly: httpx.Client) -> None:
    machine = create(fly, SLEEP)
    reach(fly, machine, "started")
    assert post(fly, machine, "start").json()["previous_state"] == "started"
    started = time.monotonic()
    # fly-go always sends the id and "0s"; signal 15 as a number, as fly-go's Kill does.
    response = post(fly, machine, "stop", json={"id": machine["id"], "timeout": "0s", "signal": 15})
    assert response.status_code == 200
    reach(fly, machine, "stopped")
    assert time.monotonic() - started < 2
    assert exits(fly, machine)[0]["exit_event"]["signal"] == 15
    assert post(fly, machine, "stop").json() == {"ok": True}
    response = post(fly, machine, "stop", json={"signal": "SIGWHAT"})
    assert response.status_code == 400


def test_destroy_needs_force(fly: httpx.Client, ctl: EmulatorControl) -> None:
    machine = create(fly, SLEEP)
    reach(fly, machine, "started")
    url = f"/apps/{APP}/machines/{machine['id']}"
    response = fly.delete(url)
    assert response.status_code == 412
    assert response.json()["error"].startswith(
        "failed_precondition: machine still active, refusing to destroy"
    )
    assert fly.delete(url, params={"kill": "true"}).json() == {"ok": True}
    reach(fly, machine, "destroyed")
    wait_for(lambda: get_status(fly, machine) == 404, 10, interval=0.02)
    assert wait(fly, machine, "destroyed").status_code == 404
    assert fly.delete(url).status_code == 404
    assert ctl.stats()["live_processes"] == 0


def test_update(fly: httpx.Client, tmp_path: Path) -> None:
    parked = create(fly, SLEEP, body={"skip_launch": True})
    response = fly.post(
        f"/apps/{APP}/machines/{parked['id']}",
        json={"config": machine_config(SLEEP, env={"V": "2"})},
    )
    assert response.status_code == 200
    updated = response.json()
    assert updated["state"] == "replacing"
    assert updated["instance_id"] != parked["instance_id"]
    assert wait(fly, parked, "stopped", 1).json()["state"] == "replaced"  # old version
    reach(fly, updated, "stopped")
    assert get(fly, parked)["config"]["env"] == {"V": "2"}
    assert next(e["type"] for e in get(fly, parked)["events"]) == "update"

    script = (
        "import os; open('version-' + os.environ['FLY_MACHINE_VERSION'], 'w'); "
        "import time; time.sleep(30)"
    )
    running = create(fly, ["python", "-c", script])
    reach(fly, running, "started")
    response = fly.post(
        f"/apps/{APP}/machines/{running['id']}",
        json={"config": machine_config(["python", "-c", script], env={"V": "3"})},
    )
    new = response.json()
    assert new["state"] == "replacing"
    reach(fly, new, "started")
    old_version = wait(fly, running, "started", 1, instance_id=running["instance_id"])
    assert old_version.status_code == 408  # the old version never will
    wait_for(lambda: (tmp_path / f"version-{new['instance_id']}").exists(), 10, interval=0.02)
    versions = fly.get(f"/apps/{APP}/machines/{running['id']}/versions").json()
    assert [v["version"] for v in versions] == [new["instance_id"], running["instance_id"]]


def test_wait_errors(fly: httpx.Client) -> None:
    machine = create(fly, SLEEP, body={"skip_launch": True})
    range_error = {
        "error": "invalid_argument: invalid WaitMachineRequest.Timeout: value must be inside "
        "range [1s, 1m0s]"
    }
    for timeout in (0, 61, -1):
        response = wait(fly, machine, "started", timeout)
        assert (response.status_code, response.json()) == (400, range_error)
    response = fly.get(f"/apps/{APP}/machines/{machine['id']}/wait", params={"state": "stopped"})
    assert response.status_code == 400
    assert "instance_id" in response.json()["error"]
    assert wait(fly, machine, "running").status_code == 400
    begun = time.monotonic()
    response = wait(fly, machine, "started", 1)
    assert time.monotonic() - begun >= 0.95
    assert (response.status_code, response.json()) == (
        408,
        {
            "error": "deadline_exceeded: machine failed to reach desired state, started, "
            "currently created"
        },
    )
    response = fly.get(f"/apps/{APP}/machines/00000000000000/wait", params={"timeout": 1})
    assert response.status_code == 404
    ok = wait(fly, machine, "stopped,settled", 1, instance_id=machine["instance_id"])
    assert ok.json()["state"] == "created"
    ok = fly.get(
        f"/apps/{APP}/machines/{machine['id']}/wait",
        params=[("state", "suspended"), ("state", "settled"), ("timeout", "1")],
    )
    assert ok.status_code == 200


def test_wait_wakes_on_state_change(fly: httpx.Client, emu: Emulator) -> None:
    machine = create(fly, SLEEP, body={"skip_launch": True})
    result: dict[str, Any] = {}

    def waiter() -> None:
        with client_for(emu) as other:
            result["response"] = wait(other, machine, "started", 30)
            result["at"] = time.monotonic()

    thread = threading.Thread(target=waiter)
    thread.start()
    wait_for(lambda: emu.stats()["waiters"] == 1, 10, interval=0.01)
    assert emu.stats()["machines"][machine["id"]]["waiters"] == 1
    started = time.monotonic()
    post(fly, machine, "start")
    thread.join(10)
    assert result["response"].status_code == 200
    assert result["at"] - started < 0.5
    assert emu.stats()["waiters"] == 0


# -- leases -------------------------------------------------------------------------------


def test_leases(fly: httpx.Client) -> None:
    machine = create(fly, SLEEP)
    reach(fly, machine, "started")
    url = f"/apps/{APP}/machines/{machine['id']}/lease"
    response = fly.post(url, json={"ttl": 30, "description": "deploy"})
    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "success"
    lease = body["data"]
    assert set(lease) == {"nonce", "expires_at", "owner", "description", "version"}
    assert lease["description"] == "deploy"
    assert int(time.time()) + 28 <= lease["expires_at"] <= int(time.time()) + 31

    held = fly.post(url, params={"ttl": 30})
    assert held.status_code == 409
    assert held.json()["code"] == "invalid"
    assert held.json()["message"].startswith(f"machine ID {machine['id']} lease currently held by")
    nonce = {"fly-machine-lease-nonce": lease["nonce"]}
    refreshed = fly.post(url, params={"ttl": 60}, headers=nonce)
    assert refreshed.status_code == 201
    assert refreshed.json()["data"]["nonce"] == lease["nonce"]
    assert fly.get(url).json()["data"]["nonce"] == lease["nonce"]

    blocked = post(fly, machine, "stop")
    assert blocked.status_code == 409
    assert blocked.json()["error"].startswith(
        f"aborted: machine ID {machine['id']} lease currently held by emulator@tokens.fly.io, "
        "expires at "
    )
    assert post(fly, machine, "stop", json={"timeout": "1s"}, headers=nonce).status_code == 200
    assert fly.delete(url).status_code == 400
    assert fly.delete(url, headers={"fly-machine-lease-nonce": "wrong"}).status_code == 400
    released = fly.delete(url, headers=nonce)
    assert released.json() == {"status": "success", "data": {"ok": True}}
    missing = fly.get(url)
    assert missing.status_code == 404
    assert "lease not found" in missing.json()["message"]

    leased = create(fly, SLEEP, body={"lease_ttl": 30, "skip_launch": True})
    assert len(leased["nonce"]) == 12
    assert post(fly, leased, "start").status_code == 409
    start = post(fly, leased, "start", headers={"fly-machine-lease-nonce": leased["nonce"]})
    assert start.status_code == 200


# -- list, metadata, events, cordon -------------------------------------------------------


def test_list_filters(fly: httpx.Client) -> None:
    a = create(fly, SLEEP, metadata={"queue": "default", "team": "x"}, body={"skip_launch": True})
    b = create(fly, SLEEP, metadata={"queue": "images"}, body={"region": "ams"})
    c = create(
        fly, SLEEP, metadata={"queue": "default"}, body={"skip_launch": True, "region": "ams"}
    )
    reach(fly, b, "started")

    def ids(**params: str) -> list[str]:
        response = fly.get(f"/apps/{APP}/machines", params=params)
        assert response.status_code == 200
        return [m["id"] for m in response.json()]

    assert ids() == [a["id"], b["id"], c["id"]]
    assert ids(**{"metadata.queue": "default"}) == [a["id"], c["id"]]
    assert ids(**{"metadata.queue": "default", "metadata.team": "x"}) == [a["id"]]
    assert ids(region="ams") == [b["id"], c["id"]]
    assert ids(state="started") == [b["id"]]
    assert ids(state="created,started") == [a["id"], b["id"], c["id"]]
    assert fly.get(f"/apps/{APP}/machines?created").json()[0]["id"] == a["id"]
    summary = fly.get(f"/apps/{APP}/machines", params={"summary": "true"}).json()
    assert "config" not in summary[0] and "events" not in summary[0]
    assert fly.get("/apps/other-app/machines").json() == []


def test_metadata_events_cordon(fly: httpx.Client) -> None:
    machine = create(fly, SLEEP, metadata={"a": "1"}, body={"skip_launch": True})
    base = f"/apps/{APP}/machines/{machine['id']}"
    assert fly.post(f"{base}/metadata/b", json={"value": "2"}).status_code == 204
    assert fly.get(f"{base}/metadata").json() == {"a": "1", "b": "2"}
    assert fly.get(f"{base}/metadata/b").json() == {"value": "2"}
    assert fly.delete(f"{base}/metadata/a").status_code == 204
    assert fly.get(f"{base}/metadata/a").status_code == 404
    assert get(fly, machine)["instance_id"] == machine["instance_id"]  # no new version
    assert fly.post(f"{base}/cordon").json() == {"ok": True}
    assert get(fly, machine)["cordoned"] is True
    fly.post(f"{base}/uncordon")
    assert get(fly, machine)["cordoned"] is False
    events = fly.get(f"{base}/events", params={"limit": 1}).json()
    assert [e["type"] for e in events] == ["launch"]


# -- control endpoints --------------------------------------------------------------------


def test_faults_and_latency(fly: httpx.Client, ctl: EmulatorControl) -> None:
    machine = create(fly, SLEEP, body={"skip_launch": True})
    ctl.fault("start", status=503, count=2)
    for _ in range(2):
        response = post(fly, machine, "start")
        assert (response.status_code, response.json()) == (
            503,
            {"error": "unavailable: injected fault for action 'start'"},
        )
    assert post(fly, machine, "start").status_code == 200

    ctl.fault("create", status=408, message="deadline_exceeded: upstream timeout", after=True)
    body = {"config": machine_config(SLEEP), "skip_launch": True}
    response = fly.post(f"/apps/{APP}/machines", json=body)
    assert (response.status_code, response.json()) == (
        408,
        {"error": "deadline_exceeded: upstream timeout"},
    )
    assert len(fly.get(f"/apps/{APP}/machines").json()) == 2  # it happened anyway

    ctl.latency("get", 0.3)
    begun = time.monotonic()
    get(fly, machine)
    assert time.monotonic() - begun >= 0.3
    ctl.fault("list", status=500)
    ctl.clear_faults()
    assert fly.get(f"/apps/{APP}/machines").status_code == 200
    begun = time.monotonic()
    get(fly, machine)
    assert time.monotonic() - begun < 0.3
    with pytest.raises(EmulatorControlError, match="unknown action"):
        ctl.fault("explode")


def test_kill_endpoint_is_a_crash(fly: httpx.Client, ctl: EmulatorControl) -> None:
    machine = create(fly, SLEEP, restart={"policy": "on-failure", "max_retries": 1})
    reach(fly, machine, "started")
    assert ctl.kill(machine["id"])["ok"] is True
    wait_for(lambda: ctl.stats()["machines"][machine["id"]]["starts"] == 2, 10, interval=0.02)
    (first,) = exits(fly, machine)
    assert first["exit_event"]["exit_code"] == 137
    assert first["exit_event"]["requested_stop"] is False
    assert first["exit_event"]["restarting"] is True
    wait_for(lambda: ctl.stats()["machines"][machine["id"]]["pid"], 10, interval=0.02)
    ctl.kill(machine["id"])
    reach(fly, machine, "stopped")
    assert ctl.stats()["machines"][machine["id"]]["exit_codes"] == [137, 137]
    with pytest.raises(EmulatorControlError, match="412"):
        ctl.kill(machine["id"])
    with pytest.raises(EmulatorControlError, match="404"):
        ctl.kill("00000000000000")


def test_reset(fly: httpx.Client, ctl: EmulatorControl, emu: Emulator) -> None:
    machines = [create(fly, SLEEP) for _ in range(3)]
    for machine in machines:
        reach(fly, machine, "started")
    ctl.fault("get", status=500, count=5)
    ctl.reset()
    assert emu.leftover_pids() == []
    assert fly.get(f"/apps/{APP}/machines").json() == []
    stats = ctl.stats()
    assert (stats["machines"], stats["calls"], stats["faults"]) == ({}, {"list": 1}, [])
    assert get_status(fly, machines[0]) == 404
