"""The dashboard over HTTP (Django's test client) on real Redis and a real SQLite file.

What a user reads: the cards' numbers from Redis and the ledger, percentiles, costs, the charts'
bars and points, the timeline; who may read and act; that bad input changes nothing; that the
page's query count does not grow with the rows.
"""

from __future__ import annotations

import json
import math
import re
import time
from datetime import timedelta
from typing import Any

import django_rq
import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from rq import Retry

from django_flyworkers import ledger, presence
from django_flyworkers.models import FlyJob, JobAttempt, MachineRun, ScaleEvent, WorkerMachine
from django_flyworkers.worker import FlyWorker
from tests.testapp import jobs

pytestmark = pytest.mark.django_db(transaction=True)

DASHBOARD = "/admin/django_flyworkers/dashboard/"
LIVE = DASHBOARD + "live.json"
ACTION = DASHBOARD + "action/"


@pytest.fixture
def wake_off(settings: Any, redis_flush: Any) -> None:
    """No wake-up reaches an API: the tests put Redis in the state they want themselves."""
    settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": "off"}


@pytest.fixture
def operator(admin_user: User) -> Client:
    client = Client()
    client.force_login(admin_user)
    return client


def staff(username: str, *perms: str) -> Client:
    user = User.objects.create_user(username, password="pw", is_staff=True)
    for codename in perms:
        user.user_permissions.add(Permission.objects.get(codename=codename))
    client = Client()
    client.force_login(user)
    return client


def machine(machine_id: str, queue: str = "default", state: str = "stopped", **extra: Any) -> Any:
    ledger.record_machine_seen(machine_id, queue=queue, state=state, **extra)
    return WorkerMachine.objects.get(machine_id=machine_id)


def run(machine_id: str, queue: str, began: Any, ended: Any | None) -> None:
    ledger.record_run_started(machine_id, queue=queue, at=began)
    if ended is not None:
        ledger.record_run_ended(machine_id, at=ended)


def job(
    job_id: str,
    queue: str = "default",
    *,
    wait: float = 1.0,
    took: float = 2.0,
    ago: float = 60.0,
    status: str = "finished",
    on: Any = None,
    error: str = "",
) -> FlyJob:
    now = timezone.now()
    started = now - timedelta(seconds=ago)
    return FlyJob.objects.create(
        job_id=job_id,
        queue=queue,
        func_name="tests.testapp.jobs.add",
        status=status,
        enqueued_at=started - timedelta(seconds=wait),
        started_at=started,
        ended_at=started + timedelta(seconds=took) if status != "started" else None,
        machine=on,
        attempts=1,
        error=error,
    )


def card(data: dict[str, Any], queue: str) -> dict[str, Any]:
    return data["queues"][queue]  # type: ignore[no-any-return]


# -- who may see and act -------------------------------------------------------------------------


def test_anonymous_is_sent_to_the_login_page(wake_off: None) -> None:
    for url in (DASHBOARD, LIVE):
        response = Client().get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/admin/login/?next=")
    assert Client().post(ACTION, {"name": "wake", "queue": "default"}).status_code == 302


def test_staff_without_view_permission_is_refused(wake_off: None) -> None:
    client = staff("nobody")
    assert client.get(DASHBOARD).status_code == 403
    assert client.get(LIVE).status_code == 403


def test_viewer_sees_no_buttons_and_gets_403_on_every_action(wake_off: None) -> None:
    machine("m-viewer")
    job("j-failed", status="failed", error="boom")
    client = staff("viewer", "view_flyjob")
    page = client.get(DASHBOARD).content.decode()
    assert "Fly workers" in page and 'data-queue="default"' in page
    for label in ("Wake now", "Set pool size", "Reap now", ">Retry<", ">Delete<"):
        assert label not in page
    fields = {"queue": "default", "job": "j-failed", "machine": "m-viewer", "count": "1"}
    for name in ("wake", "pool", "reap", "retry", "delete", "stop", "destroy"):
        for confirm in ("", "yes"):
            response = client.post(ACTION, {"name": name, "confirm": confirm, **fields})
            assert response.status_code == 403, name
    detail = client.get(reverse("admin:django_flyworkers_workermachine_change", args=[1]))
    assert ">Stop<" not in detail.content.decode() and ">Destroy<" not in detail.content.decode()
    assert ScaleEvent.objects.count() == 0


def test_admin_index_and_changelists_link_to_the_dashboard(
    operator: Client, wake_off: None
) -> None:
    index = operator.get("/admin/").content.decode()
    assert "Fly workers" in index and f'href="{DASHBOARD}"' in index
    for model in ("workermachine", "flyjob", "scaleevent"):
        page = operator.get(f"/admin/django_flyworkers/{model}/").content.decode()
        assert f'href="{DASHBOARD}"' in page, model


# -- what the cards say ----------------------------------------------------------------------------


def test_cards_show_redis_and_ledger_numbers(operator: Client, wake_off: None) -> None:
    queue = django_rq.get_queue("default")
    for i in range(3):
        queue.enqueue(jobs.add, i, i)
    queue.enqueue_in(timedelta(minutes=5), jobs.add, 9, 9)
    conn = queue.connection
    conn.zadd(presence.active_key("default"), {"m-live": time.time() + 60})
    presence.mark_booting(conn, "default", "m-boot", 60)
    machine("m-live", state="stopped")  # the ledger lags; Redis says it serves
    machine("m-idle", state="stopped")
    machine("m-gone", state="destroyed")
    machine("m-img", queue="images", state="suspended")
    for i in range(4):
        job(f"ok-{i}", ago=30 + i)
    job("bad-1", status="failed", error="Traceback\nRuntimeError: boom")
    job("old-1", ago=5 * 3600)  # finished within 24 h, not within the hour

    data = json.loads(operator.get(LIVE).content)
    default = card(data, "default")
    assert (default["queued"], default["scheduled"]) == (3, 1)
    assert default["oldest_age"] is not None and default["oldest_age"] < 60
    assert default["next_due"] is not None
    assert default["machines"] == {
        "started": 1,
        "booting": 1,
        "stopped": 1,
        "suspended": 0,
        "other": 0,
    }
    assert card(data, "images")["machines"]["suspended"] == 1
    assert (default["finished_1h"], default["failed_1h"]) == (4, 1)
    assert (default["finished_24h"], default["failed_24h"]) == (5, 1)
    assert default["max_machines"] == 2
    assert data["global"] == {"in_use": 2, "max": 20}

    page = operator.get(DASHBOARD).content.decode()
    default_card = re.search(r'data-queue="default".*?</article>', page, re.S)
    assert default_card
    assert re.search(r'data-field="queued">3<', default_card.group(0))
    assert re.search(r'data-field="finished_1h">4<', default_card.group(0))


def test_wait_percentiles_are_nearest_rank(operator: Client, wake_off: None) -> None:
    waits = [0.5 * (i + 1) for i in range(20)]  # 0.5 .. 10 s
    for i, wait in enumerate(waits):
        job(f"w-{i}", wait=wait, ago=120 + i)
    job("w-old", wait=500, ago=3 * 3600)  # in the 24 h figures only
    default = card(json.loads(operator.get(LIVE).content), "default")

    def nearest(values: list[float], p: float) -> float:
        ordered = sorted(values)
        return ordered[math.ceil(p * len(ordered)) - 1]

    p50, p95 = default["wait_1h"]
    assert p50 == pytest.approx(nearest(waits, 0.5), abs=0.01)
    assert p95 == pytest.approx(nearest(waits, 0.95), abs=0.01)
    assert default["wait_24h"][1] == pytest.approx(nearest([*waits, 500], 0.95), abs=0.01)


def test_nearest_rank_is_the_smallest_value_whose_share_reaches_p() -> None:
    from django_flyworkers.dashboard.sql import _nearest_ranks

    assert _nearest_ranks([1.0, 2.0, 2.0, 2.0, 3.0], (0.5, 0.8, 0.81, 1.0)) == [2.0, 2.0, 3.0, 3.0]
    # 0.07 * 100 is 7.000000000000001 in floating point: the 7th value, not the 8th.
    assert _nearest_ranks([float(i) for i in range(100)], (0.07, 0.95)) == [6.0, 94.0]
    assert _nearest_ranks([4.0], (0.0, 0.5, 1.0)) == [4.0, 4.0, 4.0]
    assert _nearest_ranks([], (0.5,)) == [None]


def test_costs_use_run_seconds_and_published_prices(operator: Client, wake_off: None) -> None:
    from django_flyworkers.prices import PUBLISHED

    now = timezone.now()
    machine(
        "m-cost",
        queue="images",
        state="stopped",
        guest={"cpu_kind": "performance", "cpus": 2, "memory_mb": 4096},
    )
    run("m-cost", "images", now - timedelta(hours=2), now - timedelta(hours=1))  # 3600 s
    run(
        "m-cost",
        "images",
        now - timedelta(days=3),
        now - timedelta(days=3) + timedelta(seconds=600),
    )
    images = card(json.loads(operator.get(LIVE).content), "images")
    rate = PUBLISHED[("performance", 2, 4096)]
    assert images["billed_24h"] == pytest.approx(3600, abs=1)
    assert images["billed_30d"] == pytest.approx(4200, abs=1)
    # The Machine exists since a moment ago (created_at is now): no stopped time to add yet.
    assert images["cost_24h"] == pytest.approx(3600 * rate, rel=1e-3)


def test_a_queue_that_needs_attention_says_so(
    operator: Client, wake_off: None, settings: Any
) -> None:
    settings.FLYWORKERS = {**settings.FLYWORKERS, "BOOT_TIMEOUT": 1, "STUCK_AFTER": 0}
    queue = django_rq.get_queue("default")
    queue.enqueue(jobs.add, 1, 1)
    conn = queue.connection
    key = queue.job_class.key_for(conn.lindex(queue.key, 0).decode())
    old = (timezone.now() - timedelta(minutes=5)).isoformat()
    conn.hset(key, "enqueued_at", old)  # queued 5 minutes ago, no Machine coming
    for i in range(4):
        job(f"f-{i}", status="failed", error="boom")
    machine("m-stuck", state="started")
    WorkerMachine.objects.filter(machine_id="m-stuck").update(
        updated_at=timezone.now() - timedelta(minutes=1)
    )
    attention = card(json.loads(operator.get(LIVE).content), "default")["attention"]
    said = " | ".join(attention)
    assert "no Machine is started or booting" in said
    assert "4 of 4 jobs failed in the last hour" in said
    assert "m-stuck is started without a live worker" in said
    assert "fw-needs-attention" in operator.get(DASHBOARD).content.decode()


# -- charts and timeline -----------------------------------------------------------------------


def test_charts_have_a_bar_per_bucket_with_jobs_and_markers_for_events(
    operator: Client, wake_off: None
) -> None:
    m = machine("m-chart", state="stopped")
    now = timezone.now()
    run("m-chart", "default", now - timedelta(minutes=20), now - timedelta(minutes=12))
    job("c-1", ago=19 * 60, on=m)  # three different minutes
    job("c-2", ago=17 * 60, on=m)
    job("c-3", ago=15 * 60, on=m, status="failed", error="x")
    ledger.record_scale_event("default", "create", machine_id="m-chart", reason="enqueue")
    ledger.record_scale_event("default", "start", outcome="error", detail="503")
    page = operator.get(DASHBOARD + "?window=1h").content.decode()
    jobs_svg = re.search(r'<svg class="fw-chart fw-jobs".*?</svg>', page, re.S)
    wait_svg = re.search(r'<svg class="fw-chart fw-wait".*?</svg>', page, re.S)
    machines_svg = re.search(r'<svg class="fw-chart fw-machines".*?</svg>', page, re.S)
    assert jobs_svg and wait_svg and machines_svg
    assert jobs_svg.group(0).count('class="bar finished"') == 2
    assert jobs_svg.group(0).count('class="bar failed"') == 1
    assert wait_svg.group(0).count('class="point"') == 3
    # The run spans 8 or 9 one-minute buckets (it need not start on a whole minute).
    assert machines_svg.group(0).count('class="point"') in (8, 9)
    # Both events happened this minute: one marker, an error one.
    assert machines_svg.group(0).count('<g class="marker error">') == 1


def test_machines_running_is_run_seconds_inside_each_bucket_over_its_width(
    wake_off: None,
) -> None:
    from datetime import UTC, datetime

    from django_flyworkers.dashboard import queries

    now = math.floor(time.time() / 60) * 60 + 30.0  # half way through this minute
    window = queries.span("1h", now=now)
    origin = window.origin

    def at(seconds: float) -> Any:
        return datetime.fromtimestamp(origin + seconds, UTC)

    for name, began, ended in [
        ("m-a", 10 * 60 + 15, 12 * 60 + 45),  # 45 s, a whole minute, 45 s
        ("m-b", 11 * 60, 12 * 60),  # exactly minute 11
        ("m-c", 20 * 60 + 10, 20 * 60 + 40),  # 30 s inside minute 20
        ("m-d", -100, 30),  # began before the window
        ("m-e", 59 * 60, None),  # still running: up to now, 30 s into minute 59
    ]:
        machine(name)
        run(name, "default", at(began), None if ended is None else at(ended))
    running = queries.charts(window).running
    expected = [0.0] * 60
    expected[0], expected[10], expected[11], expected[12] = 0.5, 0.75, 2.0, 0.75
    expected[20], expected[59] = 0.5, 0.5
    assert running == pytest.approx(expected, abs=1e-3)


def test_timeline_draws_runs_with_their_jobs_linking_to_the_job_page(
    operator: Client, wake_off: None
) -> None:
    now = timezone.now()
    a, b = machine("m-a"), machine("m-b", queue="images")
    run("m-a", "default", now - timedelta(minutes=30), now - timedelta(minutes=25))
    run("m-a", "default", now - timedelta(minutes=10), None)  # still running
    run("m-b", "images", now - timedelta(minutes=40), now - timedelta(minutes=35))
    first = job("t-1", ago=29 * 60, on=a)
    job("t-2", ago=9 * 60, on=a)
    job("t-3", queue="images", ago=39 * 60, on=b)
    page = operator.get(DASHBOARD).content.decode()
    svg = re.search(r'<svg class="fw-chart fw-timeline".*?</svg>', page, re.S)
    assert svg
    rows = re.findall(r'<g class="machine-row" data-machine="([^"]+)">', svg.group(0))
    assert sorted(rows) == ["m-a", "m-b"]
    assert svg.group(0).count('class="run') == 3 and svg.group(0).count('class="run running"') == 1
    assert svg.group(0).count('<rect class="job') == 3
    assert reverse("admin:django_flyworkers_flyjob_change", args=[first.pk]) in svg.group(0)


# -- bounded queries -----------------------------------------------------------------------------


def history(n: int) -> None:
    """``n`` Machines, each with a run and five jobs, and as many scaling events."""
    now = timezone.now()
    machines = WorkerMachine.objects.bulk_create(
        WorkerMachine(
            machine_id=f"bulk{n}-{i}", queue=("default", "images")[i % 2], state="stopped"
        )
        for i in range(n)
    )
    MachineRun.objects.bulk_create(
        MachineRun(
            machine=m,
            queue=m.queue,
            started_at=now - timedelta(minutes=i % 50 + 5),
            stopped_at=now - timedelta(minutes=i % 50),
            billed_seconds=300.0,
        )
        for i, m in enumerate(machines)
    )
    FlyJob.objects.bulk_create(
        FlyJob(
            job_id=f"bulk{n}-{i}-{k}",
            queue=m.queue,
            status=("finished", "failed")[k == 4],
            machine=m,
            attempts=1,
            error="boom" if k == 4 else "",
            enqueued_at=now - timedelta(minutes=i % 50 + 4, seconds=k + 1),
            started_at=now - timedelta(minutes=i % 50 + 4),
            ended_at=now - timedelta(minutes=i % 50 + 3),
        )
        for i, m in enumerate(machines)
        for k in range(5)
    )
    ScaleEvent.objects.bulk_create(
        ScaleEvent(queue="default", action=("start", "stop")[i % 2], machine_id=f"bulk{n}-{i}")
        for i in range(n)
    )


def test_query_count_does_not_grow_with_rows(operator: Client, wake_off: None) -> None:
    counts = []
    for n in (4, 120):
        history(n)
        operator.get(DASHBOARD)  # session and permission caches warm
        with CaptureQueriesContext(connection) as page:
            assert operator.get(DASHBOARD).status_code == 200
        with CaptureQueriesContext(connection) as live:
            assert operator.get(LIVE).status_code == 200
        counts.append((len(page), len(live)))
    assert counts[0] == counts[1], counts
    assert counts[0][0] <= 30, counts


# -- actions -------------------------------------------------------------------------------------


def test_bad_input_is_an_admin_error_and_changes_nothing(operator: Client, wake_off: None) -> None:
    machine("m-bad")
    job("j-ok", status="finished")
    cases = [
        ({"name": "wake", "queue": "nope"}, "Unknown queue 'nope'"),
        ({"name": "pool", "queue": "default", "count": "3"}, "outside 0..2"),
        ({"name": "pool", "queue": "default", "count": "-1"}, "outside 0..2"),
        ({"name": "pool", "queue": "default", "count": "two"}, "must be a whole number"),
        ({"name": "retry", "job": "no-such-job"}, "Unknown job 'no-such-job'"),
        ({"name": "retry", "job": "j-ok"}, "is finished, not failed"),
        ({"name": "delete", "job": "no-such-job"}, "Unknown job"),
        ({"name": "stop", "machine": "m-nope"}, "Unknown Machine 'm-nope'"),
        ({"name": "destroy", "machine": "m-nope"}, "Unknown Machine"),
        ({"name": "explode"}, "Unknown action 'explode'"),
    ]
    for fields, message in cases:
        for confirm in ("", "yes"):
            response = operator.post(ACTION, {**fields, "confirm": confirm}, follow=True)
            said = " ".join(str(m) for m in response.context["messages"])
            assert message in said, (fields, said)
    assert ScaleEvent.objects.count() == 0
    assert FlyJob.objects.get(job_id="j-ok").status == "finished"


def test_every_action_asks_first(operator: Client, wake_off: None) -> None:
    machine("m-ask")
    job("j-ask", status="failed", error="boom")
    fields = {"queue": "default", "job": "j-ask", "machine": "m-ask"}
    for name in ("wake", "pool", "reap", "retry", "delete", "stop", "destroy"):
        response = operator.post(ACTION, {"name": name, **fields})
        page = response.content.decode()
        assert response.status_code == 200 and "are you sure?" in page, name
        assert 'name="confirm" value="yes"' in page and "csrfmiddlewaretoken" in page
    assert ScaleEvent.objects.count() == 0
    assert FlyJob.objects.filter(job_id="j-ask", status="failed").exists()


def test_actions_need_a_csrf_token(admin_user: User, wake_off: None) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    assert client.post(ACTION, {"name": "wake", "queue": "default"}).status_code == 403


def failed_job(queue_name: str = "default") -> Any:
    """A job that really failed: enqueued through FlyQueue, run by a FlyWorker in-process."""
    queue = django_rq.get_queue(queue_name)
    rq_job = queue.enqueue(jobs.fail, "kaput")
    FlyWorker([queue], connection=queue.connection).work(burst=True)
    assert rq_job.id in queue.failed_job_registry.get_job_ids()
    return rq_job


def test_retry_requeues_through_flyqueue_and_names_the_user(
    operator: Client, wake_off: None
) -> None:
    rq_job = failed_job()
    queue = django_rq.get_queue("default")
    assert FlyJob.objects.get(job_id=rq_job.id).status == "failed"
    response = operator.post(
        ACTION, {"name": "retry", "job": rq_job.id, "confirm": "yes"}, follow=True
    )
    assert f"Job {rq_job.id} requeued" in " ".join(str(m) for m in response.context["messages"])
    assert queue.get_job_ids() == [rq_job.id]
    assert rq_job.id not in queue.failed_job_registry.get_job_ids()
    assert FlyJob.objects.get(job_id=rq_job.id).status == "queued"  # FlyQueue's signal said so
    event = ScaleEvent.objects.get(action="retry")
    assert (event.user, event.queue, event.outcome) == ("admin", "default", "ok")
    assert JobAttempt.objects.get(job_id=rq_job.id, number=1).outcome == "failed"


def test_delete_removes_the_failed_job_from_rq_and_the_ledger(
    operator: Client, wake_off: None
) -> None:
    rq_job = failed_job()
    queue = django_rq.get_queue("default")
    operator.post(ACTION, {"name": "delete", "job": rq_job.id, "confirm": "yes"})
    assert rq_job.id not in queue.failed_job_registry.get_job_ids()
    assert not queue.connection.exists(rq_job.key)
    assert not FlyJob.objects.filter(job_id=rq_job.id).exists()
    assert ScaleEvent.objects.get(action="delete").user == "admin"


def test_stop_is_refused_while_the_machine_runs_a_job(operator: Client, wake_off: None) -> None:
    m = machine("m-busy", state="started")
    job("j-running", status="started", on=m)
    response = operator.post(ACTION, {"name": "stop", "machine": "m-busy"})
    assert "This Machine is running j-running" in response.content.decode()
    response = operator.post(
        ACTION, {"name": "stop", "machine": "m-busy", "confirm": "yes"}, follow=True
    )
    said = " ".join(str(m) for m in response.context["messages"])
    assert "is running j-running: not stopped" in said
    assert ScaleEvent.objects.count() == 0


# -- detail pages --------------------------------------------------------------------------------


def test_job_page_shows_traceback_attempts_arguments_and_links(
    operator: Client, wake_off: None
) -> None:
    rq_job = failed_job()
    row = FlyJob.objects.get(job_id=rq_job.id)
    page = operator.get(reverse("admin:django_flyworkers_flyjob_change", args=[row.pk]))
    html = page.content.decode()
    assert '<pre class="fw-traceback">' in html and "RuntimeError: kaput" in html
    assert "tests.testapp.jobs.fail(&#x27;kaput&#x27;)" in html  # the call, as a repr
    assert 'data-attempt="1"' in html and "failed" in html
    assert f"/admin/django_rq/dashboard/queues/0/{rq_job.id}/" in html  # django-rq's page


def test_job_cost_is_its_share_of_the_run(wake_off: None) -> None:
    from django_flyworkers.dashboard.detail import job_cost
    from django_flyworkers.prices import PUBLISHED

    now = timezone.now()
    m = machine("m-share", guest={"cpu_kind": "shared", "cpus": 1, "memory_mb": 256})
    run("m-share", "default", now - timedelta(seconds=100), now)  # 100 s billed
    short = job("s-1", ago=90, took=10, on=m)
    job("s-2", ago=70, took=30, on=m)
    cost = job_cost(short)
    assert cost is not None
    assert cost.jobs == 2 and cost.share == pytest.approx(0.25)
    rate = PUBLISHED[("shared", 1, 256)]
    assert cost.cost == pytest.approx(100 * rate * 0.25, rel=1e-3)


def test_machine_page_shows_runs_image_guest_region_and_cost(
    operator: Client, wake_off: None
) -> None:
    now = timezone.now()
    m = machine(
        "m-page",
        queue="images",
        region="ams",
        image="registry.fly.io/app:v7",
        guest={"cpu_kind": "performance", "cpus": 1, "memory_mb": 2048},
    )
    run("m-page", "images", now - timedelta(minutes=5), now - timedelta(minutes=4))
    ledger.record_runs_seen([("m-page", "stopped", [(now - timedelta(minutes=4), 0)])])
    job("p-1", queue="images", ago=290, on=m)
    html = operator.get(reverse("admin:django_flyworkers_workermachine_change", args=[m.pk]))
    text = html.content.decode()
    for expected in (
        "registry.fly.io/app:v7",
        "performance-1x, 2048 MB",
        "ams",
        ">Stop<",
        'id="fw-runs"',
        "tests.testapp.jobs.add",
    ):
        assert expected in text, expected
    runs = re.search(r'id="fw-runs".*?</table>', text, re.S)
    assert runs and runs.group(0).count("<tr>") == 2  # header and the one run
    assert "1m 0s" in runs.group(0)  # billed seconds


# -- the ledger's Machine runs -------------------------------------------------------------------


def test_runs_open_on_start_close_on_exit_and_prune(wake_off: None) -> None:
    now = timezone.now()
    machine("m-run")
    ledger.record_run_started("m-run", queue="default", at=now - timedelta(seconds=30))
    ledger.record_run_booted("m-run", queue="default")
    ledger.record_run_ended("m-run", at=now)
    only = MachineRun.objects.get()
    assert only.billed_seconds == pytest.approx(30, abs=0.01) and only.booted_at is not None
    assert (only.cpu_kind, only.cpus, only.memory_mb) == ("shared", 1, 512)  # the queue's GUEST
    # A worker booting without a start the scaler saw opens its own run; a second boot with no
    # exit in between closes the first.
    ledger.record_run_booted("m-run", queue="default")
    ledger.record_run_booted("m-run", queue="default")
    assert MachineRun.objects.filter(stopped_at__isnull=True).count() == 1
    exit_at = timezone.now()
    ledger.record_runs_seen([("m-run", "started", [])])  # the API says it runs: left open
    assert MachineRun.objects.filter(stopped_at__isnull=True).count() == 1
    ledger.record_runs_seen([("m-run", "stopped", [(now, 0), (exit_at, 3)])])
    first, *_, newest = MachineRun.objects.order_by("started_at")
    assert (newest.exit_code, newest.stopped_at, newest.state) == (3, exit_at, "stopped")
    assert first.exit_code == 0  # the exit seen right after its worker left
    assert ledger.prune_runs(timezone.now() + timedelta(seconds=1), ["default"]) == 3
    assert not MachineRun.objects.exists()


def test_a_retried_attempt_keeps_its_traceback(
    operator: Client, wake_off: None, tmp_path: Any
) -> None:
    queue = django_rq.get_queue("default")
    rq_job = queue.enqueue(jobs.flaky, str(tmp_path / "calls"), 2, retry=Retry(max=2))
    FlyWorker([queue], connection=queue.connection).work(burst=True)
    row = FlyJob.objects.get(job_id=rq_job.id)
    assert (row.status, row.attempts) == ("finished", 2)
    first = JobAttempt.objects.get(job_id=rq_job.id, number=1)
    assert first.outcome == "retried" and "RuntimeError: flaky failure 1" in first.error
    html = operator.get(reverse("admin:django_flyworkers_flyjob_change", args=[row.pk])).content
    page = html.decode()
    assert 'data-attempt="1"' in page and 'data-attempt="2"' in page
    assert "Traceback of attempt 1" in page and "flaky failure 1" in page


# -- actions against the emulator ----------------------------------------------------------------


@pytest.fixture
def fly(fly_emulator: Any, redis_flush: Any, settings: Any) -> Any:
    from django_flyworkers.emulator import EmulatorControl
    from django_flyworkers.testing import EMULATOR_TOKEN

    settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": "off"}
    return EmulatorControl(fly_emulator.url, EMULATOR_TOKEN)


def said(response: Any) -> str:
    return " ".join(str(m) for m in response.context["messages"])


def test_pool_size_reap_and_destroy_go_through_the_commands_paths(
    operator: Client, fly: Any
) -> None:
    response = operator.post(
        ACTION, {"name": "pool", "queue": "images", "count": "2", "confirm": "yes"}, follow=True
    )
    assert "Pool of images set to 2: create" in said(response)
    created = {m: i["state"] for m, i in fly.stats()["machines"].items()}
    assert len(created) == 2 and set(created.values()) <= {"created", "stopped"}
    resize = ScaleEvent.objects.get(action="resize")
    assert (resize.user, resize.queue, resize.outcome) == ("admin", "images", "ok")
    assert ScaleEvent.objects.filter(action="create", outcome="ok").count() == 2

    response = operator.post(ACTION, {"name": "reap", "queue": "images", "confirm": "yes"},
                             follow=True)  # fmt: skip
    assert "Reaped images:" in said(response)
    assert ScaleEvent.objects.get(action="reap").user == "admin"

    doomed = next(iter(created))
    response = operator.post(ACTION, {"name": "destroy", "machine": doomed, "confirm": "yes"},
                             follow=True)  # fmt: skip
    assert f"Machine {doomed} destroyed" in said(response)
    assert fly.stats()["machines"][doomed]["state"] == "destroyed"
    assert WorkerMachine.objects.get(machine_id=doomed).state == "destroyed"
    assert ScaleEvent.objects.get(action="destroy", user="admin").machine_id == doomed


def test_destroy_is_refused_while_a_machine_runs(operator: Client, fly: Any) -> None:
    from django_flyworkers.api import get_client
    from django_flyworkers.testing import wait_for

    client = get_client()
    running = client.create(
        {"image": "registry.fly.io/x:1", "init": {"cmd": ["sleep", "60"]},
         "metadata": {"flyworkers_queue": "other"}}, name="flyworkers-other-sleeper",
    )  # fmt: skip
    wait_for(lambda: client.get(running.id).state == "started", what="the Machine started")
    machine(running.id, queue="other", state="started")
    response = operator.post(ACTION, {"name": "destroy", "machine": running.id, "confirm": "yes"},
                             follow=True)  # fmt: skip
    assert f"Machine {running.id} is started: only a stopped Machine" in said(response)
    assert client.get(running.id).state == "started"
    assert not ScaleEvent.objects.filter(action="destroy").exists()
    # Its page reads the state from the API, and Refresh writes it to the ledger.
    page = operator.get(
        reverse(
            "admin:django_flyworkers_workermachine_change",
            args=[WorkerMachine.objects.get(machine_id=running.id).pk],
        )
    )
    assert 'data-field="api-state">started<' in page.content.decode()


def test_reap_prunes_old_runs_and_attempts(fly: Any) -> None:
    from django_flyworkers import reaper

    long_ago = timezone.now() - timedelta(days=40)
    machine("m-old")
    run("m-old", "default", long_ago, long_ago + timedelta(minutes=1))
    JobAttempt.objects.create(job_id="j-old", queue="default", number=1, outcome="failed",
                              ended_at=long_ago)  # fmt: skip
    run("m-old", "default", timezone.now() - timedelta(minutes=5), None)  # recent: kept
    reaper.reap(["default"], dry_run=True)
    assert MachineRun.objects.count() == 2 and JobAttempt.objects.count() == 1
    reaper.reap(["default"])  # PRUNE_AFTER_DAYS is 14
    assert MachineRun.objects.count() == 1 and not JobAttempt.objects.exists()
