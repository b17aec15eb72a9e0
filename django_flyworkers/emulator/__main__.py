"""``python -m django_flyworkers.emulator``: run the Fly Machines API emulator."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .server import check_host, serve


def _non_negative(value: str) -> float:
    seconds = float(value)
    if seconds < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return seconds


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m django_flyworkers.emulator",
        description="Local emulator of the Fly Machines API; every Machine is a local process.",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: %(default)s); a non-loopback address needs --allow-remote",
    )
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --host that is not loopback. Careful: the emulator runs any command "
        "a client with the token sends it",
    )
    parser.add_argument("--port", type=int, default=4280, help="port (default: %(default)s)")
    parser.add_argument(
        "--token",
        default=os.environ.get("FLY_API_TOKEN"),
        help="API token clients must send (default: $FLY_API_TOKEN)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path.cwd(),
        help="working directory of Machine processes (default: the current directory)",
    )
    parser.add_argument(
        "--log-dir", type=Path, help="Machine logs (default: WORKDIR/.emulator/logs)"
    )
    parser.add_argument(
        "--no-rate-limits", action="store_true", help="disable Fly's per-action rate limits"
    )
    parser.add_argument(
        "--boot-delay",
        type=_non_negative,
        default=0.0,
        help="seconds each Machine spends in 'starting' (default: %(default)s)",
    )
    parser.add_argument(
        "--preload",
        action="store_true",
        help="start `python <script>` Machines by forking an interpreter that imported "
        "Django, rq, redis and httpx once: boots cost a quarter of the CPU",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("--token is required (or set FLY_API_TOKEN)")
    try:
        check_host(args.host, args.allow_remote)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)  # one line, before anything is bound
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        serve(
            args.host,
            args.port,
            args.token,
            args.workdir,
            rate_limits=not args.no_rate_limits,
            boot_delay=args.boot_delay,
            log_dir=args.log_dir,
            allow_remote=args.allow_remote,
            preload=args.preload,
        )
    except ValueError as exc:
        parser.error(str(exc))
    except OSError as exc:
        print(f"error: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
