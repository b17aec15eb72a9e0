"""manage.py flyworkers_reap: sync Machines, recover jobs of dead Machines, tidy the pool.

See :mod:`django_flyworkers.reaper`. Safe to run often (every few minutes from cron, a
scheduled Machine, or next to ``flyworkers_scale --watch``): a second run right after the first
changes nothing.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_flyworkers.management.commands._common import dump, number, queues_from
from django_flyworkers.reaper import ReapReport, reap


class Command(BaseCommand):
    help = "Sync worker Machines with the API, recover jobs of dead Machines, prune history."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("queues", nargs="*", metavar="QUEUE", help="default: every queue")
        parser.add_argument("--dry-run", action="store_true", help="report only, change nothing")
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        parser.add_argument(
            "--stuck-after",
            metavar="SECONDS",
            help="stop Machines started this long without a live worker (default: "
            "FLYWORKERS['STUCK_AFTER'])",
        )
        parser.add_argument(
            "--prune-after",
            metavar="DAYS",
            help="delete finished history older than this (default: "
            "FLYWORKERS['PRUNE_AFTER_DAYS'])",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        queues = queues_from(options["queues"])
        stuck_after = number(options["stuck_after"], "--stuck-after")
        prune_after = number(options["prune_after"], "--prune-after")
        report = reap(
            queues,
            dry_run=options["dry_run"],
            stuck_after=stuck_after,
            prune_after_days=prune_after,
        )
        if options["json"]:
            self.stdout.write(dump(asdict(report)))
        else:
            self.stdout.write(render(report))
        if report.errors or any(item.errors for item in report.queues):
            raise CommandError("some Machines API calls failed; see the errors above.")


def render(report: ReapReport) -> str:
    would = "would " if report.dry_run else ""
    lines = [f"error: {error}" for error in report.errors]
    for item in report.queues:
        lines.append(f"{item.queue}:")
        lines += [f"  synced    {change}" for change in item.synced]
        for recovery in item.recovered:
            outcome = "recover" if report.dry_run else recovery.outcome
            lines.append(f"  {would}{outcome} job {recovery.job_id}: {recovery.reason}")
        lines += [f"  {would}stop      {machine_id} (stuck)" for machine_id in item.stopped]
        lines += [f"  {would}destroy   {machine_id}" for machine_id in item.destroyed]
        lines += [f"  woke      {action}" for action in item.woke]
        lines += [f"  error     {error}" for error in item.errors]
        if not (item.changed or item.errors):
            lines.append("  nothing to do")
    lines.append(
        f"pruned: {would}delete {report.pruned_jobs} job rows and "
        f"{report.pruned_events} scale events"
    )
    return "\n".join(lines)
