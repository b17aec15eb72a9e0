"""The scaling policy is a pure function: these tests need no Redis, API or database."""

from datetime import UTC, datetime, timedelta
from typing import Any

from django_flyworkers.conf import QueueProfile
from django_flyworkers.machines import Machine
from django_flyworkers.scaling.policy import (
    QueueSnapshot,
    boot_over,
    desired_workers,
    plan,
    plan_tidy,
)

IMAGE = "registry.fly.io/app:v2"


def machine(id: str, state: str, image: str = IMAGE) -> Machine:
    return Machine.from_api({"id": id, "name": id, "state": state, "config": {"image": image}})


def profile(**kwargs: int) -> QueueProfile:
    return QueueProfile(name="q", **kwargs)  # type: ignore[arg-type]


def test_no_backlog_no_action() -> None:
    result = plan(
        QueueSnapshot("q"), [machine("a", "stopped")], profile(max_machines=3), image=IMAGE
    )
    assert result.is_empty
    assert result.reason == "no backlog"


def test_desired_is_backlog_over_jobs_per_machine_capped() -> None:
    assert desired_workers(QueueSnapshot("q", queued=1), profile(max_machines=3)) == 1
    assert desired_workers(QueueSnapshot("q", queued=25), profile(max_machines=3)) == 3
    assert desired_workers(QueueSnapshot("q", queued=11), profile(max_machines=5)) == 2
    assert desired_workers(QueueSnapshot("q", queued=0, due_scheduled=1), profile()) == 1


def test_starts_stopped_before_creating() -> None:
    result = plan(
        QueueSnapshot("q", queued=30),
        [machine("b", "stopped"), machine("a", "stopped")],
        profile(max_machines=3),
        image=IMAGE,
    )
    assert result.start == ("a", "b")
    assert result.create == 1
    assert result.update == ()


def test_stale_image_is_updated_before_start() -> None:
    result = plan(
        QueueSnapshot("q", queued=1),
        [machine("old", "stopped", image="registry.fly.io/app:v1")],
        profile(max_machines=1),
        image=IMAGE,
    )
    assert result.start == ("old",)
    assert result.update == ("old",)


def test_current_image_preferred_over_stale() -> None:
    result = plan(
        QueueSnapshot("q", queued=1),
        [machine("a-old", "stopped", image="x:v1"), machine("z-new", "stopped")],
        profile(max_machines=2),
        image=IMAGE,
    )
    assert result.start == ("z-new",)


def test_live_and_booting_workers_cover_backlog() -> None:
    snapshot = QueueSnapshot(
        "q", queued=15, live_workers=1, live_machines=frozenset({"a"}), booting=frozenset({"b"})
    )
    machines = [machine("a", "started"), machine("b", "starting"), machine("c", "stopped")]
    result = plan(snapshot, machines, profile(max_machines=3), image=IMAGE)
    assert result.is_empty
    assert result.serving == 2


def test_never_creates_beyond_max_machines() -> None:
    snapshot = QueueSnapshot("q", queued=1000, booting=frozenset({"a", "b"}))
    machines = [machine("a", "starting"), machine("b", "created")]
    result = plan(snapshot, machines, profile(max_machines=2), image=IMAGE)
    assert result.is_empty


def test_global_cap_limits_new_capacity() -> None:
    result = plan(
        QueueSnapshot("q", queued=100),
        [],
        profile(max_machines=5),
        image=IMAGE,
        global_active=8,
        global_cap=10,
    )
    assert result.create == 2
    full = plan(
        QueueSnapshot("q", queued=1), [], profile(), image=IMAGE, global_active=10, global_cap=10
    )
    assert full.is_empty
    assert "global cap" in full.reason


def test_leaving_machine_is_restarted_when_nothing_else_can_serve() -> None:
    # started per the API, but its worker withdrew: it is on its way out.
    result = plan(
        QueueSnapshot("q", queued=1),
        [machine("a", "started")],
        profile(max_machines=1),
        image=IMAGE,
    )
    assert result.restart == ("a",)
    assert result.start == () and result.create == 0


def test_leaving_machine_not_restarted_when_another_can_be_created() -> None:
    result = plan(
        QueueSnapshot("q", queued=1),
        [machine("a", "started")],
        profile(max_machines=2),
        image=IMAGE,
    )
    assert result.create == 1 and result.restart == ()


def test_excluded_machine_is_never_started() -> None:
    result = plan(
        QueueSnapshot("q", queued=5),
        [machine("self", "started")],
        profile(max_machines=1),
        image=IMAGE,
        exclude={"self"},
    )
    assert result.is_empty


def test_stale_live_member_does_not_count() -> None:
    snapshot = QueueSnapshot("q", queued=3, live_workers=1, live_machines=frozenset({"a"}))
    result = plan(snapshot, [machine("a", "stopped")], profile(max_machines=1), image=IMAGE)
    assert result.stale == ("a",)
    assert result.start == ("a",)


def test_failed_and_destroyed_machines_are_ignored() -> None:
    result = plan(
        QueueSnapshot("q", queued=1),
        [machine("f", "failed"), machine("d", "destroyed")],
        profile(max_machines=1),
        image=IMAGE,
    )
    assert result.create == 1
    assert result.start == ()


def test_min_machines_tops_up_a_stopped_pool() -> None:
    result = plan(
        QueueSnapshot("q"),
        [machine("a", "stopped")],
        profile(max_machines=3, min_machines=2),
        image=IMAGE,
    )
    assert result.create_stopped == 1 and result.create == 0


def test_pool_grows_with_stopped_machines() -> None:
    from django_flyworkers.scaling.policy import plan_pool

    result = plan_pool(
        QueueSnapshot("q"), [machine("a", "stopped")], profile(max_machines=3), 3, image=IMAGE
    )
    assert result.create_stopped == 2 and result.destroy == ()


def test_pool_shrinks_stale_stopped_first_and_never_running() -> None:
    from django_flyworkers.scaling.policy import plan_pool

    machines = [
        machine("run", "started"),
        machine("new", "stopped"),
        machine("old", "stopped", image="x:v1"),
        machine("boot", "created"),
    ]
    snapshot = QueueSnapshot("q", booting=frozenset({"boot"}))
    result = plan_pool(snapshot, machines, profile(max_machines=4), 1, image=IMAGE)
    assert result.destroy == ("old", "new")  # "run" is running, "boot" is booting: kept
    assert "running Machines kept" in result.reason


def test_pool_count_above_max_is_refused() -> None:
    import pytest

    from django_flyworkers.scaling.policy import plan_pool

    with pytest.raises(ValueError, match="MAX_MACHINES"):
        plan_pool(QueueSnapshot("q"), [], profile(max_machines=2), 3, image=IMAGE)


def test_a_stopping_machine_is_restarted_when_nothing_else_can_serve() -> None:
    result = plan(
        QueueSnapshot("q", queued=2),
        [machine("a", "stopping")],
        profile(max_machines=1),
        image=IMAGE,
    )
    assert result.restart == ("a",)


def test_booting_machine_missing_from_the_list_still_counts() -> None:
    # Created a moment ago by another process; the Machines list does not show it yet.
    snapshot = QueueSnapshot("q", queued=50, booting=frozenset({"new"}))
    result = plan(snapshot, [machine("a", "stopped")], profile(max_machines=2), image=IMAGE)
    assert result.serving == 1
    assert result.start == ("a",) and result.create == 0


# -- plan_tidy: what the reaper stops and destroys ---------------------------------------------

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def aged(id: str, state: str, seconds: float, *, pool: bool = False, image: str = IMAGE) -> Machine:
    """A Machine whose last start was ``seconds`` before NOW."""
    started = int((NOW.timestamp() - seconds) * 1000)
    metadata = {"flyworkers_queue": "q", **({"flyworkers_pool": "true"} if pool else {})}
    return Machine.from_api(
        {
            "id": id,
            "name": id,
            "state": state,
            "config": {"image": image, "metadata": metadata},
            "events": [{"type": "start", "status": "started", "timestamp": started}],
        }
    )


def tidy(snapshot: QueueSnapshot, machines: list[Machine], **kwargs: Any) -> list[tuple[str, ...]]:
    options: dict[str, Any] = {"busy": (), "stuck_after": 600, "image": IMAGE, "now": NOW}
    options.update(kwargs)
    max_machines = options.pop("max_machines", 5)
    result = plan_tidy(snapshot, machines, profile(max_machines=max_machines), **options)
    return [(s.action, s.machine_id, s.reason, str(s.force)) for s in result.steps]


def test_tidy_stops_a_machine_started_too_long_without_a_worker() -> None:
    steps = tidy(QueueSnapshot("q"), [aged("stuck", "started", 700), aged("young", "started", 30)])
    assert steps == [("stop", "stuck", "started 700s without a live worker", "False")]


def test_tidy_never_stops_a_machine_with_a_worker_or_a_job() -> None:
    snapshot = QueueSnapshot("q", live_machines=frozenset({"live"}), booting=frozenset({"boot"}))
    machines = [aged(m, "started", 9999) for m in ("live", "boot", "busy")]
    assert tidy(snapshot, machines, busy={"busy"}) == []


def test_tidy_destroys_failed_and_stuck_created_but_not_the_pool() -> None:
    machines = [
        aged("failed", "failed", 1),
        aged("stuck", "created", 700),
        aged("pool", "created", 7000, pool=True),
        aged("new", "created", 10),
    ]
    assert tidy(QueueSnapshot("q"), machines) == [
        ("destroy", "failed", "failed", "True"),
        ("destroy", "stuck", "stuck in created for 700s", "True"),
    ]


def test_tidy_destroys_stopped_surplus_above_max_machines_oldest_image_first() -> None:
    machines = [
        aged("run", "started", 5),
        aged("new", "stopped", 900),
        aged("old", "stopped", 900, image="x:v1"),
    ]
    steps = tidy(QueueSnapshot("q"), machines, max_machines=2)
    assert steps == [("destroy", "old", "surplus above MAX_MACHINES (2)", "False")]


def test_tidy_with_the_clock_moved_on_stops_what_was_young() -> None:
    machines = [aged("m", "started", 30)]
    assert tidy(QueueSnapshot("q"), machines) == []
    later = NOW + timedelta(seconds=600)
    assert [s[0] for s in tidy(QueueSnapshot("q"), machines, now=later)] == ["stop"]


# -- booting capacity ends when the API shows the boot failed ----------------------------------


def exited(id: str, state: str, at: float | None) -> Machine:
    events = []
    if at is not None:
        events.append({"type": "exit", "status": "stopped", "timestamp": int(at * 1000)})
    return Machine.from_api({"id": id, "name": id, "state": state, "events": events})


def test_boot_is_over_when_the_machine_exited_after_it_was_started() -> None:
    marked = NOW.timestamp()
    assert boot_over(exited("m", "stopped", marked + 2), marked)
    assert boot_over(exited("m", "stopping", marked + 2), marked)


def test_boot_is_not_over_for_a_list_older_than_the_start() -> None:
    marked = NOW.timestamp()
    # The list still shows the stop before our start: the Machine is on its way up.
    assert not boot_over(exited("m", "stopped", marked - 30), marked)
    assert not boot_over(exited("m", "stopped", None), marked)
    assert not boot_over(exited("m", "starting", marked + 2), marked)
    assert not boot_over(exited("m", "started", None), marked)


def test_boot_is_over_when_the_machine_failed_or_is_gone() -> None:
    marked = NOW.timestamp()
    assert boot_over(exited("m", "failed", None), marked)
    assert boot_over(exited("m", "destroyed", None), marked)


def test_global_cap_says_how_many_workers_it_held_back() -> None:
    result = plan(
        QueueSnapshot("q", queued=100),
        [],
        profile(max_machines=5),
        image=IMAGE,
        global_active=8,
        global_cap=10,
    )
    assert result.create == 2 and result.capped == 3
    assert "3 held back by the global cap of 10" in result.reason
    full = plan(
        QueueSnapshot("q", queued=1), [], profile(), image=IMAGE, global_active=10, global_cap=10
    )
    assert full.capped == 1
