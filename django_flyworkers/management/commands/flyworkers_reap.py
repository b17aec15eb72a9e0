"""manage.py flyworkers_reap: sync Machines, recover jobs of dead Machines, tidy the pool.

See :mod:`django_flyworkers.reaper`. Safe to run often (every few minutes from cron, a
scheduled Machine, or next to ``flyworkers_scale --watch``): a second run right after the first
changes nothing.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_flyworkers.management.commands._common import (
    days,
    dump,
    one_line_errors,
    queues_from,
    render_reap,
    seconds,
    verbosity_logging,
)
from django_flyworkers.reaper import reap


class Command(BaseCommand):
    help = "Sync worker Machines with the API, recover jobs of dead Machines, prune history."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("queues", nargs="*", metavar="QUEUE", help="default: every queue")
        parser.add_argument("--dry-run", action="store_true", help="report only, change nothing")
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        parser.add_argument(
            "--stuck-after",
            metavar="SECONDS",
            type=seconds,
            help="stop Machines started this long without a live worker (default: "
            "FLYWORKERS['STUCK_AFTER'])",
        )
        parser.add_argument(
            "--prune-after",
            metavar="DAYS",
            type=days,
            help="delete finished history older than this (default: "
            "FLYWORKERS['PRUNE_AFTER_DAYS'])",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        with verbosity_logging(options["verbosity"]):
            self._handle(options)

    def _handle(self, options: dict[str, Any]) -> None:
        queues = queues_from(options["queues"])
        with one_line_errors():
            report = reap(
                queues,
                dry_run=options["dry_run"],
                stuck_after=options["stuck_after"],
                prune_after_days=options["prune_after"],
            )
        if options["json"]:
            self.stdout.write(dump(asdict(report)))
        else:
            self.stdout.write(render_reap(report))
        if report.errors or any(item.errors for item in report.queues):
            raise CommandError("some Machines API calls failed; see the errors above.")
