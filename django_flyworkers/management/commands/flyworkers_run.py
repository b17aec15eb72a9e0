"""manage.py flyworkers_run JOB_ID: claim one queued job and run it, then exit.

What a dedicated Machine runs (``MODE: "dedicated"``); see
:mod:`django_flyworkers.dedicated_worker`. It also works by hand, for any queued job: the job
is taken off its queue atomically and runs through rq as on any worker.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_flyworkers.dedicated_worker import run_job
from django_flyworkers.exceptions import UnknownQueue
from django_flyworkers.management.commands._common import one_line_errors, verbosity_logging
from django_flyworkers.scaling.dedicated import JOB_ENV

LEVELS = {0: "WARNING", 1: "INFO"}


class Command(BaseCommand):
    help = "Claim one queued job by its id, run it on this Machine, and exit."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("job_id", metavar="JOB_ID", help="the id of a queued rq job")
        parser.add_argument(
            "--queue",
            metavar="QUEUE",
            help="the job's queue (default: found from the job itself)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        with verbosity_logging(options["verbosity"]), one_line_errors():
            try:
                outcome = run_job(
                    options["job_id"],
                    options["queue"],
                    logging_level=LEVELS.get(options["verbosity"], "DEBUG"),
                )
            except (LookupError, UnknownQueue) as exc:
                raise CommandError(str(exc)) from None
        if not outcome.ran:
            raise CommandError(
                f"job {outcome.job_id} of queue {outcome.queue!r} is {outcome.status}, not "
                "queued: it ran or another worker has it, so nothing was run."
            )
        self.stdout.write(f"job {outcome.job_id} of queue {outcome.queue!r}: {outcome.status}")
        if os.environ.get(JOB_ENV) == outcome.job_id:
            exit_now()


def exit_now() -> None:
    """End the Machine's process now that its place is handed over.

    The next Machine is already booting. Python's teardown of a Django process takes a few
    hundred milliseconds more after the ``atexit`` handlers (longer on a busy host), during
    which this Machine would still run: run the handlers, flush, and skip the rest.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(0)
