"""Filters the dashboard templates use to print seconds and dollars."""

from __future__ import annotations

import math
from typing import Any

from django import template

register = template.Library()


@register.filter
def duration(seconds: Any) -> str:
    """``0.42`` -> ``0.42s``, ``75`` -> ``1m 15s``, ``7300`` -> ``2h 1m``; empty -> an en dash."""
    if seconds is None or seconds == "":
        return "\u2013"
    value = float(seconds)
    if value < 10:
        return f"{value:.2f}s"
    if value < 60:
        return f"{value:.0f}s"
    if value < 3600:
        return f"{int(value // 60)}m {int(value % 60)}s"
    if value < 86400:
        return f"{int(value // 3600)}h {int(value % 3600 // 60)}m"
    return f"{int(value // 86400)}d {int(value % 86400 // 3600)}h"


@register.filter
def usd(amount: Any) -> str:
    """Dollars with enough digits to tell small costs apart: ``$0.000123``, ``$1.24``."""
    if amount is None or amount == "":
        return "\u2013"
    value = float(amount)
    if value == 0:
        return "$0"
    if value < 0.01:  # three significant digits, however small
        digits = 2 - math.floor(math.log10(value))
        return f"${value:.{digits}f}".rstrip("0")
    if value < 10:
        return f"${value:.4f}"
    return f"${value:,.2f}"


@register.filter
def get(mapping: Any, key: Any) -> Any:
    """``mapping|get:key`` for dict lookups with a variable key."""
    try:
        return mapping.get(key)
    except AttributeError:
        return None
