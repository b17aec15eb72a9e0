"""manage.py flyworkers_emulator: run the local Fly Machines API emulator.

Same as ``python -m django_flyworkers.emulator``, with the token defaulting to the one in
FLYWORKERS and Machines running in the project directory (where manage.py is), so a Machine
command ``python manage.py rqworker ...`` works as it would on Fly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_flyworkers.conf import get_settings


class Command(BaseCommand):
    help = "Run the local Fly Machines API emulator (Machines are local processes)."

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
        parser.add_argument("--port", type=int, default=4280)
        parser.add_argument("--token", help="API token to accept (default: FLYWORKERS token)")
        parser.add_argument("--workdir", help="where Machine commands run (default: cwd)")
        parser.add_argument("--log-dir", help="Machine logs (default: WORKDIR/.emulator/logs)")
        parser.add_argument("--no-rate-limits", action="store_true")
        parser.add_argument("--boot-delay", type=float, default=0.0)

    def handle(self, *args: Any, **options: Any) -> None:
        from django_flyworkers.emulator import serve
        from django_flyworkers.emulator.server import check_host

        try:
            check_host(options["host"], options["allow_remote"])
        except ValueError as exc:
            raise CommandError(f"{exc}.") from None

        token = options["token"] or get_settings().api_token
        if not token:
            raise CommandError("no token: pass --token or set FLYWORKERS['API_TOKEN'].")
        if not 0 < options["port"] < 65536:
            raise CommandError(f"--port must be between 1 and 65535, got {options['port']}.")
        if options["boot_delay"] < 0:
            raise CommandError("--boot-delay must not be negative.")
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
            allow_remote=options["allow_remote"],
        )
