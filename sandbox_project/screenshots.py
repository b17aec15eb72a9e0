"""``make screenshots``: run the sandbox, then photograph the dashboard for the README.

    python sandbox_project/screenshots.py [--out docs] [--jobs 40]

Starts ``rundemo.py --serve`` (its own Redis, emulator, scaler and web server, on a fresh
SQLite file), waits for the demo's jobs to end, logs in as the demo's admin with Debian's
chromium (driven by Playwright) and writes ``dashboard.png``, ``dashboard-dark.png``,
``job.png`` (a receipt that failed once and was retried) and ``machine.png`` (an ``images``
Machine) into ``--out``. Then it stops the sandbox with Ctrl-C, as a user would.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

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


def shoot(base: str, chromium: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        for scheme, name in (("light", "dashboard.png"), ("dark", "dashboard-dark.png")):
            context = browser.new_context(
                viewport={"width": WIDTH, "height": 900},
                color_scheme=scheme,  # type: ignore[arg-type]
            )
            page = context.new_page()
            page.goto(f"{base}/admin/django_flyworkers/dashboard/?window=1h")
            if "/login/" in page.url:
                page.fill("#id_username", ADMIN[0])
                page.fill("#id_password", ADMIN[1])
                page.click("input[type=submit]")
                page.wait_for_url(re.compile(r".*/dashboard/.*"))
            page.screenshot(path=str(out / name), full_page=True)
            if scheme == "dark":
                context.close()
                continue
            # A receipt that failed once and succeeded on rq's retry: two attempts.
            page.goto(f"{base}/admin/django_flyworkers/flyjob/?q=send_receipt&o=-5")
            page.locator("#result_list tbody tr th a, #result_list tbody tr td a").first.click()
            page.wait_for_selector("#fw-job")
            page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
            page.screenshot(path=str(out / "job.png"), full_page=True)
            page.goto(f"{base}/admin/django_flyworkers/dashboard/?window=1h")
            images = page.locator('g.machine-row:has(text.sub:text-is("images")) a').first
            images.click()
            page.wait_for_selector("#fw-machine")
            page.screenshot(path=str(out / "machine.png"), full_page=True)
            context.close()
        browser.close()


if __name__ == "__main__":
    sys.exit(main())
