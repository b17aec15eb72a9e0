"""The policy with suspended Machines (``IDLE_ACTION = "suspend"``): pure, no I/O."""

from datetime import timedelta
from typing import Any

from django_flyworkers.conf import QueueProfile
from django_flyworkers.machines import Machine
from django_flyworkers.scaling.policy import QueueSnapshot, plan, plan_pool, plan_tidy
from django_flyworkers.warm import resumed
from tests.test_policy import IMAGE, NOW, aged, machine

OLD = "registry.fly.io/app:v1"


def profile(**kwargs: Any) -> QueueProfile:
    return QueueProfile(name="q", **kwargs)


def test_a_resume_comes_before_a_start_and_a_start_before_a_create() -> None:
    machines = [
        machine("a-stopped", "stopped"),
        machine("b-created", "created"),
        machine("z-asleep", "suspended"),
    ]
    result = plan(QueueSnapshot("q", queued=40), machines, profile(max_machines=4), image=IMAGE)
    assert result.start == ("z-asleep", "a-stopped", "b-created")
    assert result.create == 1 and result.update == ()


def test_a_suspended_machine_on_an_old_image_is_updated_not_resumed() -> None:
    machines = [machine("asleep-old", "suspended", image=OLD), machine("stopped", "stopped")]
    one = plan(QueueSnapshot("q", queued=1), machines, profile(max_machines=2), image=IMAGE)
    assert one.start == ("stopped",)  # a plain start beats an update and a cold boot
    both = plan(QueueSnapshot("q", queued=20), machines, profile(max_machines=2), image=IMAGE)
    assert both.start == ("stopped", "asleep-old") and both.update == ("asleep-old",)


def test_a_suspending_machine_is_resumed_on_the_current_image_and_restarted_on_an_old_one() -> None:
    current = plan(
        QueueSnapshot("q", queued=1),
        [machine("a", "suspending")],
        profile(max_machines=1),
        image=IMAGE,
    )
    assert current.start == ("a",) and current.restart == ()
    # An update cannot interrupt a suspend: wait for it to settle, then update and start.
    stale = plan(
        QueueSnapshot("q", queued=1),
        [machine("a", "suspending", image=OLD)],
        profile(max_machines=1),
        image=IMAGE,
    )
    assert stale.start == () and stale.restart == ("a",) and stale.update == ("a",)


def test_a_leaving_machine_on_an_old_image_is_updated_when_restarted() -> None:
    result = plan(
        QueueSnapshot("q", queued=1),
        [machine("a", "started", image=OLD)],
        profile(max_machines=1),
        image=IMAGE,
    )
    assert result.restart == ("a",) and result.update == ("a",)


def test_a_suspended_machine_is_capacity_asleep_not_a_live_worker() -> None:
    snapshot = QueueSnapshot("q", queued=1)
    result = plan(snapshot, [machine("a", "suspended")], profile(max_machines=1), image=IMAGE)
    assert result.serving == 0 and result.start == ("a",)


def test_a_suspend_pool_starts_its_cold_machines_so_they_suspend() -> None:
    machines = [
        machine("asleep", "suspended"),
        machine("cold", "stopped"),
        machine("old", "created", image=OLD),
    ]
    warm = profile(max_machines=4, idle_action="suspend")
    result = plan_pool(QueueSnapshot("q"), machines, warm, 4, image=IMAGE)
    assert result.start == ("cold", "old") and result.update == ("old",)
    assert result.create_stopped == 1
    assert "2 started to suspend" in result.reason
    # A stop pool stays stopped.
    cold = plan_pool(QueueSnapshot("q"), machines, profile(max_machines=4), 4, image=IMAGE)
    assert cold.start == () and cold.create_stopped == 1


def test_shrinking_keeps_suspended_machines_longest_and_never_starts_what_it_destroys() -> None:
    machines = [
        machine("a-asleep", "suspended"),
        machine("b-cold", "stopped"),
        machine("c-old", "suspended", image=OLD),
    ]
    warm = profile(max_machines=3, idle_action="suspend")
    result = plan_pool(QueueSnapshot("q"), machines, warm, 1, image=IMAGE)
    assert result.destroy == ("c-old", "b-cold")
    assert result.start == ()


def test_tidy_never_stops_or_destroys_a_suspended_machine() -> None:
    machines = [aged("a", "suspended", 10_000), aged("b", "suspending", 10_000)]
    result = plan_tidy(
        QueueSnapshot("q"),
        machines,
        profile(max_machines=2),
        now=NOW + timedelta(seconds=1),
        busy=(),
        stuck_after=60,
        image=IMAGE,
    )
    assert result.steps == ()


def events(*pairs: tuple[str, str]) -> Machine:
    """A started Machine whose events, newest first, are ``(type, status)`` pairs."""
    listed = [
        {"type": kind, "status": status, "timestamp": 1_700_000_000_000 - i * 1000}
        for i, (kind, status) in enumerate(pairs)
    ]
    return Machine.from_api({"id": "m", "state": "started", "events": listed})


def test_resumed_means_started_after_the_latest_suspend() -> None:
    # The answer to a suspend may arrive before the freeze (Fly): not resumed yet.
    assert not resumed(events(("suspend", "suspending"), ("start", "started")))
    assert resumed(
        events(("start", "started"), ("suspend", "suspended"), ("suspend", "suspending"))
    )
    assert resumed(events(("start", "started"), ("launch", "created")))
    asleep = Machine.from_api({"id": "m", "state": "suspended", "events": []})
    assert not resumed(asleep)
