"""What the flyworkers management commands share: argument types, verbosity, errors, output.

Bad input and failures outside Fly end a command with one line (a ``CommandError``), never a
traceback: argument types reject what argparse would let through (``inf``, ``1e308``, ``-1``),
and :func:`one_line_errors` turns Redis being down or a bad setting into a sentence.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import CommandError
from redis.exceptions import RedisError

from django_flyworkers.conf import MAX_DAYS, MAX_SECONDS, check_number, get_settings
from django_flyworkers.machines import MachinesAPIError

if TYPE_CHECKING:
    from django_flyworkers.reaper import ReapReport

LOGGER = "django_flyworkers"
LEVELS = {0: logging.WARNING, 1: logging.INFO}  # 2 and 3: DEBUG


def queues_from(names: Sequence[str]) -> list[str]:
    """The queues to act on: the ones named (each must be managed), else every managed queue."""
    with one_line_errors():
        managed = list(get_settings().queues)
    unknown = [name for name in names if name not in managed]
    if unknown:
        known = ", ".join(managed) or "none"
        raise CommandError(f"unknown queue {unknown[0]!r}: FLYWORKERS['QUEUES'] has {known}.")
    if not managed:
        raise CommandError("FLYWORKERS['QUEUES'] is empty: there is nothing to manage.")
    return list(dict.fromkeys(names)) or managed


def number_type(
    *, integer: bool = False, minimum: float = 0, above: bool = False, maximum: float = MAX_SECONDS
) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses a number within bounds (the settings' own rules)."""

    def parse(text: str) -> Any:
        try:
            value: float = int(text) if integer else float(text)
        except ValueError:
            kind = "a whole number" if integer else "a number"
            raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None
        try:
            return check_number(
                value, integer=integer, minimum=minimum, above=above, maximum=maximum
            )
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


positive_seconds = number_type(above=True)
"""Seconds, more than 0 and at most a year."""
seconds = number_type()
"""Seconds, 0 or more and at most a year."""
days = number_type(maximum=MAX_DAYS)
"""Days, 0 or more and at most a century."""
whole_number = number_type(integer=True)
"""A whole number, 0 or more."""
port_number = number_type(integer=True, minimum=1, maximum=65535)
"""A TCP port."""


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn failures outside the command's control into a one-line ``CommandError``."""
    try:
        yield
    except RedisError as exc:
        raise CommandError(f"cannot reach Redis: {_line(exc)}") from exc
    except ImproperlyConfigured as exc:
        raise CommandError(f"{_line(exc)} (run `manage.py check` for every problem)") from exc
    except MachinesAPIError as exc:
        raise CommandError(f"Machines API: {_line(exc)}") from exc


def _line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else f"{text[:297]}..."


@contextlib.contextmanager
def verbosity_logging(verbosity: int) -> Iterator[None]:
    """Send ``--verbosity`` to the library's logger for the command's run.

    0 shows warnings only, 1 (the default) info, 2 and 3 debug (every Machines API request).
    When nothing handles the library's records, they go to stderr meanwhile.
    """
    logger = logging.getLogger(LOGGER)
    level, handler = logger.level, None
    logger.setLevel(LEVELS.get(verbosity, logging.DEBUG))
    if not logger.hasHandlers():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    try:
        yield
    finally:
        logger.setLevel(level)
        if handler is not None:
            logger.removeHandler(handler)


def dump(data: Any) -> str:
    """``--json`` output."""
    return json.dumps(data, indent=2, sort_keys=True, default=str)


def render_reap(report: ReapReport) -> str:
    """``flyworkers_reap``'s report as text (also printed by ``flyworkers_scale --watch``)."""
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
