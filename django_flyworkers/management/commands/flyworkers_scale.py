"""manage.py flyworkers_scale: reconcile worker Machines with the work in Redis.

One pass per queue: read demand (queued jobs, scheduled jobs already due, jobs running, the age
of the oldest job) and the Machines, plan with the same pure policy the wake-up path uses, and
apply. It wakes workers for jobs that reached a queue without FlyQueue (django-rq's requeue,
rq's scheduler, abandoned-job retries, rq 3 dependents) and for scheduled jobs whose time has
come, which nothing else does while every Machine is stopped. Run it with ``--watch`` as a
small always-on process (or from cron / a scheduled Machine).
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_flyworkers.management.commands._common import (
    dump,
    one_line_errors,
    positive_seconds,
    queues_from,
    render_reap,
    seconds,
    verbosity_logging,
    whole_number,
)
from django_flyworkers.scaling import scaler


class Command(BaseCommand):
    help = "Start, create or size worker Machines so every queue's work has a worker."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("queues", nargs="*", metavar="QUEUE", help="default: every queue")
        parser.add_argument("--dry-run", action="store_true", help="plan only, change nothing")
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        parser.add_argument(
            "--watch",
            metavar="SECONDS",
            type=positive_seconds,
            help="reconcile every SECONDS until interrupted",
        )
        parser.add_argument(
            "--reap-every",
            metavar="SECONDS",
            type=seconds,
            default=60,
            help="with --watch: also run flyworkers_reap's recovery this often (0: never; "
            "default %(default)s), so one always-on process covers dead Machines too",
        )
        parser.add_argument(
            "--count",
            metavar="N",
            type=whole_number,
            help="size the named queues' pools to N Machines: create stopped ones or "
            "destroy stopped surplus (never a running one)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        with verbosity_logging(options["verbosity"]):
            self._handle(options)

    def _handle(self, options: dict[str, Any]) -> None:
        queues = queues_from(options["queues"])
        watch, count = options["watch"], options["count"]
        if count is not None:
            if watch is not None:
                raise CommandError("--count sizes a pool once; it cannot be combined with --watch.")
            if not options["queues"]:
                raise CommandError("--count needs the QUEUE(s) whose pool to size.")
            for queue in queues:
                if scaler.get_settings().queues[queue].mode == "dedicated":
                    raise CommandError(
                        f"--count: queue {queue!r} is dedicated (a Machine per job): "
                        "it keeps no pool to size."
                    )
                cap = scaler.get_settings().queues[queue].max_machines
                if count > cap:
                    raise CommandError(
                        f"--count {count} is above MAX_MACHINES ({cap}) of queue {queue!r}."
                    )
        if watch is None:
            with one_line_errors():
                self._once(queues, count, options)
        else:
            self._watch(queues, watch, options)

    def _once(self, queues: list[str], count: int | None, options: dict[str, Any]) -> None:
        reports = []
        for queue in queues:
            if count is None:
                outcome = scaler.reconcile(
                    queue, reason="flyworkers_scale", dry_run=options["dry_run"]
                )
            else:
                outcome = scaler.resize(queue, count, dry_run=options["dry_run"])
            reports.append(report(outcome, dry_run=options["dry_run"]))
        if options["json"]:
            self.stdout.write(dump(reports))
        else:
            for item in reports:
                self.stdout.write(render(item))
        if any(item["errors"] for item in reports):
            raise CommandError("some Machines API calls failed; see the errors above.")

    def _watch(self, queues: list[str], interval: float, options: dict[str, Any]) -> None:
        stop = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, lambda *_: stop.set())
        if not options["json"]:
            self.stdout.write(
                f"flyworkers_scale: reconciling {', '.join(queues)} every {interval:g}s "
                "(Ctrl-C to stop)"
            )
        last_reap = time.monotonic()
        while not stop.is_set():
            began = time.monotonic()
            every = options["reap_every"]
            if every and began - last_reap >= every and not options["dry_run"]:
                last_reap = began
                self._reap(queues, options)
            for queue in queues:
                try:
                    outcome = scaler.reconcile(
                        queue,
                        reason="flyworkers_scale --watch",
                        dry_run=options["dry_run"],
                        skip_idle=True,  # no API call when nothing is queued or in motion
                    )
                except Exception as exc:  # keep watching: the next pass may succeed
                    self.stderr.write(f"{queue}: reconcile failed: {exc}")
                    continue
                item = report(outcome, dry_run=options["dry_run"])
                if options["json"]:
                    self.stdout.write(dump(item))
                elif item["planned"] or item["errors"]:
                    self.stdout.write(render(item))
            stop.wait(max(0.0, interval - (time.monotonic() - began)))
        if not options["json"]:
            self.stdout.write("flyworkers_scale: stopped")

    def _reap(self, queues: list[str], options: dict[str, Any]) -> None:
        from django_flyworkers.reaper import reap

        try:
            result = reap(queues)
        except Exception as exc:  # keep watching
            self.stderr.write(f"reap failed: {exc}")
            return
        if any(item.changed or item.errors for item in result.queues) or result.errors:
            self.stdout.write(render_reap(result))


def report(outcome: scaler.ReconcileResult, *, dry_run: bool) -> dict[str, Any]:
    """The data of one pass, as printed (and as ``--json``)."""
    snap = outcome.snapshot
    return {
        "queue": outcome.queue,
        "queued": snap.queued,
        "due": snap.due_scheduled,
        "busy": snap.started,
        "live_workers": snap.live_workers,
        "oldest_age": round(snap.oldest_age, 1) if snap.oldest_age is not None else None,
        "machines": dict(sorted(Counter(m.state for m in outcome.machines).items())),
        "reason": outcome.plan.reason,
        "planned": outcome.plan.actions(),
        "applied": [] if dry_run else outcome.actions,
        "errors": outcome.errors,
        "dry_run": dry_run,
    }


def render(item: dict[str, Any]) -> str:
    machines = " ".join(f"{state}={n}" for state, n in item["machines"].items()) or "none"
    age = f"{item['oldest_age']:g}s" if item["oldest_age"] is not None else "-"
    lines = [
        f"{item['queue']}: queued {item['queued']}, due {item['due']}, busy {item['busy']}, "
        f"live workers {item['live_workers']}, oldest {age}; machines {machines}",
        f"  plan:    {', '.join(item['planned']) or 'nothing to do'} ({item['reason']})",
    ]
    if item["dry_run"]:
        lines.append("  applied: nothing (--dry-run)")
    else:
        lines.append(f"  applied: {', '.join(item['applied']) or 'nothing'}")
    lines += [f"  error:   {error}" for error in item["errors"]]
    return "\n".join(lines)
