"""``make screenshots``: run the sandbox, then photograph the dashboard for the README.

    python sandbox_project/screenshots.py [--out docs] [--jobs 40]

Starts ``rundemo.py --serve`` (its own Redis, emulator, scaler and web server, on a fresh
SQLite file), waits for the demo's jobs to end, logs in as the demo's admin with Debian's
chromium (driven by Playwright), uploads three more batches of photos a while apart from the
sandbox's page (so the charts have a few minutes to show), waits for their jobs and Machines,
and writes ``dashboard.png``, ``dashboard-dark.png``,
``job.png`` (a receipt that failed once and was retried) and ``machine.png`` (an ``images``
Machine) into ``--out``. Then it stops the sandbox with Ctrl-C, as a user would.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from django_flyworkers.testing import free_port, wait_for  # noqa: E402

ADMIN = ("admin", os.environ.get("DEMO_ADMIN_PASSWORD", "flyworkers"))
WIDTH = 1440


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--jobs", type=int, default=40)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        parser.error("needs Debian's chromium (apt-get install chromium)")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flyworkers-screens-") as tmp:
        port = free_port()
        log = Path(tmp) / "demo.out"
        env = {
            **os.environ,
            "DATABASE_URL": f"sqlite:///{tmp}/screens.sqlite3",
            "DEMO_STATE_DIR": str(Path(tmp) / "state"),
            "DEMO_JOBS": str(args.jobs),
        }
        with log.open("w") as out:
            demo = subprocess.Popen(
                [sys.executable, str(HERE / "rundemo.py"), "--serve", "--port", str(port)],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=HERE,
            )  # fmt: skip
        try:
            wait_for(
                lambda: "Serving http" in log.read_text() or demo.poll() is not None,
                timeout=300, what="the demo to finish its jobs", interval=0.5,
            )  # fmt: skip
            if demo.poll() is not None:
                sys.stderr.write(log.read_text())
                return 1
            SHELL_ENV.update(shell_environment(log.read_text()))
            shoot(f"http://127.0.0.1:{port}", chromium, args.out)
        finally:
            demo.send_signal(signal.SIGINT)  # the demo stops everything it started
            try:
                demo.wait(60)
            except subprocess.TimeoutExpired:
                demo.kill()
    for name in ("dashboard.png", "dashboard-dark.png", "job.png", "machine.png"):
        print(args.out / name)
    return 0


BATCHES = (6, 14, 4, 10)
BATCH_EVERY = 70.0
FAILING = "from gallery import jobs; jobs.make_thumbnail.delay(10**9)"
"""A thumbnail of a photo that does not exist: a failed job for the Failed jobs list."""


def log_in(page: Any, url: str) -> None:
    page.goto(url)
    if "/login/" in page.url:
        page.fill("#id_username", ADMIN[0])
        page.fill("#id_password", ADMIN[1])
        page.click("input[type=submit]")
        page.wait_for_load_state()


def idle(page: Any, base: str) -> bool:
    """Nothing queued or running, and every Machine stopped (from the dashboard's feed)."""
    data = page.request.get(f"{base}/admin/django_flyworkers/dashboard/live.json").json()
    return all(
        q["queued"] == 0 and q["running"] == 0 and q["machines"]["started"] == 0
        and q["machines"]["booting"] == 0
        for q in data["queues"].values()
    )  # fmt: skip


SHELL_ENV: dict[str, str] = {}


def enqueue_shell(code: str) -> None:
    """Run ``code`` in ``manage.py shell`` with the sandbox's environment (as its workers)."""
    env = {**os.environ, **SHELL_ENV}
    subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code], cwd=HERE, env=env, check=True,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip


def shell_environment(log: str) -> dict[str, str]:
    """The variables the demo prints for enqueueing from a shell (``KEY=value`` pairs)."""
    line = next((line for line in log.splitlines() if "manage.py shell -c" in line), "")
    if "&&" not in line:
        return {}
    words = shlex.split(line.split("&&", 1)[1])
    return dict(word.split("=", 1) for word in words if "=" in word and not word.startswith("'"))


def upload(page: Any, base: str) -> None:
    """Batches of photos from the sandbox's page, a while apart, as uploads arrive."""
    for i, count in enumerate(BATCHES):
        if i:
            time.sleep(BATCH_EVERY)
        if i == 2 and SHELL_ENV:
            enqueue_shell(FAILING)
        page.goto(f"{base}/")
        page.fill("input[name=count]", str(count))
        page.click("button[value=upload]")
        page.wait_for_load_state()
    wait_for(lambda: idle(page, base), timeout=300, what="the uploads' jobs", interval=1.0)


def shoot(base: str, chromium: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    dashboard = f"{base}/admin/django_flyworkers/dashboard/?window=15m"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        setup = browser.new_context()
        page = setup.new_page()
        log_in(page, f"{base}/admin/")
        upload(page, base)
        state = setup.storage_state()
        setup.close()
        for scheme, name in (("light", "dashboard.png"), ("dark", "dashboard-dark.png")):
            context = browser.new_context(
                viewport={"width": WIDTH, "height": 900},
                color_scheme=scheme,  # type: ignore[arg-type]
                storage_state=state,
            )
            page = context.new_page()
            page.goto(dashboard)
            page.screenshot(path=str(out / name), full_page=True)
            if scheme == "dark":
                context.close()
                continue
            # A receipt that failed once and succeeded on rq's retry: two attempts.
            page.goto(f"{base}/admin/django_flyworkers/flyjob/?q=send_receipt&o=-4")
            page.locator("#result_list tbody tr th a").first.click()
            page.wait_for_selector("#fw-job")
            page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
            page.screenshot(path=str(out / "job.png"), full_page=True)
            page.goto(dashboard)
            images = page.locator('g.machine-row:has(text.sub:text-is("images")) a').first
            images.click()
            page.wait_for_selector("#fw-machine")
            page.screenshot(path=str(out / "machine.png"), full_page=True)
            context.close()
        browser.close()


if __name__ == "__main__":
    sys.exit(main())
