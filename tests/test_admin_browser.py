"""The admin in a real browser (Debian's chromium driven by Playwright) against a live server.

The dashboard tests run jobs for real first: the emulator starts Machines whose workers write
the ledger, and the browser then reads what an operator would.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from playwright.sync_api import Browser, Page, sync_playwright

from django_flyworkers import ledger
from django_flyworkers.emulator import EmulatorControl
from django_flyworkers.models import FlyJob, JobAttempt, MachineRun, ScaleEvent, WorkerMachine
from django_flyworkers.testing import EMULATOR_TOKEN, wait_for
from tests.testapp import jobs

# One xdist process runs them all (`--dist loadgroup`): one chromium, one live server. The
# group is one unit of about 20 s, so it starts among the slow tests.
pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(240),
    pytest.mark.xdist_group("browser"),
    pytest.mark.slow(20),
]

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DASHBOARD = "/admin/django_flyworkers/dashboard/"


CHROMIUM_MISSING = (
    "browser tests need a chromium on PATH: apt-get install chromium-headless-shell or "
    "apt-get install chromium (Debian/Ubuntu), brew install --cask chromium (macOS), or your "
    "distribution's chromium package"
)
# Debian's old headless shell first: the same Blink without the desktop browser around it
# (no GPU process, no browser UI), so the same pages cost about half the CPU.
CHROMIUM_NAMES = ("chromium-headless-shell", "chromium", "chromium-browser")


def chromium_executable() -> str:
    """The chromium binary; without one, skip locally but fail under CI, which must run them."""
    for name in CHROMIUM_NAMES:
        executable = shutil.which(name)
        if executable:
            return executable
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true and no chromium found: {CHROMIUM_MISSING}", pytrace=False)
    pytest.skip(CHROMIUM_MISSING)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    executable = chromium_executable()
    # Playwright's sync API keeps an event loop on this thread; the ORM calls the tests make
    # here are still synchronous, so tell Django they are safe.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
            yield browser
            browser.close()
    finally:
        os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)


def log_in(browser: Browser, live_server: Any, username: str, password: str) -> Page:
    page = browser.new_context().new_page()
    page.goto(f"{live_server.url}/admin/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("input[type=submit]")
    page.wait_for_url(f"{live_server.url}/admin/")
    return page


@pytest.fixture
def page(browser: Browser, live_server: Any, admin_user: Any) -> Iterator[Page]:
    page = log_in(browser, live_server, "admin", "password")
    yield page
    page.context.close()


@pytest.fixture
def fly(fly_emulator: Any, redis_flush: Any) -> EmulatorControl:
    return EmulatorControl(fly_emulator.url, EMULATOR_TOKEN)


@pytest.fixture
def history(fly: EmulatorControl) -> dict[str, Any]:
    ledger.record_machine_seen(
        "148ed726c55d89", queue="images", state="stopped", region="ord", image="app:v3"
    )
    ledger.record_machine_seen("3d8d413b29d089", queue="default", state="started", region="ams")
    machine = WorkerMachine.objects.get(machine_id="148ed726c55d89")
    FlyJob.objects.create(
        job_id="job-thumb-1", queue="images", func_name="photos.jobs.make_thumbnail",
        status="finished", machine=machine, attempts=1,
    )  # fmt: skip
    FlyJob.objects.create(
        job_id="job-mail-2", queue="default", func_name="mail.jobs.send_welcome",
        status="failed", attempts=3, error="SMTPServerDisconnected: Connection unexpectedly closed",
    )  # fmt: skip
    FlyJob.objects.create(job_id="job-mail-3", queue="default", func_name="mail.jobs.send_welcome")
    ledger.record_scale_event("images", "create", machine_id="148ed726c55d89", reason="enqueue")
    return {"machine": machine}


def rows(page: Page) -> list[str]:
    return [row.inner_text() for row in page.locator("#result_list tbody tr").all()]


def test_job_list_filters_search_and_links_to_machine(
    page: Page, live_server: Any, history: dict[str, Any], tmp_path: Path
) -> None:
    page.goto(f"{live_server.url}/admin/django_flyworkers/flyjob/")
    assert len(rows(page)) == 3
    assert "Add fly job" not in page.content()  # history is read-only

    page.locator("#changelist-filter a", has_text="images").first.click()  # the queue filter
    page.wait_for_url(re.compile(r".*/flyjob/\?queue(__exact)?=images$"))  # Django 5 / 6
    (only,) = rows(page)
    assert "photos.jobs.make_thumbnail" in only and "Finished" in only

    page.goto(f"{live_server.url}/admin/django_flyworkers/flyjob/?q=job-mail-2")
    (found,) = rows(page)
    assert "Failed" in found
    page.goto(f"{live_server.url}/admin/django_flyworkers/flyjob/?status__exact=queued")
    assert len(rows(page)) == 1

    page.goto(f"{live_server.url}/admin/django_flyworkers/flyjob/?q=148ed726c55d89")  # by Machine
    assert len(rows(page)) == 1
    page.get_by_role("link", name="148ed726c55d89").click()
    pk = history["machine"].pk
    page.wait_for_url(f"**/admin/django_flyworkers/workermachine/{pk}/change/")
    assert "app:v3" in page.content()
    page.screenshot(path=str(tmp_path / "machine.png"), full_page=True)


def test_machine_and_event_lists(page: Page, live_server: Any, history: dict[str, Any]) -> None:
    page.goto(f"{live_server.url}/admin/django_flyworkers/workermachine/?state__exact=started")
    (running,) = rows(page)
    assert "3d8d413b29d089" in running and "ams" in running
    page.goto(f"{live_server.url}/admin/django_flyworkers/workermachine/?region__exact=ord")
    assert len(rows(page)) == 1
    page.goto(f"{live_server.url}/admin/django_flyworkers/scaleevent/")
    (event,) = rows(page)
    assert "create" in event and "148ed726c55d89" in event


def test_the_browser_tests_share_one_process(request: pytest.FixtureRequest) -> None:
    # pytest-xdist's loadgroup sends a group to one process by a "@group" suffix it appends to
    # node ids; where it cannot (pytest 9.2), each process would start its own chromium.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        assert request.node.nodeid.endswith("@browser")


@pytest.mark.parametrize("ci", ["", "true"])
def test_missing_chromium_skips_locally_and_fails_under_ci(
    ci: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no chromium on PATH
    monkeypatch.setenv("CI", ci)
    outcome = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(outcome) as raised:
        chromium_executable()
    assert "apt-get install chromium" in str(raised.value)
    assert ("CI=true" in str(raised.value)) == bool(ci)


# -- the dashboard after real runs on the emulator -----------------------------------------------


def machines_of(fly: EmulatorControl, queue: str) -> dict[str, str]:
    """Machine id -> state, for the queue's Machines on the emulator."""
    return {
        machine_id: info["state"]
        for machine_id, info in fly.stats()["machines"].items()
        if (info.get("config") or {}).get("metadata", {}).get("flyworkers_queue") == queue
    }


def settled(fly: EmulatorControl, ids: list[str]) -> bool:
    """Every job ended, every Machine stopped, every run closed by its worker."""
    return (
        FlyJob.objects.filter(job_id__in=ids, status__in=["finished", "failed"]).count() == len(ids)
        and all(info["state"] == "stopped" for info in fly.stats()["machines"].values())
        and MachineRun.objects.exists()
        and not MachineRun.objects.filter(stopped_at__isnull=True).exists()
    )


def real_run(fly: EmulatorControl) -> list[str]:
    enqueued = [jobs.add.delay(i, i) for i in range(6)] + [jobs.fail.delay("kaput")]
    enqueued += [jobs.slow_add.delay(i, 1, 0.3) for i in range(3)]
    ids = [job.id for job in enqueued]
    wait_for(lambda: settled(fly, ids), what="the jobs ended and the Machines stopped")
    return ids


def minutes(moments: list[datetime | None]) -> set[int]:
    return {math.floor(m.timestamp() / 60) for m in moments if m is not None}


def field(page: Page, queue: str, name: str) -> str:
    return page.locator(f'article[data-queue="{queue}"] [data-field="{name}"]').inner_text()


def test_dashboard_after_a_real_run(
    page: Page, live_server: Any, fly: EmulatorControl, settings: Any
) -> None:
    ids = real_run(fly)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url) if "live.json" in r.url else None)
    page.clock.install()
    page.goto(f"{live_server.url}{DASHBOARD}?window=1h")

    # The cards.
    assert field(page, "default", "finished_1h") == "6"
    assert field(page, "default", "failed_1h") == "1"
    assert field(page, "default", "failed") == "1"  # rq's failed registry
    assert field(page, "default", "queued") == "0"
    assert field(page, "images", "finished_1h") == "3"
    for queue in ("default", "images"):
        stopped = page.locator(f'article[data-queue="{queue}"] [data-state="stopped"]')
        assert stopped.inner_text() == f"{len(machines_of(fly, queue))} stopped"
    assert "$" in field(page, "images", "cost_24h")

    # The charts: a bar per minute with jobs, a point per minute with starts or Machines.
    rows_ = list(FlyJob.objects.filter(job_id__in=ids))
    finished = minutes([r.ended_at for r in rows_ if r.status == "finished"])
    failed = minutes([r.ended_at for r in rows_ if r.status == "failed"])
    assert page.locator("svg.fw-jobs rect.bar.finished").count() == len(finished)
    assert page.locator("svg.fw-jobs rect.bar.failed").count() == len(failed)
    assert page.locator("svg.fw-wait circle.point").count() == len(
        minutes([r.started_at for r in rows_])
    )
    running: set[int] = set()
    for run in MachineRun.objects.all():
        assert run.stopped_at is not None
        first, last = (math.floor(m.timestamp() / 60) for m in (run.started_at, run.stopped_at))
        running |= set(range(first, last + 1))
    assert page.locator("svg.fw-machines circle.point").count() == len(running)
    assert page.locator("svg.fw-machines g.marker").count() >= 1  # the creates

    # The timeline: a row per Machine, a bar per run, the ten jobs inside, linked.
    assert page.locator("svg.fw-timeline g.machine-row").count() == WorkerMachine.objects.count()
    assert page.locator("svg.fw-timeline rect.run").count() == MachineRun.objects.count()
    assert page.locator("svg.fw-timeline rect.job").count() == 10

    # Live: the numbers change without a reload, and not while the tab is hidden.
    settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": "off"}
    jobs.add.delay(1, 1)
    page.clock.run_for(6000)
    page.wait_for_function("document.getElementById('fw-dashboard').dataset.refreshes === '1'")
    assert field(page, "default", "queued") == "1"
    set_visibility = (
        "state => { Object.defineProperty(document, 'visibilityState', "
        "{configurable: true, get: () => state}); "
        "document.dispatchEvent(new Event('visibilitychange')); }"
    )
    page.evaluate(set_visibility, "hidden")
    asked = len(requests)
    page.clock.run_for(30_000)
    assert len(requests) == asked
    page.evaluate(set_visibility, "visible")
    page.wait_for_function("document.getElementById('fw-dashboard').dataset.refreshes === '2'")

    # A job of the timeline links to its page: attempts, traceback, arguments. (At this scale
    # the jobs of a second overlap, so follow the link rather than aim the mouse at it.)
    failed_row = FlyJob.objects.get(job_id__in=ids, status="failed")
    link = page.locator(f'svg.fw-timeline a[href$="/flyjob/{failed_row.pk}/change/"]')
    page.goto(f"{live_server.url}{link.get_attribute('href')}")
    page.wait_for_selector("#fw-job")
    assert "RuntimeError: kaput" in page.locator("pre.fw-traceback").first.inner_text()
    assert page.locator("#fw-attempts tr[data-attempt]").count() == 1
    assert "tests.testapp.jobs.fail('kaput')" in page.locator("pre.fw-args").inner_text()


def test_viewers_see_no_buttons_and_anonymous_users_log_in(
    browser: Browser, live_server: Any, fly: EmulatorControl
) -> None:
    failing = jobs.fail.delay("kaput")
    wait_for(lambda: settled(fly, [failing.id]), what="the failing job ran")
    viewer = User.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_flyjob"))

    page = log_in(browser, live_server, "viewer", "pw")
    page.goto(f"{live_server.url}{DASHBOARD}")
    assert page.locator(f'#fw-failed tr[data-job="{failing.id}"]').count() == 1
    for label in ("Wake now", "Set pool size…", "Reap now", "Retry", "Delete"):
        assert page.get_by_role("button", name=label).count() == 0, label
    machine = WorkerMachine.objects.get()
    page.goto(f"{live_server.url}/admin/django_flyworkers/workermachine/{machine.pk}/change/")
    assert page.get_by_role("button", name="Stop").count() == 0
    token = next(c["value"] for c in page.context.cookies() if c["name"] == "csrftoken")
    before = fly.stats()["calls"]
    for fields in (
        {"name": "wake", "queue": "default"},
        {"name": "retry", "job": failing.id},
        {"name": "stop", "machine": machine.machine_id},
    ):
        response = page.request.post(
            f"{live_server.url}{DASHBOARD}action/",
            form={**fields, "confirm": "yes", "csrfmiddlewaretoken": token},
            headers={"Referer": f"{live_server.url}{DASHBOARD}"},
        )
        assert response.status == 403, fields
    assert fly.stats()["calls"] == before  # nothing reached the Machines API
    assert FlyJob.objects.get(job_id=failing.id).status == "failed"
    page.context.close()

    anonymous = browser.new_context().new_page()
    anonymous.goto(f"{live_server.url}{DASHBOARD}")
    assert anonymous.url.startswith(f"{live_server.url}/admin/login/?next=")
    assert anonymous.locator("#id_username").count() == 1
    anonymous.context.close()


def confirm(page: Page, scope: str, button: str, yes: str) -> None:
    """Press an action's button, then its confirmation page's "Yes"."""
    page.locator(scope).get_by_role("button", name=button).click()
    page.wait_for_selector(".fw-confirm")
    page.get_by_role("button", name=yes).click()
    page.wait_for_load_state()


def messages(page: Page) -> str:
    return " ".join(page.locator("ul.messagelist li").all_inner_texts())


def test_wake_now_starts_a_machine(
    page: Page, live_server: Any, fly: EmulatorControl, settings: Any
) -> None:
    settings.FLYWORKERS = {**settings.FLYWORKERS, "WAKE_MODE": "off"}
    enqueued = [jobs.add.delay(i, 1) for i in range(2)]
    assert fly.stats()["machines"] == {}
    page.goto(f"{live_server.url}{DASHBOARD}")
    assert field(page, "default", "queued") == "2"
    confirm(page, 'article[data-queue="default"]', "Wake now", "Yes, wake now")
    assert "Woke default" in messages(page)
    assert len(machines_of(fly, "default")) == 1
    wait_for(
        lambda: FlyJob.objects.filter(job_id__in=[j.id for j in enqueued], status="finished")
        .count() == 2,
        what="the woken Machine ran the jobs",
    )  # fmt: skip
    event = ScaleEvent.objects.get(action="wake")
    assert (event.user, event.queue, event.outcome) == ("admin", "default", "ok")


def test_retry_runs_a_failed_job_to_success(
    page: Page, live_server: Any, fly: EmulatorControl, tmp_path: Path
) -> None:
    flaky = jobs.flaky.using(retry=0).delay(str(tmp_path / "calls"), 2)  # fails the first time
    wait_for(lambda: settled(fly, [flaky.id]), what="the first attempt failed")
    assert FlyJob.objects.get(job_id=flaky.id).status == "failed"
    page.goto(f"{live_server.url}{DASHBOARD}")
    confirm(page, f'#fw-failed tr[data-job="{flaky.id}"]', "Retry", "Yes, retry")
    assert f"Job {flaky.id} requeued" in messages(page)
    wait_for(
        lambda: FlyJob.objects.filter(job_id=flaky.id, status="finished").exists(),
        what="the retried job finished",
    )
    row = FlyJob.objects.get(job_id=flaky.id)
    assert row.attempts == 2
    assert JobAttempt.objects.get(job_id=flaky.id, number=1).outcome == "failed"
    assert ScaleEvent.objects.get(action="retry").user == "admin"
    page.goto(f"{live_server.url}/admin/django_flyworkers/flyjob/{row.pk}/change/")
    assert page.locator("#fw-attempts tr[data-attempt]").count() == 2


def test_stop_stops_an_idle_machine_and_refuses_a_busy_one(
    page: Page, live_server: Any, fly: EmulatorControl, settings: Any, tmp_path: Path
) -> None:
    queues = settings.FLYWORKERS["QUEUES"]
    settings.FLYWORKERS = {
        **settings.FLYWORKERS,
        "QUEUES": {**queues, "other": {**queues["other"], "IDLE_TIMEOUT": 300}},
    }
    done = jobs.sleep_then_write.delay(str(tmp_path / "done"), 0.1)  # then idles on "other"
    busy = jobs.slow_add.delay(1, 2, 120)  # runs on "images" for two minutes
    wait_for(
        lambda: FlyJob.objects.filter(job_id=done.id, status="finished").exists()
        and FlyJob.objects.filter(job_id=busy.id, status="started").exists(),
        what="one Machine idle, one busy",
    )  # fmt: skip
    idle_id = next(iter(machines_of(fly, "other")))
    busy_id = next(iter(machines_of(fly, "images")))

    busy_pk = WorkerMachine.objects.get(machine_id=busy_id).pk
    page.goto(f"{live_server.url}/admin/django_flyworkers/workermachine/{busy_pk}/change/")
    page.get_by_role("button", name="Stop").click()
    assert f"This Machine is running {busy.id}" in page.locator(".fw-confirm").inner_text()
    page.get_by_role("button", name="Yes, stop").click()
    page.wait_for_load_state()
    assert f"is running {busy.id}: not stopped" in messages(page)
    assert machines_of(fly, "images")[busy_id] == "started"

    idle_pk = WorkerMachine.objects.get(machine_id=idle_id).pk
    page.goto(f"{live_server.url}/admin/django_flyworkers/workermachine/{idle_pk}/change/")
    assert page.locator('[data-field="api-state"]').inner_text() == "started"
    page.get_by_role("button", name="Stop").click()
    page.get_by_role("button", name="Yes, stop").click()
    page.wait_for_load_state()
    assert f"Machine {idle_id} is stopping" in messages(page)
    wait_for(lambda: machines_of(fly, "other")[idle_id] == "stopped", what="the idle one stopped")
    assert machines_of(fly, "images")[busy_id] == "started"
    event = ScaleEvent.objects.get(action="stop")
    assert (event.user, event.machine_id, event.outcome) == ("admin", idle_id, "ok")
