"""The ``FLYWORKERS`` setting, parsed once into typed, immutable objects.

:func:`validate` is the one parser (its code is in :mod:`django_flyworkers.conf_parsing`): it
reads every value once, fills defaults (some from the environment Fly provides), and collects
a :class:`Problem` for every bad value and unknown key instead of stopping at the first. The
system checks (:mod:`django_flyworkers.checks`) render that list; :func:`get_settings` raises
the first problem as ``ImproperlyConfigured``, so nothing runs on a setting that would break
at runtime. The result is cached and dropped whenever Django's ``setting_changed`` fires for
``FLYWORKERS`` (``override_settings``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from types import MappingProxyType
from typing import Any, Literal

from django.core.exceptions import ImproperlyConfigured

from django_flyworkers.guest import KEYS as GUEST_KEYS
from django_flyworkers.guest import Guest, validate_guest
from django_flyworkers.machines import DEFAULT_BASE_URL as DEFAULT_API_URL
from django_flyworkers.prices import FLY_PRICES, Prices

__all__ = [
    "DEFAULT_API_URL",
    "GUEST_KEYS",
    "FlySettings",
    "Guest",
    "Prices",
    "Problem",
    "QueueProfile",
    "get_settings",
    "parse",
    "validate",
    "validate_guest",
]

WakeMode = Literal["thread", "sync", "off"]
WAKE_MODES: tuple[str, ...] = ("thread", "sync", "off")
IdleAction = Literal["stop", "suspend"]
IDLE_ACTIONS: tuple[str, ...] = ("stop", "suspend")
Mode = Literal["pool", "dedicated"]
MODES: tuple[str, ...] = ("pool", "dedicated")

API_URL_ENV = "FLYWORKERS_API_URL"

MAX_SECONDS = 365 * 24 * 3600
"""Longest duration a setting or command option may give in seconds (a year). Anything longer
is a mistake, and far longer values overflow datetime arithmetic."""
MAX_DAYS = 100 * 365

SUSPEND_MAX_MEMORY_MB = 2048
"""Fly suspends Machines with at most this much memory, no GPU and no swap
(https://fly.io/docs/reference/suspend-resume/)."""

TOP_LEVEL_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "API_URL": None,  # default: env FLYWORKERS_API_URL, else DEFAULT_API_URL
        "API_TOKEN": None,  # default: env FLY_API_TOKEN
        "APP_NAME": None,  # default: env FLY_APP_NAME
        "IMAGE": None,  # default: env FLY_IMAGE_REF
        "REGION": None,  # default: env FLY_REGION
        "WAKE_MODE": "thread",
        "GLOBAL_MAX_MACHINES": 20,
        "HTTP_TIMEOUT": 30.0,
        "API_RETRY_SECONDS": 30.0,
        "BOOT_TIMEOUT": 60.0,
        "STOP_TIMEOUT": 300,
        "WORKER_TTL": 90,
        "STUCK_AFTER": 600,
        "PRUNE_AFTER_DAYS": 14,
        "PRICES": None,  # default: Fly's published prices (prices.FLY_PRICES)
        "QUEUES": {},
    }
)
"""Every top-level ``FLYWORKERS`` key and its default (the README's settings reference)."""

PROFILE_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "MAX_MACHINES": 1,
        "MIN_MACHINES": 0,
        "JOBS_PER_MACHINE": 10,
        "GUEST": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 512},
        "REGION": None,
        "IDLE_TIMEOUT": 0,
        "IDLE_ACTION": "stop",
        "MODE": "pool",
        "CMD": None,
        "ENV": {},
    }
)
"""Every per-queue profile key and its default."""

ENV_DEFAULTS: Mapping[str, str] = MappingProxyType(
    {
        "API_URL": API_URL_ENV,
        "API_TOKEN": "FLY_API_TOKEN",
        "APP_NAME": "FLY_APP_NAME",
        "IMAGE": "FLY_IMAGE_REF",
        "REGION": "FLY_REGION",
    }
)


@dataclass(frozen=True)
class Problem:
    """One bad value or unknown key in ``FLYWORKERS``, as the system checks report it."""

    id: str
    """The check id without its ``flyworkers.`` prefix, e.g. ``"E001"``."""
    key: str
    """Where: ``FLYWORKERS['QUEUES']['images']['GUEST']``."""
    message: str
    """One sentence that names the key and says what is wrong (never the token)."""
    hint: str | None = None

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class QueueProfile:
    """How Machines for one RQ queue are sized, bounded and started."""

    name: str
    max_machines: int = 1
    min_machines: int = 0
    jobs_per_machine: int = 10
    guest: Guest = field(default_factory=Guest)
    region: str | None = None
    idle_timeout: int = 0
    idle_action: IdleAction = "stop"
    mode: Mode = "pool"
    cmd: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    def worker_command(self) -> list[str]:
        """The command a worker Machine of this queue runs.

        ``IDLE_ACTION = "suspend"`` swaps in a worker class that suspends its Machine where
        rq would exit after ``--burst`` or ``--max-idle-time``, and carries on when resumed.
        """
        if self.cmd:
            return list(self.cmd)
        mode = ["--max-idle-time", str(self.idle_timeout)] if self.idle_timeout > 0 else ["--burst"]
        worker_class = (
            "django_flyworkers.warm.SuspendingWorker"
            if self.idle_action == "suspend"
            else "django_flyworkers.worker.FlyWorker"
        )
        return [
            "python",
            "manage.py",
            "rqworker",
            self.name,
            *mode,
            "--worker-class",
            worker_class,
            "--with-scheduler",
            # The image was checked at deploy; a worker need not pay for the checks each boot.
            "--skip-checks",
        ]


class Token(str):
    """A string that never shows itself in a repr (keeps the API token out of tracebacks)."""

    def __repr__(self) -> str:
        return "Token('***')"


@dataclass(frozen=True)
class FlySettings:
    """The parsed ``FLYWORKERS`` setting."""

    api_url: str
    api_token: Token | None = field(repr=False)
    app_name: str | None
    image: str | None
    region: str | None
    wake_mode: WakeMode
    global_max_machines: int
    http_timeout: float
    api_retry_seconds: float
    boot_timeout: float
    stop_timeout: int
    worker_ttl: int
    stuck_after: int
    prune_after_days: int
    queues: Mapping[str, QueueProfile]
    prices: Prices = FLY_PRICES
    """USD per second of Machines and root filesystems (``PRICES`` over Fly's prices)."""

    def profile(self, queue: str) -> QueueProfile | None:
        """The profile of ``queue``, or None when flyworkers does not manage that queue."""
        return self.queues.get(queue)


# -- numbers: one rule set, shared with the commands' argument types ------------------------


def check_number(
    value: Any,
    *,
    integer: bool = False,
    minimum: float = 0,
    above: bool = False,
    maximum: float = MAX_SECONDS,
) -> Any:
    """Return ``value`` if it is a number within bounds, else raise ValueError saying why.

    ``integer`` asks for an int; ``above`` makes ``minimum`` exclusive. Booleans, strings,
    NaN and infinities are never numbers here. The message has no subject ("must be ..."), so
    callers put the setting or option name in front.
    """
    kind = "a whole number" if integer else "a number"
    valid_type = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, valid_type):
        raise ValueError(f"must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value!r}")
    if above and value <= minimum:
        raise ValueError(f"must be more than {_plain(minimum)}, got {value!r}")
    if value < minimum:
        raise ValueError(f"must be at least {_plain(minimum)}, got {value!r}")
    if value > maximum:
        raise ValueError(f"must be at most {_plain(maximum)}, got {value!r}")
    return value


def _plain(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def validate(raw: Any) -> tuple[FlySettings, list[Problem]]:
    """Parse a raw ``FLYWORKERS`` value, filling defaults from the environment.

    Returns the settings (bad values replaced by their defaults, so the checks can look
    further) and every problem found, in the order of the README's settings reference. The
    parser itself is in :mod:`django_flyworkers.conf_parsing`.
    """
    from django_flyworkers.conf_parsing import read

    return read(raw)


def parse(raw: Any) -> FlySettings:
    """Parse a raw ``FLYWORKERS`` value; raise its first problem as ``ImproperlyConfigured``."""
    settings, problems = validate(raw)
    if problems:
        raise ImproperlyConfigured(problems[0].message)
    return settings


def raw_settings() -> Any:
    """The ``FLYWORKERS`` value as written in settings (None when absent)."""
    from django.conf import settings

    return getattr(settings, "FLYWORKERS", None)


def default_worker_command(queue: str) -> list[str]:
    """The command a worker Machine of ``queue`` runs when its profile sets nothing."""
    profile = parse({"QUEUES": {queue: {}}}).profile(queue)
    assert profile is not None
    return profile.worker_command()


@cache
def get_settings() -> FlySettings:
    """The current settings, parsed once and cached until ``FLYWORKERS`` changes.

    Raises:
        ImproperlyConfigured: with the first problem ``manage.py check`` would report.
    """
    return parse(raw_settings())


def reset(**kwargs: Any) -> None:
    """``setting_changed`` receiver: forget the cached settings."""
    if kwargs.get("setting") in (None, "FLYWORKERS", "RQ_QUEUES"):
        get_settings.cache_clear()
