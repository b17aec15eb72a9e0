"""The emulator's pure parts with a fake clock: lifecycle, leases, waits, billing, limits."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from django_flyworkers.emulator.config import (
    parse_duration,
    parse_signal,
    resolve_command,
    validate_config,
)
from django_flyworkers.emulator.errors import ApiError
from django_flyworkers.emulator.faults import FaultPlan, RateLimiter
from django_flyworkers.emulator.ids import new_ulid
from django_flyworkers.emulator.model import Discard, Launch, Machine, Signal
from django_flyworkers.emulator.render import image_ref
from django_flyworkers.emulator.state import Fleet

APP = "app"


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fleet(clock: FakeClock) -> Fleet:
    return Fleet(clock=clock, boot_delay=1.0, destroyed_ttl=2.0)


def config(**extra: Any) -> dict[str, Any]:
    return {"image": "registry.fly.io/app:v1", "init": {"cmd": ["sleep", "60"]}, **extra}


def settle(fleet: Fleet, clock: FakeClock, seconds: float = 0.0) -> list[Launch | Signal]:
    """Let `seconds` pass, firing timers in order; return the effects they produced."""
    end = clock.now + seconds
    while (deadline := fleet.next_deadline()) is not None and deadline <= end:
        clock.now = max(clock.now, deadline)
        fleet.advance()
    clock.now = end
    return fleet.drain()


def running(fleet: Fleet, clock: FakeClock, **extra: Any) -> tuple[Machine, int]:
    machine, _ = fleet.create(APP, {"config": config(**extra)})
    effects = settle(fleet, clock, 1.0)
    launch = effects[-1]
    assert isinstance(launch, Launch)
    assert machine.state == "started"
    return machine, launch.run_id


def exit_event(machine: Machine) -> dict[str, Any]:
    event = next(e for e in reversed(machine.events) if e.type == "exit")
    assert event.request is not None
    return event.request


def error(exc: pytest.ExceptionInfo[ApiError]) -> tuple[int, dict[str, Any]]:
    return exc.value.status, exc.value.body()


# -- create and boot ----------------------------------------------------------------------


def test_create_is_async_and_boots_after_the_delay(fleet: Fleet, clock: FakeClock) -> None:
    machine, nonce = fleet.create(APP, {"config": config(env={"A": "1"}), "region": "ams"})
    assert (machine.state, nonce) == ("created", None)
    assert len(machine.id) == 14 and int(machine.id, 16) >= 0
    assert len(machine.instance_id) == 26
    assert settle(fleet, clock) == []
    assert machine.state == "starting"
    (launch,) = settle(fleet, clock, 1.0)
    assert machine.state == "started"
    assert isinstance(launch, Launch)
    assert launch.argv == ("sleep", "60")
    assert launch.env["A"] == "1"
    assert launch.env["FLY_REGION"] == "ams"
    assert launch.env["FLY_MACHINE_ID"] == launch.env["FLY_ALLOC_ID"] == machine.id
    assert launch.env["FLY_MACHINE_VERSION"] == machine.instance_id
    assert launch.env["FLY_IMAGE_REF"] == "registry.fly.io/app:v1"
    assert launch.env["FLY_VM_MEMORY_MB"] == "256"
    assert [e.type for e in machine.events] == ["launch", "start"]


def test_skip_launch_stays_created_until_started(fleet: Fleet, clock: FakeClock) -> None:
    machine, _ = fleet.create(APP, {"config": config(), "skip_launch": True})
    settle(fleet, clock, 10)
    assert machine.state == "created"
    assert fleet.start(APP, machine.id, None) == "created"
    assert machine.state == "starting"
    settle(fleet, clock, 1.0)
    assert machine.state == "started"


def test_start_while_booting_or_stopping_is_refused(fleet: Fleet, clock: FakeClock) -> None:
    machine, _ = fleet.create(APP, {"config": config()})
    with pytest.raises(ApiError) as exc:
        fleet.start(APP, machine.id, None)
    assert error(exc) == (
        412,
        {"error": "failed_precondition: unable to start machine from current state: 'created'"},
    )
    settle(fleet, clock, 1.0)
    fleet.stop(APP, machine.id, signum=None, timeout=None, nonce=None)
    with pytest.raises(ApiError) as exc:
        fleet.start(APP, machine.id, None)
    assert error(exc) == (
        412,
        {"error": "failed_precondition: machine still active, refusing to start"},
    )


def test_start_started_and_stop_stopped_are_noops_unless_strict(clock: FakeClock) -> None:
    fleet = Fleet(clock=clock)
    machine, run_id = running(fleet, clock)
    assert fleet.start(APP, machine.id, None) == "started"
    fleet.stop(APP, machine.id, signum=None, timeout=None, nonce=None)
    fleet.process_exited(run_id, 0)
    fleet.stop(APP, machine.id, signum=None, timeout=None, nonce=None)
    assert machine.state == "stopped"
    strict = Fleet(clock=clock, strict_start_stop=True)
    machine, _ = running(strict, clock)
    with pytest.raises(ApiError) as exc:
        strict.start(APP, machine.id, None)
    assert exc.value.status == 412


def test_duplicate_name_conflicts(fleet: Fleet) -> None:
    fleet.create(APP, {"config": config(), "name": "worker-1"})
    with pytest.raises(ApiError) as exc:
        fleet.create(APP, {"config": config(), "name": "worker-1"})
    assert exc.value.status == 409
    assert exc.value.body()["status"] == "name_taken"
    fleet.create("other-app", {"config": config(), "name": "worker-1"})


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"init": {"cmd": ["x"]}}, "config.image is required"),
        ({"image": "x"}, "config has no command to run"),
        ({"image": "x", "init": {"cmd": "python app.py"}}, "must be a list of strings"),
        ({"image": "x", "init": {"cmd": ["x"]}, "env": {"N": 1}}, "config.env.N must be"),
        ({"image": "x", "init": {"cmd": ["x"]}, "restart": {"policy": "sometimes"}}, "policy"),
        ({"image": "x", "init": {"cmd": ["x"]}, "stop_config": {"signal": "SIGNOPE"}}, "signal"),
    ],
)
def test_invalid_configs_are_400(cfg: dict[str, Any], message: str) -> None:
    with pytest.raises(ApiError) as exc:
        validate_config(cfg)
    assert exc.value.status == 400
    assert message in exc.value.body()["error"]


def test_command_resolution() -> None:
    assert resolve_command({"init": {"exec": ["a"], "cmd": ["b"]}}) == ["a"]
    assert resolve_command({"init": {"entrypoint": ["a"], "cmd": ["b"]}}) == ["a", "b"]
    assert resolve_command({"init": {}, "processes": [{"cmd": ["c"]}]}) == ["c"]
    assert resolve_command({"processes": [{"exec": ["d"]}]}) == ["d"]


# -- stop, exits and restart policies -----------------------------------------------------


def test_stop_signals_main_process_then_kills_group(fleet: Fleet, clock: FakeClock) -> None:
    machine, run_id = running(fleet, clock, stop_config={"signal": "SIGTERM", "timeout": "3s"})
    fleet.stop(APP, machine.id, signum=None, timeout=None, nonce=None)
    assert machine.state == "stopping"
    assert fleet.drain() == [Signal(run_id, signal.SIGTERM, group=False)]
    assert settle(fleet, clock, 2.9) == []
    assert settle(fleet, clock, 0.2) == [Signal(run_id, signal.SIGKILL, group=True)]
    fleet.process_exited(run_id, -9)
    assert machine.state == "stopped"
    request = exit_event(machine)
    assert request["exit_event"]["requested_stop"] is True
    assert request["exit_event"]["exit_code"] == 137
    assert request["exit_event"]["signal"] == 9
    assert machine.exit_codes == [137]


def test_stop_body_overrides_stop_config(fleet: Fleet, clock: FakeClock) -> None:
    machine, run_id = running(fleet, clock, stop_config={"signal": "SIGTERM", "timeout": "30s"})
    fleet.stop(APP, machine.id, signum=signal.SIGUSR1, timeout=0.5, nonce=None)
    assert fleet.drain() == [Signal(run_id, signal.SIGUSR1, group=False)]
    assert settle(fleet, clock, 0.6) == [Signal(run_id, signal.SIGKILL, group=True)]


def test_default_stop_is_sigint_with_five_seconds(fleet: Fleet, clock: FakeClock) -> None:
    machine, run_id = running(fleet, clock)
    fleet.stop(APP, machine.id, signum=None, timeout=None, nonce=None)
    assert fleet.drain() == [Signal(run_id, signal.SIGINT, group=False)]
    assert settle(fleet, clock, 4.9) == []
    assert settle(fleet, clock, 0.2) == [Signal(run_id, signal.SIGKILL, group=True)]


def test_signal_group_option(clock: FakeClock) -> None:
    fleet = Fleet(clock=clock, signal_group=True)
    machine, run_id = running(fleet, clock)
    fleet.stop(APP, machine.id, signum=None, timeout=None, nonce=None)
    assert fleet.drain() == [Signal(run_id, signal.SIGINT, group=True)]


def test_clean_exit_with_policy_no_stops(fleet: Fleet, clock: FakeClock) -> None:
    machine, run_id = running(fleet, clock, restart={"policy": "no"})
    fleet.process_exited(run_id, 0)
    assert machine.state == "stopped"
    exit_ = exit_event(machine)
    assert exit_["exit_event"]["requested_stop"] is False
    assert exit_["exit_event"]["restarting"] is False
    assert exit_["restart_count"] == 0


@pytest.mark.parametrize("restart", [{"policy": "on-failure", "max_retries": 2}, None])
def test_on_failure_retries_then_stops(
    fleet: Fleet, clock: FakeClock, restart: dict[str, Any] | None
) -> None:
    extra = {"restart": restart} if restart else {}
    machine, run_id = running(fleet, clock, **extra)
    retries = 2 if restart else 10
    for attempt in range(1, retries + 1):
        fleet.process_exited(run_id, 3)
        assert machine.state == "started"
        exit_ = exit_event(machine)
        assert exit_["exit_event"]["restarting"] is True
        assert exit_["restart_count"] == attempt
        (launch,) = settle(fleet, clock, 2.0)
        assert isinstance(launch, Launch)
        run_id = launch.run_id
    fleet.process_exited(run_id, 3)
    assert machine.state == "stopped"
    assert exit_event(machine)["exit_event"]["restarting"] is False
    assert machine.exit_codes == [3] * (retries + 1)
    assert machine.starts == retries + 1


def test_on_failure_does_not_restart_clean_exit(fleet: Fleet, clock: FakeClock) -> None:
    machine, run_id = running(fleet, clock, restart={"policy": "on-failure"})
    fleet.process_exited(run_id, 0)
    assert machine.state == "stopped"


def test_always_restarts_even_clean_exits(fleet: Fleet, clock: FakeClock) -> None:
    machine, run_id = running(fleet, clock, restart={"policy": "always"}, auto_destroy=True)
    for _ in range(15):
        fleet.process_exited(run_id, 0)
        (launch,) = settle(fleet, clock, 1.0)
        assert isinstance(launch, Launch)
        run_id = launch.run_id
    assert machine.state == "started"
    assert machine.restart_count == 15


def test_restart_backoff_doubles(fleet: Fleet, clock: FakeClock) -> None:
    _machine, run_id = running(fleet, clock, restart={"policy": "always"})
    for delay in (0.1, 0.2, 0.4, 0.8, 1.0, 1.0):
        fleet.process_exited(run_id, 1)
        assert settle(fleet, clock, delay * 0.9) == []
        (launch,) = settle(fleet, clock, delay * 0.2)
        assert isinstance(launch, Launch)
        run_id = launch.run_id


def test_crash_kill_follows_the_policy(fleet: Fleet, clock: FakeClock) -> None:
    machine, run_id = running(fleet, clock, restart={"policy": "on-failure", "max_retries": 1})
    assert fleet.kill(machine.id) == run_id
    assert fleet.drain() == [Signal(run_id, signal.SIGKILL, group=True)]
    fleet.process_exited(run_id, -9)
    exit_ = exit_event(machine)["exit_event"]
    assert (exit_["exit_code"], exit_["requested_stop"], exit_["restarting"]) == (137, False, True)


def test_auto_destroy_after_exit(fleet: Fleet, clock: FakeClock) -> None:
    machine, run_id = running(fleet, clock, auto_destroy=True, restart={"policy": "no"})
    fleet.process_exited(run_id, 0)
    assert machine.state == "destroying"
    settle(fleet, clock)
    assert machine.state == "destroyed"
    assert fleet.get(APP, machine.id) is machine
    settle(fleet, clock, 2.0)
    with pytest.raises(ApiError) as exc:
        fleet.get(APP, machine.id)
    assert error(exc) == (404, {"error": "not_found: machine not found"})
    assert fleet.list_machines(APP) == []
    assert fleet.list_machines(APP, include_deleted=True) == [machine]


def test_stop_while_booting_or_between_restarts_is_immediate(
    fleet: Fleet, clock: FakeClock
) -> None:
    machine, _ = fleet.create(APP, {"config": config()})
    fleet.stop(APP, machine.id, signum=None, timeout=None, nonce=None)
    assert machine.state == "stopped"
    assert settle(fleet, clock, 5) == []
    machine, run_id = running(fleet, clock, restart={"policy": "always"})
    fleet.process_exited(run_id, 1)
    fleet.stop(APP, machine.id, signum=None, timeout=None, nonce=None)
    assert machine.state == "stopped"
    assert settle(fleet, clock, 5) == []


# -- destroy, suspend, update -------------------------------------------------------------


def test_destroy_running_machine_needs_force(fleet: Fleet, clock: FakeClock) -> None:
    machine, run_id = running(fleet, clock)
    with pytest.raises(ApiError) as exc:
        fleet.destroy(APP, machine.id, force=False, nonce=None)
    status, body = error(exc)
    assert status == 412
    assert body["error"].startswith("failed_precondition: machine still active")
    fleet.destroy(APP, machine.id, force=True, nonce=None)
    assert machine.state == "destroying"
    assert fleet.drain() == [Signal(run_id, signal.SIGKILL, group=True)]
    fleet.process_exited(run_id, -9)
    assert machine.state == "destroyed"
    assert [e.type for e in machine.events][-2:] == ["exit", "destroy"]
    with pytest.raises(ApiError):
        fleet.destroy(APP, machine.id, force=True, nonce=None)


def test_destroy_stopped_machine_without_force(fleet: Fleet, clock: FakeClock) -> None:
    machine, _ = fleet.create(APP, {"config": config(), "skip_launch": True})
    fleet.destroy(APP, machine.id, force=False, nonce=None)
    settle(fleet, clock)
    assert machine.state == "destroyed"


def test_suspend_and_resume(fleet: Fleet, clock: FakeClock) -> None:
    machine, run_id = running(fleet, clock)
    clock.tick(4)
    fleet.suspend(APP, machine.id, None)
    assert fleet.drain() == [Signal(run_id, signal.SIGSTOP, group=True)]
    settle(fleet, clock)
    assert machine.state == "suspended"
    clock.tick(100)
    assert fleet.start(APP, machine.id, None) == "suspended"
    assert settle(fleet, clock, 1.0) == [Signal(run_id, signal.SIGCONT, group=True)]
    assert machine.state == "started"
    clock.tick(2)
    assert machine.billed_seconds(clock.now) == pytest.approx(6.0)
    assert machine.starts == 1


def test_stop_suspended_machine_kills_it(fleet: Fleet, clock: FakeClock) -> None:
    machine, run_id = running(fleet, clock)
    fleet.suspend(APP, machine.id, None)
    settle(fleet, clock)
    fleet.stop(APP, machine.id, signum=None, timeout=None, nonce=None)
    assert fleet.drain() == [Signal(run_id, signal.SIGKILL, group=True)]
    fleet.process_exited(run_id, -9)
    assert machine.state == "stopped"
    assert exit_event(machine)["exit_event"]["requested_stop"] is True


def test_suspend_records_fly_events_and_stops_billing(clock: FakeClock) -> None:
    fleet = Fleet(clock=clock, boot_delay=1.0, suspend_delay=3.0)
    machine, run_id = running(fleet, clock)
    clock.tick(2)
    fleet.suspend(APP, machine.id, None)
    assert fleet.drain() == [Signal(run_id, signal.SIGSTOP, group=True)]
    assert (machine.state, machine.paused, machine.suspends) == ("suspending", True, 1)
    fleet.suspend(APP, machine.id, None)  # a no-op while suspending...
    settle(fleet, clock, 3.0)
    assert machine.state == "suspended"
    fleet.suspend(APP, machine.id, None)  # ...and once suspended
    assert fleet.drain() == []
    assert [(e.type, e.status, e.source) for e in machine.events[-2:]] == [
        ("suspend", "suspending", "user"),
        ("suspend", "suspended", "flyd"),
    ]
    assert machine.billed_seconds(clock.now) == pytest.approx(2.0)
    assert fleet.wait_status(APP, machine.id, frozenset({"suspended"}), None) == (
        True,
        "suspended",
    )


@pytest.mark.parametrize("state", ["created", "stopped"])
def test_suspend_needs_a_started_machine(fleet: Fleet, clock: FakeClock, state: str) -> None:
    machine, _ = fleet.create(APP, {"config": config(), "skip_launch": True})
    if state == "stopped":
        fleet.start(APP, machine.id, None)
        settle(fleet, clock, 1.0)
        fleet.stop(APP, machine.id, signum=None, timeout=None, nonce=None)
        fleet.process_exited(machine.run_id or 0, 0)
    assert machine.state == state
    with pytest.raises(ApiError) as exc:
        fleet.suspend(APP, machine.id, None)
    assert error(exc) == (
        412,
        {"error": f"failed_precondition: unable to suspend machine from current state: '{state}'"},
    )


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"guest": {"memory_mb": 2049}}, "its memory (2049 MB) is over the 2048 MB limit"),
        ({"size": "performance-2x"}, "its memory (4096 MB) is over the 2048 MB limit"),
        ({"init": {"cmd": ["sleep", "60"], "swap_size_mb": 512}}, "it has swap configured"),
        ({"guest": {"gpus": 1, "gpu_kind": "a10"}}, "machines with GPUs cannot be suspended"),
        ({"guest": {"gpu_kind": "l40s"}}, "machines with GPUs cannot be suspended"),
        ({"schedule": "hourly"}, "machines with a schedule cannot be suspended"),
    ],
)
def test_suspend_refuses_what_fly_cannot_suspend(
    fleet: Fleet, clock: FakeClock, extra: dict[str, Any], reason: str
) -> None:
    machine, _ = running(fleet, clock, **extra)
    with pytest.raises(ApiError) as exc:
        fleet.suspend(APP, machine.id, None)
    status, body = error(exc)
    assert status == 412
    assert body["error"].startswith("failed_precondition: machine cannot be suspended: ")
    assert reason in body["error"]
    assert machine.state == "started" and fleet.drain() == []


@pytest.mark.parametrize(
    "extra", [{"guest": {"memory_mb": 2048}}, {"size": "shared-cpu-8x"}, {"schedule": ""}]
)
def test_suspend_accepts_what_fly_can_suspend(
    fleet: Fleet, clock: FakeClock, extra: dict[str, Any]
) -> None:
    machine, _ = running(fleet, clock, **extra)
    fleet.suspend(APP, machine.id, None)
    assert machine.state == "suspending"


def test_start_interrupts_a_suspend(clock: FakeClock) -> None:
    fleet = Fleet(clock=clock, boot_delay=1.0, suspend_delay=30.0)
    machine, run_id = running(fleet, clock)
    fleet.suspend(APP, machine.id, None)
    fleet.drain()
    assert fleet.start(APP, machine.id, None) == "suspending"
    assert settle(fleet, clock, 60.0) == [Signal(run_id, signal.SIGCONT, group=True)]
    assert (machine.state, machine.starts, machine.resumes) == ("started", 1, 1)
    assert ("suspend", "suspended") not in {(e.type, e.status) for e in machine.events}


def test_destroy_and_update_of_a_suspended_machine_kill_it(fleet: Fleet, clock: FakeClock) -> None:
    machine, run_id = running(fleet, clock)
    fleet.suspend(APP, machine.id, None)
    settle(fleet, clock)
    fleet.destroy(APP, machine.id, force=False, nonce=None)  # no force needed
    assert fleet.drain() == [Signal(run_id, signal.SIGKILL, group=True)]
    fleet.process_exited(run_id, -9)
    assert machine.state == "destroyed"
    assert fleet.drain() == [Discard(machine.id)]

    machine, run_id = running(fleet, clock)
    fleet.suspend(APP, machine.id, None)
    settle(fleet, clock)
    fleet.update(APP, machine.id, {"config": config(env={"V": "2"})}, None)
    assert fleet.drain() == [Signal(run_id, signal.SIGKILL, group=True)]
    fleet.process_exited(run_id, -9)
    assert machine.state == "stopped"  # the new version is left stopped, as Fly does


def test_apps(fleet: Fleet, clock: FakeClock) -> None:
    made = fleet.create_app("made", "acme", "")
    assert (made.org_slug, made.network, len(made.id)) == ("acme", "default", 16)
    with pytest.raises(ApiError) as exc:
        fleet.create_app("made", "acme")
    assert error(exc) == (
        422,
        {"error": "already_exists: app name 'made' is already taken", "status": "name_taken"},
    )
    machine, run_id = running(fleet, clock)  # creating a Machine in APP registers APP
    assert [a.name for a in fleet.list_apps("personal")] == [APP]
    assert [a.name for a in fleet.list_apps("acme")] == ["made"]
    assert fleet.app("never-seen").name == "never-seen"  # apps exist on first use
    with pytest.raises(ApiError) as exc:
        fleet.delete_app(APP, force=False)
    assert error(exc)[0] == 412
    fleet.delete_app(APP, force=True)
    assert machine.state == "destroying"
    assert fleet.drain() == [Signal(run_id, signal.SIGKILL, group=True)]
    assert fleet.list_apps("personal") == []
    with pytest.raises(ApiError) as exc:
        fleet.delete_app(APP, force=True)
    assert error(exc) == (404, {"error": "not_found: app not found"})
    fleet.delete_app("made", force=False)  # nothing running there


def test_update_of_stopped_machine_stays_stopped(fleet: Fleet, clock: FakeClock) -> None:
    machine, _ = fleet.create(APP, {"config": config(), "skip_launch": True})
    old = machine.instance_id
    updated, _ = fleet.update(APP, machine.id, {"config": config(env={"V": "2"})}, None)
    assert updated.state == "replacing"
    assert updated.instance_id != old
    assert settle(fleet, clock, 5) == []
    assert machine.state == "stopped"
    assert machine.config["env"] == {"V": "2"}
    assert [v for v, _ in machine.versions] == [old, machine.instance_id]
    assert fleet.wait_status(APP, machine.id, frozenset({"stopped"}), old) == (True, "replaced")


def test_update_of_started_machine_reboots_new_config(fleet: Fleet, clock: FakeClock) -> None:
    machine, run_id = running(fleet, clock, stop_config={"signal": "SIGTERM"})
    fleet.update(APP, machine.id, {"config": config(env={"V": "2"})}, None)
    assert machine.state == "replacing"
    assert fleet.drain() == [Signal(run_id, signal.SIGTERM, group=False)]
    with pytest.raises(ApiError) as exc:
        fleet.update(APP, machine.id, {"config": config()}, None)
    assert error(exc) == (
        409,
        {"error": "aborted: machine is replacing: concurrent update in progress"},
    )
    with pytest.raises(ApiError) as exc:
        fleet.start(APP, machine.id, None)
    assert "current state: 'replacing'" in exc.value.body()["error"]
    fleet.process_exited(run_id, 0)
    assert machine.state == "starting"
    (launch,) = settle(fleet, clock, 1.0)
    assert isinstance(launch, Launch)
    assert launch.env["V"] == "2"
    assert launch.env["FLY_MACHINE_VERSION"] == machine.instance_id
    assert machine.state == "started"


def test_update_checks_current_version_and_immutables(fleet: Fleet) -> None:
    machine, _ = fleet.create(APP, {"config": config(), "skip_launch": True})
    with pytest.raises(ApiError) as exc:
        fleet.update(APP, machine.id, {"config": config(), "current_version": "stale"}, None)
    assert exc.value.status == 409
    with pytest.raises(ApiError) as exc:
        fleet.update(APP, machine.id, {"config": config(), "region": "syd"}, None)
    assert exc.value.status == 400


# -- wait ---------------------------------------------------------------------------------


def test_wait_status(fleet: Fleet, clock: FakeClock) -> None:
    machine, _ = fleet.create(APP, {"config": config()})
    started, stopped = frozenset({"started"}), frozenset({"stopped"})
    assert fleet.wait_status(APP, machine.id, started, None) == (False, "created")
    assert fleet.wait_status(APP, machine.id, frozenset({"settled"}), None) == (False, "created")
    settle(fleet, clock, 1.0)
    assert fleet.wait_status(APP, machine.id, started, None) == (True, "started")
    assert fleet.wait_status(APP, machine.id, stopped, machine.instance_id) == (False, "started")
    with pytest.raises(ApiError) as exc:
        fleet.wait_status(APP, machine.id, started, "01HNOTAVERSION0000000000000")
    assert exc.value.status == 400


def test_wait_on_destroyed(fleet: Fleet, clock: FakeClock) -> None:
    machine, _ = fleet.create(APP, {"config": config(), "skip_launch": True})
    fleet.destroy(APP, machine.id, force=False, nonce=None)
    settle(fleet, clock)
    destroyed = frozenset({"destroyed"})
    assert fleet.wait_status(APP, machine.id, destroyed, None) == (True, "destroyed")
    with pytest.raises(ApiError) as exc:
        fleet.wait_status(APP, machine.id, frozenset({"started"}), None)
    assert exc.value.status == 404
    settle(fleet, clock, 2.0)
    with pytest.raises(ApiError) as exc:
        fleet.wait_status(APP, machine.id, destroyed, None)
    assert exc.value.status == 404


# -- leases -------------------------------------------------------------------------------


def test_leases(fleet: Fleet, clock: FakeClock) -> None:
    machine, run_id = running(fleet, clock)
    lease = fleet.acquire_lease(APP, machine.id, ttl=10, description="deploy", nonce=None)
    assert len(lease.nonce) == 12
    with pytest.raises(ApiError) as exc:
        fleet.acquire_lease(APP, machine.id, ttl=10, description="", nonce=None)
    status, body = error(exc)
    assert status == 409
    assert body == {
        "status": "error",
        "message": f"machine ID {machine.id} lease currently held by emulator@tokens.fly.io, "
        "expires at 2023-11-14 22:13:31 +0000 UTC",
        "code": "invalid",
    }
    clock.tick(5)
    refreshed = fleet.acquire_lease(APP, machine.id, ttl=10, description="", nonce=lease.nonce)
    assert refreshed.nonce == lease.nonce
    assert refreshed.expires_at == clock.now + 10
    for mutate in (
        lambda nonce: fleet.stop(APP, machine.id, signum=None, timeout=None, nonce=nonce),
        lambda nonce: fleet.update(APP, machine.id, {"config": config()}, nonce),
        lambda nonce: fleet.destroy(APP, machine.id, force=True, nonce=nonce),
        lambda nonce: fleet.suspend(APP, machine.id, nonce),
    ):
        for wrong in (None, "nope"):
            with pytest.raises(ApiError) as exc:
                mutate(wrong)
            status, body = error(exc)
            assert status == 409
            assert body["error"].startswith(
                f"aborted: machine ID {machine.id} lease currently held by emulator@tokens"
            )
    fleet.stop(APP, machine.id, signum=None, timeout=None, nonce=lease.nonce)
    fleet.process_exited(run_id, 0)
    with pytest.raises(ApiError) as exc:
        fleet.release_lease(APP, machine.id, None)
    assert exc.value.status == 400
    fleet.release_lease(APP, machine.id, lease.nonce)
    with pytest.raises(ApiError) as exc:
        fleet.get_lease(APP, machine.id)
    assert exc.value.status == 404
    fleet.start(APP, machine.id, None)


def test_lease_expires(fleet: Fleet, clock: FakeClock) -> None:
    machine, nonce = fleet.create(APP, {"config": config(), "lease_ttl": 5, "skip_launch": True})
    assert nonce is not None
    with pytest.raises(ApiError):
        fleet.start(APP, machine.id, None)
    clock.tick(5)
    fleet.start(APP, machine.id, None)
    assert fleet.acquire_lease(APP, machine.id, ttl=5, description="", nonce=None).nonce != nonce


# -- billing ------------------------------------------------------------------------------


def test_billing_counts_only_started_time(fleet: Fleet, clock: FakeClock) -> None:
    machine, run_id = running(fleet, clock, restart={"policy": "no"})
    clock.tick(3)
    fleet.process_exited(run_id, 0)
    clock.tick(50)
    fleet.start(APP, machine.id, None)
    settle(fleet, clock, 1.0)  # boot delay is not billed
    clock.tick(2)
    assert machine.billed_seconds(clock.now) == pytest.approx(5.0)
    assert machine.starts == 2


# -- parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("10s", 10.0),
        ("1m30s", 90.0),
        ("1500ms", 1.5),
        ("0s", None),
        ("", None),
        (None, None),
        (0, None),
        ("7", 7.0),
        (7, 7.0),
        (2_000_000_000, 2.0),
    ],
)
def test_parse_duration(value: object, seconds: float | None) -> None:
    assert parse_duration(value, "timeout") == seconds


def test_parse_duration_rejects_garbage() -> None:
    with pytest.raises(ApiError) as exc:
        parse_duration("soon", "timeout")
    assert exc.value.body() == {
        "error": 'invalid_argument: invalid timeout "soon": use a Go duration such as "10s" '
        'or "1m30s"'
    }


@pytest.mark.parametrize(
    ("value", "number"),
    [("SIGTERM", 15), ("term", 15), (9, 9), ("2", 2), (None, None), ("SIGUSR1", 10)],
)
def test_parse_signal(value: object, number: int | None) -> None:
    assert parse_signal(value) == number


def test_ids_and_image_ref() -> None:
    import random

    ulid = new_ulid(1_698_719_726.615, random.Random(1))
    assert len(ulid) == 26
    assert ulid.startswith("01HE")
    assert image_ref("registry.fly.io/my-app:deployment-1@sha256:abc") == {
        "registry": "registry.fly.io",
        "repository": "my-app",
        "tag": "deployment-1",
        "digest": "sha256:abc",
        "labels": {},
    }
    ref = image_ref("ubuntu")
    assert (ref["registry"], ref["repository"], ref["tag"]) == (
        "registry-1.docker.io",
        "library/ubuntu",
        "latest",
    )
    assert ref["digest"].startswith("sha256:")


# -- rate limits and faults ---------------------------------------------------------------


def test_token_buckets(clock: FakeClock) -> None:
    limiter = RateLimiter(clock=clock)
    assert [limiter.allow("start", "m1") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("start", "m2")  # per machine
    assert limiter.allow("stop", "m1")  # per action
    clock.tick(1.0)
    assert [limiter.allow("start", "m1") for _ in range(2)] == [True, False]
    assert sum(limiter.allow("get", "m1") for _ in range(20)) == 10
    clock.tick(0.2)
    assert limiter.allow("get", "m1")
    limiter.enabled = False
    assert all(limiter.allow("start", "m1") for _ in range(50))


def test_token_bucket_speed(clock: FakeClock) -> None:
    limiter = RateLimiter(clock=clock, speed=20)
    assert [limiter.allow("start", "m1") for _ in range(4)] == [True, True, True, False]
    clock.tick(0.06)
    assert [limiter.allow("start", "m1") for _ in range(2)] == [True, False]


def test_fault_plan() -> None:
    plan = FaultPlan()
    plan.add({"action": "start", "status": 503, "count": 2})
    plan.add({"action": "create", "status": 408, "after": True, "message": "slow"})
    assert plan.take("stop", after=False) is None
    first = plan.take("start", after=False)
    assert first is not None
    assert (first.status, first.body()) == (
        503,
        {"error": "unavailable: injected fault for action 'start'"},
    )
    assert plan.take("start", after=False) is not None
    assert plan.take("start", after=False) is None
    assert plan.take("create", after=False) is None
    late = plan.take("create", after=True)
    assert late is not None and late.body() == {"error": "deadline_exceeded: slow"}
    plan.add({"action": "stop", "status": 500, "message": "failed_precondition: odd"})
    odd = plan.take("stop", after=False)
    assert odd is not None and odd.body() == {"error": "failed_precondition: odd"}
    plan.add({"action": "list", "status": 429})
    limited = plan.take("list", after=False)
    assert limited is not None
    assert limited.body() == {"error": "resource_exhausted: rate limit exceeded"}
    with pytest.raises(ApiError):
        plan.add({"action": "explode"})
