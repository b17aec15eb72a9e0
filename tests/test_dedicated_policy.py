"""Dedicated queues, the pure parts: the policy, the Machine config, the enqueue-time checks.

No Redis, API or worker here; tests/test_dedicated.py runs the same on real parts.
"""

from __future__ import annotations

from typing import Any

import pytest

from django_flyworkers.conf import QueueProfile, get_settings
from django_flyworkers.dedicated import GUEST_META, enqueue_meta
from django_flyworkers.exceptions import InvalidGuest, NotDedicated
from django_flyworkers.guest import Guest, validate_guest
from django_flyworkers.machines import Machine
from django_flyworkers.scaling.dedicated import job_guest, machine_config
from django_flyworkers.scaling.dedicated_policy import holding, plan_dedicated
from django_flyworkers.scaling.policy import QueueSnapshot, plan_tidy
from tests.test_policy import NOW, aged

JOBS = ("j1", "j2", "j3", "j4", "j5")


def machine(id: str, state: str, job: str | None = None) -> Machine:
    metadata = {"flyworkers_queue": "render", **({"flyworkers_job": job} if job else {})}
    return Machine.from_api(
        {"id": id, "name": id, "state": state, "config": {"metadata": metadata}}
    )


def dedicated(max_machines: int = 2, **kwargs: Any) -> QueueProfile:
    return QueueProfile(name="render", max_machines=max_machines, mode="dedicated", **kwargs)


def test_each_waiting_job_gets_a_machine_up_to_the_cap() -> None:
    result = plan_dedicated(dedicated(2), JOBS, [], assigned={})
    assert result.create_for == ("j1", "j2")
    assert result.waiting == 5 and result.capped == 0
    assert result.reason == "5 job(s) waiting, 0 of 2 running, create 2, 3 wait for a place"


def test_jobs_whose_machine_holds_a_place_are_served() -> None:
    machines = [machine("m1", "started", "j1"), machine("m2", "starting", "j2")]
    result = plan_dedicated(dedicated(3), JOBS, machines, assigned={"j1": "m1", "j2": "m2"})
    assert result.create_for == ("j3",)
    assert result.running == ("m1", "m2")


def test_a_machine_busy_with_an_earlier_job_holds_a_place() -> None:
    # m1 claimed its job long ago (it is off the queue): it still counts against the cap.
    result = plan_dedicated(
        dedicated(2), ("j2", "j3"), [machine("m1", "started", "j0")], assigned={}
    )
    assert result.create_for == ("j2",)


def test_a_job_whose_machine_ended_before_claiming_it_gets_another() -> None:
    for gone in ([machine("m1", "stopped", "j1")], [machine("m1", "destroyed", "j1")], []):
        result = plan_dedicated(dedicated(2), ("j1",), gone, assigned={"j1": "m1"})
        assert result.create_for == ("j1",)


def test_a_machine_created_moments_ago_counts_before_the_list_shows_it() -> None:
    result = plan_dedicated(dedicated(2), JOBS, [], assigned={"j1": "new"}, booting={"new"})
    assert result.create_for == ("j2",)
    assert holding([], {"new"}) == {"new"}


def test_a_machine_handing_over_does_not_count() -> None:
    machines = [machine("m1", "started", "j0"), machine("m2", "started", "jx")]
    full = plan_dedicated(dedicated(2), JOBS, machines, assigned={})
    assert full.create_for == () and full.reason.endswith("5 wait for a place")
    handing = plan_dedicated(dedicated(2), JOBS, machines, assigned={}, exclude={"m1"})
    assert handing.create_for == ("j1",)


def test_the_global_cap_holds_jobs_back_and_says_so() -> None:
    result = plan_dedicated(dedicated(4), JOBS, [], assigned={}, global_active=9, global_cap=10)
    assert result.create_for == ("j1",) and result.capped == 3
    assert "3 held back by the global cap of 10" in result.reason


def test_nothing_queued_nothing_to_do() -> None:
    result = plan_dedicated(dedicated(2), (), [machine("m1", "started", "j0")], assigned={})
    assert result.is_empty and result.reason == "no job waiting"


def test_the_machine_config_runs_one_job_and_is_destroyed_afterwards() -> None:
    settings = get_settings()
    guest = validate_guest({"cpus": 8, "memory_mb": 16384})
    config = machine_config(dedicated(), settings, "job-1", guest)
    assert config["init"] == {"cmd": ["python", "manage.py", "flyworkers_run", "job-1"]}
    assert config["auto_destroy"] is True
    assert config["restart"] == {"policy": "no"}
    assert config["guest"] == {"cpu_kind": "shared", "cpus": 8, "memory_mb": 16384}
    assert config["metadata"] == {"flyworkers_queue": "render", "flyworkers_job": "job-1"}
    assert config["env"] == {"FLYWORKERS_QUEUE": "render", "FLYWORKERS_JOB_ID": "job-1"}
    assert config["image"] == settings.image
    custom = machine_config(
        dedicated(cmd=("python", "/app/manage.py", "flyworkers_run")), settings, "j", guest
    )
    assert custom["init"]["cmd"] == ["python", "/app/manage.py", "flyworkers_run", "j"]


def test_a_job_runs_on_its_own_guest_else_its_queues() -> None:
    class FakeJob:
        def __init__(self, meta: dict[str, Any]) -> None:
            self.meta = meta

    profile = dedicated(guest=Guest("performance", 2, 4096))
    own = {GUEST_META: {"cpu_kind": "shared", "cpus": 2, "memory_mb": 1024}}
    assert dict(job_guest(FakeJob(own), profile)) == own[GUEST_META]  # type: ignore[arg-type]
    assert job_guest(FakeJob({}), profile) is profile.guest  # type: ignore[arg-type]
    assert job_guest(None, profile) is profile.guest
    hand_edited = {GUEST_META: {"cpus": 3}}
    assert job_guest(FakeJob(hand_edited), profile) is profile.guest  # type: ignore[arg-type]


def test_enqueue_meta_checks_the_queue_and_the_guest() -> None:
    assert enqueue_meta("default", {}) == {}  # the common case reads no settings at all
    assert enqueue_meta("render", {"dedicated": True}) == {}
    meta = enqueue_meta("render", {"guest": {"cpus": 2}})
    # Merged over the queue's GUEST and completed as Fly would: 2 shared CPUs need 512 MB.
    assert meta == {GUEST_META: {"cpu_kind": "shared", "cpus": 2, "memory_mb": 512}}
    with pytest.raises(NotDedicated, match="queue 'default' runs in pool mode"):
        enqueue_meta("default", {"dedicated": True})
    with pytest.raises(NotDedicated, match="queue 'elsewhere' is not in FLYWORKERS"):
        enqueue_meta("elsewhere", {"dedicated": True})
    with pytest.raises(InvalidGuest, match="cpu_kind must be 'shared' or 'performance'"):
        enqueue_meta("render", {"guest": {"cpu_kind": "gpu"}})


def test_tidy_destroys_stopped_machines_of_a_dedicated_queue() -> None:
    machines = [aged("left", "stopped", 5), aged("busy", "started", 5)]
    steps = plan_tidy(
        QueueSnapshot("render", live_machines=frozenset({"busy"})),
        machines,
        dedicated(2),
        now=NOW,
        busy={"busy"},
        stuck_after=600,
        image="img",
    ).steps
    assert [(s.action, s.machine_id, s.reason) for s in steps] == [
        ("destroy", "left", "dedicated Machine left after its job")
    ]
