"""manage.py flyworkers_emulator: run the local Fly Machines API emulator.

Same as ``python -m django_flyworkers.emulator``, with the token defaulting to the one in
FLYWORKERS and Machines running in the project directory (where manage.py is), so a Machine
command ``python manage.py rqworker ...`` works as it would on Fly. The emulator needs no app
name, image or database, so the system checks that ask for them do not stop it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_flyworkers.management.commands._common import (
    port_number,
    seconds,
    verbosity_logging,
)


class Command(BaseCommand):
    help = "Run the local Fly Machines API emulator (Machines are local processes)."
    # The checks want APP_NAME and IMAGE for waking workers; the emulator uses neither.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--host",
            default="127.0.0.1",
            help="bind address (default: 127.0.0.1); a non-loopback one needs --allow-remote",
        )
        parser.add_argument(
            "--allow-remote",
            action="store_true",
            help="allow a --host that is not loopback. Careful: the emulator runs any "
            "command a client with the token sends it",
        )
        parser.add_argument("--port", type=port_number, default=4280)
        parser.add_argument("--token", help="API token to accept (default: FLYWORKERS token)")
        parser.add_argument("--workdir", help="where Machine commands run (default: cwd)")
        parser.add_argument("--log-dir", help="Machine logs (default: WORKDIR/.emulator/logs)")
        parser.add_argument("--no-rate-limits", action="store_true")
        parser.add_argument("--boot-delay", type=seconds, default=0.0)
        parser.add_argument(
            "--preload",
            action="store_true",
            help="fork `python <script>` Machines from an interpreter that imported Django, "
            "rq, redis and httpx once (faster boots)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        with verbosity_logging(options["verbosity"]):
            self._handle(options)

    def _handle(self, options: dict[str, Any]) -> None:
        from django_flyworkers import conf
        from django_flyworkers.emulator import serve
        from django_flyworkers.emulator.server import check_host

        try:
            check_host(options["host"], options["allow_remote"])
        except ValueError as exc:
            raise CommandError(f"{exc}.") from None

        # Only the token matters here: a bad value elsewhere in FLYWORKERS does not stop it.
        settings, problems = conf.validate(conf.raw_settings())
        token = options["token"] or settings.api_token
        if not token:
            bad = [problem.message for problem in problems if "'API_TOKEN'" in problem.key]
            raise CommandError(
                bad[0] if bad else "no token: pass --token or set FLYWORKERS['API_TOKEN']."
            )
        workdir = Path(options["workdir"] or Path.cwd())
        if not workdir.is_dir():
            raise CommandError(f"--workdir {workdir} is not a directory.")
        serve(
            options["host"],
            options["port"],
            str(token),
            workdir,
            rate_limits=not options["no_rate_limits"],
            boot_delay=options["boot_delay"],
            log_dir=options["log_dir"],
            announce=lambda line: self.stdout.write(line),
            preload=options["preload"],
            allow_remote=options["allow_remote"],
        )
