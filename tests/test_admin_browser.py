"""The admin in a real browser (Debian's chromium driven by Playwright) against a live server."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from django_flyworkers import ledger
from django_flyworkers.models import FlyJob, WorkerMachine

pytestmark = pytest.mark.django_db(transaction=True)

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


CHROMIUM_MISSING = (
    "browser tests need a chromium on PATH: apt-get install chromium (Debian/Ubuntu), "
    "brew install --cask chromium (macOS), or your distribution's chromium package"
)


def chromium_executable() -> str:
    """The chromium binary; without one, skip locally but fail under CI, which must run them."""
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
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


@pytest.fixture
def page(browser: Browser, live_server: Any, admin_user: Any) -> Iterator[Page]:
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{live_server.url}/admin/login/")
    page.fill("#id_username", "admin")
    page.fill("#id_password", "password")
    page.click("input[type=submit]")
    page.wait_for_url(f"{live_server.url}/admin/")
    yield page
    context.close()


@pytest.fixture
def history(redis_flush: Any) -> dict[str, Any]:
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
