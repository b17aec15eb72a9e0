"""Contract suite: the Machines client against the emulator, in-process and over a socket.

Every test runs twice through the parametrized ``target`` fixture: (a) the emulator as a WSGI
app behind ``httpx.WSGITransport`` and (b) the same emulator served by ``EmulatorServer`` on a
loopback port. Machines are real local processes, so the tests also check that the client's
view of state changes matches what the processes do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from django_flyworkers.emulator import Emulator, EmulatorControl, EmulatorServer
from django_flyworkers.machines import (
    LeaseHeld,
    Machine,
    MachineNotFound,
    MachinesClient,
    MachineState,
    PreconditionFailed,
    RetryPolicy,
    StartResult,
    Unauthorized,
    WaitTimeout,
)
from django_flyworkers.testing import wait_for

TOKEN = "contract-token-0123456789"
APP = "contract-app"
SLEEPER = ["python", "-c", "import time; time.sleep(30)"]


@dataclass
class Target:
    """One way of reaching the emulator."""

    name: str
    base_url: str
    control: EmulatorControl
    transport: Callable[[], httpx.BaseTransport | None]
    workdir: Path

    def client(self, token: str = TOKEN, retry: RetryPolicy | None = None) -> MachinesClient:
        return MachinesClient(
            self.base_url, token, APP, transport=self.transport(), timeout=10.0, retry=retry
        )

    def raw(self) -> httpx.Client:
        """A plain httpx client, to see what the API itself answers."""
        return httpx.Client(
            base_url=self.base_url + "/v1",
            transport=self.transport(),
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10.0,
        )


@pytest.fixture(scope="module", params=["wsgi", "server"])
def target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    workdir: Path = tmp_path_factory.mktemp(f"emulator-{request.param}")
    if request.param == "wsgi":
        emulator = Emulator(token=TOKEN, workdir=workdir, rate_limits=True, boot_delay=0.0)
        base_url = "http://emulator.invalid"
        control = EmulatorControl(base_url, TOKEN, transport=httpx.WSGITransport(app=emulator))
        try:
            yield Target(
                "wsgi", base_url, control, lambda: httpx.WSGITransport(app=emulator), workdir
            )
        finally:
            control.close()
            emulator.shutdown()
    else:
        server = EmulatorServer(
            host="127.0.0.1", port=0, token=TOKEN, workdir=workdir, rate_limits=True,
            boot_delay=0.0,
        )  # fmt: skip
        server.start()
        control = EmulatorControl(server.url, TOKEN)
        try:
            yield Target("server", server.url, control, lambda: None, workdir)
        finally:
            control.close()
            server.stop()


@pytest.fixture
def client(target: Target) -> Iterator[MachinesClient]:
    target.control.reset()
    # Rate limits are off except where a test turns them on: with them on, every test
    # would spend seconds in backoff and the suite would lose its time budget.
    target.control.set_rate_limits(False)
    with target.client() as c:
        yield c
        # Leave no processes behind, whatever the test did.
        for machine in c.list():
            with contextlib.suppress(MachineNotFound):
                c.destroy(machine.id, force=True)
    target.control.reset()


def config(cmd: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "image": "flyworkers-test:latest",
        "init": {"cmd": cmd or SLEEPER},
        "restart": {"policy": "no"},
        **extra,
    }


def started(client: MachinesClient, **kwargs: Any) -> Machine:
    machine = client.create(config(**kwargs))
    client.wait(machine.id, "started", instance_id=machine.instance_id, timeout=20)
    return client.get(machine.id)


def test_create_is_async_and_wait_reaches_started(client: MachinesClient) -> None:
    machine = client.create(
        config(metadata={"flyworkers_queue": "default"}), name="contract-1", region="ams"
    )
    assert machine.name == "contract-1"
    assert machine.state in (MachineState.CREATED, MachineState.STARTING, MachineState.STARTED)
    assert machine.instance_id and machine.region == "ams"
    client.wait(machine.id, "started", instance_id=machine.instance_id, timeout=20)
    fetched = client.get(machine.id)
    assert fetched.is_running
    assert fetched.image == "flyworkers-test:latest"
    assert fetched.metadata == {"flyworkers_queue": "default"}
    assert fetched.config["init"]["cmd"] == tuple(SLEEPER)
    assert fetched.private_ip
    assert fetched.events and fetched.events[0].status in ("started", "start")
    assert fetched.created_at is not None


def test_list_filters_by_metadata_and_state(client: MachinesClient) -> None:
    a = client.create(config(metadata={"flyworkers_queue": "a"}), skip_launch=True)
    b = client.create(config(metadata={"flyworkers_queue": "b"}), skip_launch=True)
    assert a.state == b.state == MachineState.CREATED
    assert {m.id for m in client.list()} >= {a.id, b.id}
    assert [m.id for m in client.list(metadata={"flyworkers_queue": "a"})] == [a.id]
    assert {m.id for m in client.list(state="created")} == {a.id, b.id}
    assert client.list(state=["started", "stopped"]) == []
    client.start(b.id)
    client.wait(b.id, "started", timeout=20)
    assert [m.id for m in client.list(state="started")] == [b.id]
    assert [m.id for m in client.list(metadata={"flyworkers_queue": "b"}, state="started")] == [
        b.id
    ]


def test_stop_wait_stopped_then_start_again(client: MachinesClient) -> None:
    machine = started(client)
    client.stop(machine.id, signal="SIGTERM", timeout=5)
    client.wait(machine.id, "stopped", instance_id=machine.instance_id, timeout=20)
    stopped = client.get(machine.id)
    assert stopped.state == MachineState.STOPPED
    assert stopped.last_exit_event is not None
    client.stop(machine.id)  # already stopped: still a success
    # Start right away: a 412 "machine still active" would be absorbed by the client.
    result = client.start(machine.id)
    assert result.previous_state in (None, "stopped")
    client.wait(machine.id, "started", timeout=20)
    assert client.start(machine.id).already_started


def test_start_right_after_stop_is_absorbed(
    target: Target, client: MachinesClient, caplog: Any
) -> None:
    machine = started(client, cmd=["python", "-c", _SLOW_EXIT])
    ready = target.workdir / f"{machine.id}.ready"
    # "started" means spawned; wait for the process to install its SIGINT handler.
    wait_for(ready.exists, 10, "the SIGINT handler", interval=0.02)
    client.stop(machine.id, timeout=5)
    # The process takes ~0.5 s to exit, so the Machine is still stopping here.
    with caplog.at_level(logging.WARNING, logger="django_flyworkers.machines"):
        assert client.start(machine.id).previous_state == "stopped"
    assert "machine still active" in caplog.text
    client.wait(machine.id, "started", timeout=20)
    assert client.get(machine.id).is_running


_SLOW_EXIT = (
    "import os, pathlib, signal, sys, time\n"
    "signal.signal(signal.SIGINT, lambda *a: (time.sleep(0.5), sys.exit(0)))\n"
    "pathlib.Path(os.environ['FLY_MACHINE_ID'] + '.ready').touch()\n"
    "time.sleep(30)\n"
)


def test_update_of_stopped_machine_keeps_it_stopped(client: MachinesClient) -> None:
    machine = started(client)
    client.stop(machine.id)
    client.wait(machine.id, "stopped", instance_id=machine.instance_id, timeout=20)
    current = client.get(machine.id)
    new_config = current.config_copy()
    new_config["env"] = {"FLYWORKERS_VERSION": "2"}
    updated = client.update(machine.id, new_config, current_version=current.instance_id)
    assert updated.instance_id != machine.instance_id
    client.wait(machine.id, "stopped", instance_id=updated.instance_id, timeout=20)
    after = client.get(machine.id)
    assert after.state == MachineState.STOPPED
    assert after.instance_id == updated.instance_id
    assert after.config["env"] == {"FLYWORKERS_VERSION": "2"}


def test_suspend_and_resume(client: MachinesClient) -> None:
    machine = started(client)
    client.suspend(machine.id)
    client.wait(machine.id, "suspended", timeout=20)
    assert client.get(machine.id).state == MachineState.SUSPENDED
    client.start(machine.id)
    client.wait(machine.id, "started", timeout=20)
    assert client.get(machine.id).is_running


def test_suspend_states_no_ops_and_refusals(client: MachinesClient) -> None:
    machine = started(client)
    client.suspend(machine.id)
    client.suspend(machine.id)  # suspending or suspended already: a no-op
    client.wait(machine.id, "suspended", timeout=20)
    asleep = client.get(machine.id)
    assert asleep.is_suspended and asleep.is_startable and not asleep.is_running
    assert [m.id for m in client.list(state="suspended")] == [machine.id]
    assert client.list(state="started") == []
    result = client.start(machine.id)
    assert result.previous_state == "suspended" and not result.already_started
    client.wait(machine.id, "started", timeout=20)
    # Stopping a suspended Machine works, as on Fly; suspending a stopped one is refused.
    client.suspend(machine.id)
    client.wait(machine.id, "suspended", timeout=20)
    client.stop(machine.id)
    client.wait(machine.id, "stopped", timeout=20)
    with pytest.raises(PreconditionFailed) as info:
        client.suspend(machine.id)
    assert "current state: 'stopped'" in info.value.message
    assert info.value.attempts == 1


def test_transient_suspend_faults_are_retried(target: Target, client: MachinesClient) -> None:
    machine = started(client)
    target.control.fault("suspend", status=503, count=2)
    client.suspend(machine.id)
    client.wait(machine.id, "suspended", timeout=20)
    assert target.control.stats()["calls"]["suspend"] == 3


def test_destroy_force_then_not_found(client: MachinesClient) -> None:
    machine = started(client)
    client.destroy(machine.id, force=True)
    client.wait(machine.id, "destroyed", timeout=20)

    def gone() -> bool:  # Fly shows "destroyed" for a moment, then 404
        try:
            assert client.get(machine.id).state in ("destroying", "destroyed")
        except MachineNotFound:
            return True
        return False

    wait_for(gone, 10, "the destroyed Machine to 404", interval=0.2)
    with pytest.raises(MachineNotFound):
        client.wait(machine.id, "started", timeout=2)


def test_wait_deadline_raises_wait_timeout(client: MachinesClient) -> None:
    machine = client.create(config(), skip_launch=True)  # never starts on its own
    started_at = time.monotonic()
    with pytest.raises(WaitTimeout) as info:
        client.wait(machine.id, "started", timeout=1)
    elapsed = time.monotonic() - started_at
    assert 0.9 <= elapsed < 5
    assert "currently created" in info.value.message
    assert info.value.status == 408


def test_exit_code_is_reported(client: MachinesClient) -> None:
    machine = client.create(config(["python", "-c", "raise SystemExit(3)"]))
    client.wait(machine.id, "stopped", instance_id=machine.instance_id, timeout=20)
    assert client.get(machine.id).last_exit_code == 3


def test_leases(client: MachinesClient) -> None:
    machine = started(client)
    lease = client.acquire_lease(machine.id, ttl=30, description="contract")
    assert lease.nonce and lease.expires_at is not None
    with pytest.raises(LeaseHeld):
        client.acquire_lease(machine.id)
    with pytest.raises(LeaseHeld):
        client.stop(machine.id)  # mutation without the nonce
    client.stop(machine.id, nonce=lease.nonce)
    client.wait(machine.id, "stopped", instance_id=machine.instance_id, timeout=20)
    client.release_lease(machine.id, lease.nonce)
    client.release_lease(machine.id, lease.nonce)  # already released: fine
    again = client.acquire_lease(machine.id, ttl=5)
    client.release_lease(machine.id, again.nonce)
    created = client.create(config(), skip_launch=True, lease_ttl=30)
    assert created.nonce
    with pytest.raises(LeaseHeld):
        client.destroy(created.id)
    client.destroy(created.id, nonce=created.nonce)


def test_bad_token_is_unauthorized(target: Target, client: MachinesClient) -> None:
    with target.client(token="not-the-token") as bad, pytest.raises(Unauthorized):
        bad.list()


def test_rate_limited_starts_become_successes(target: Target, client: MachinesClient) -> None:
    machine = started(client)
    path = f"/apps/{APP}/machines/{machine.id}/start"
    target.control.set_rate_limits(True)  # fresh buckets: burst 3, then 1/s
    with target.raw() as raw:
        began = time.monotonic()
        statuses = [raw.post(path).status_code for _ in range(10)]
        assert time.monotonic() - began < 1.0
    assert statuses.count(429) >= 5, statuses
    assert set(statuses) <= {200, 429}

    # The same ten starts at once, through the client, from ten threads. On a test-sized
    # clock: the buckets refill five times as fast as Fly's, and the client's default policy
    # runs five times as fast too, so every ratio between them is the real one.
    speed = 5.0
    target.control.set_rate_limits(True, speed=speed)  # refill the buckets again
    default = RetryPolicy()
    policy = dataclasses.replace(
        default,
        max_elapsed=default.max_elapsed / speed,
        base_delay=default.base_delay / speed,
        max_delay=default.max_delay / speed,
    )
    limited_before = target.control.stats()["rate_limited"].get("start", 0)
    results: list[StartResult] = []
    errors: list[BaseException] = []
    scaled = target.client(retry=policy)

    def start() -> None:
        try:
            results.append(scaled.start(machine.id))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    began = time.monotonic()
    threads = [threading.Thread(target=start) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    scaled.close()
    assert errors == []
    assert len(results) == 10 and all(r.already_started for r in results)
    assert elapsed < policy.max_elapsed
    # The client did meet 429s and retried them.
    assert target.control.stats()["rate_limited"].get("start", 0) - limited_before >= 5


def test_create_that_failed_after_taking_effect_is_found_by_name(
    target: Target, client: MachinesClient
) -> None:
    target.control.fault("create", status=500, after=True)
    machine = client.create(config(), name="landed-anyway")
    assert [m.id for m in client.list() if m.name == "landed-anyway"] == [machine.id]
    assert target.control.stats()["calls"]["create"] == 1  # no second POST


def test_create_that_failed_before_taking_effect_is_retried(
    target: Target, client: MachinesClient
) -> None:
    target.control.fault("create", status=503)
    machine = client.create(config())
    assert [m.id for m in client.list()] == [machine.id]
    assert target.control.stats()["calls"]["create"] == 2


def test_create_read_timeout_checks_by_name(tmp_path: Path, caplog: Any) -> None:
    """A create whose answer never arrives may have worked: the client looks it up by name.

    Over a real socket only: httpx's WSGITransport has no read timeout.
    """
    latency = 1.0
    with EmulatorServer(token=TOKEN, workdir=tmp_path, rate_limits=False) as server:
        control = EmulatorControl(server.url, TOKEN)
        control.latency("create", latency)
        with MachinesClient(server.url, TOKEN, APP, timeout=latency / 3) as c:
            machine = c.create(config(["python", "-c", "pass"]), name="slow-create")
            named = [m for m in c.list(include_deleted=True) if m.name == "slow-create"]
        control.close()
    assert [m.id for m in named] == [machine.id]
    assert "failed ambiguously" in caplog.text


def test_transient_start_faults_are_retried(target: Target, client: MachinesClient) -> None:
    machine = client.create(config(), skip_launch=True)
    target.control.fault("start", status=503, count=2)
    assert client.start(machine.id).previous_state == "created"
    client.wait(machine.id, "started", timeout=20)
    assert target.control.stats()["calls"]["start"] == 3


def test_strict_start_stop_412s_count_as_success(tmp_path: Path) -> None:
    """Fly's answer to start-when-started / stop-when-stopped is undocumented: accept 412 too."""
    emulator = Emulator(token=TOKEN, workdir=tmp_path, rate_limits=False, strict_start_stop=True)
    try:
        with MachinesClient(
            "http://emulator.invalid", TOKEN, APP, transport=httpx.WSGITransport(app=emulator)
        ) as c:
            machine = started(c)
            raw = httpx.Client(
                base_url="http://emulator.invalid/v1",
                transport=httpx.WSGITransport(app=emulator),
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            path = f"/apps/{APP}/machines/{machine.id}"
            with raw:
                assert raw.post(f"{path}/start").status_code == 412
                result = c.start(machine.id)
                assert result.already_started and result.previous_state == "started"
                c.stop(machine.id)
                c.wait(machine.id, "stopped", instance_id=machine.instance_id, timeout=20)
                assert raw.post(f"{path}/stop").status_code == 412
                c.stop(machine.id)
                c.destroy(machine.id)
    finally:
        emulator.shutdown()
