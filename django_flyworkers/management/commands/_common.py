"""Argument checks and output helpers shared by the flyworkers management commands."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from django.core.management.base import CommandError

from django_flyworkers.conf import get_settings


def queues_from(names: Sequence[str]) -> list[str]:
    """The queues to act on: the ones named (each must be managed), else every managed queue."""
    managed = list(get_settings().queues)
    unknown = [name for name in names if name not in managed]
    if unknown:
        known = ", ".join(managed) or "none"
        raise CommandError(f"unknown queue {unknown[0]!r}: FLYWORKERS['QUEUES'] has {known}.")
    if not managed:
        raise CommandError("FLYWORKERS['QUEUES'] is empty: there is nothing to manage.")
    return list(dict.fromkeys(names)) or managed


def number(value: str | None, option: str, *, integer: bool = False, minimum: float = 0) -> Any:
    """Parse a numeric option into int or float, or raise a one-line CommandError."""
    if value is None:
        return None
    try:
        parsed: float = int(value) if integer else float(value)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise CommandError(f"{option} must be {kind}, got {value!r}.") from None
    if parsed < minimum or parsed != parsed:  # NaN compares unequal to itself
        raise CommandError(f"{option} must be at least {minimum:g}, got {value!r}.")
    return parsed


def dump(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str)
