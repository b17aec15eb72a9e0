"""The ``FLYWORKERS`` setting, parsed into typed, immutable objects.

Read it with :func:`get_settings`; the result is cached and dropped whenever Django's
``setting_changed`` fires for ``FLYWORKERS`` (``override_settings`` in tests). Validation that
can be reported nicely lives in :mod:`django_flyworkers.checks`; this module raises
``ImproperlyConfigured`` only for values it cannot turn into the types below.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from types import MappingProxyType
from typing import Any, Literal

from django.core.exceptions import ImproperlyConfigured

WakeMode = Literal["thread", "sync", "off"]
WAKE_MODES: tuple[str, ...] = ("thread", "sync", "off")

DEFAULT_API_URL = "https://api.machines.dev"
"""Public Machines API. Inside Fly's private network ``http://_api.internal:4280`` also works."""

API_URL_ENV = "FLYWORKERS_API_URL"

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
        "CMD": None,
        "ENV": {},
    }
)
"""Every per-queue profile key and its default."""

GUEST_KEYS = frozenset(
    {"cpu_kind", "cpus", "memory_mb", "gpus", "gpu_kind", "kernel_args", "max_memory_mb"}
)

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
class QueueProfile:
    """How Machines for one RQ queue are sized, bounded and started."""

    name: str
    max_machines: int = 1
    min_machines: int = 0
    jobs_per_machine: int = 10
    guest: Mapping[str, Any] = field(default_factory=lambda: dict(PROFILE_DEFAULTS["GUEST"]))
    region: str | None = None
    idle_timeout: int = 0
    cmd: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    def worker_command(self) -> list[str]:
        """The command a worker Machine of this queue runs."""
        if self.cmd:
            return list(self.cmd)
        mode = ["--max-idle-time", str(self.idle_timeout)] if self.idle_timeout > 0 else ["--burst"]
        return [
            "python",
            "manage.py",
            "rqworker",
            self.name,
            *mode,
            "--worker-class",
            "django_flyworkers.worker.FlyWorker",
            "--with-scheduler",
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

    def profile(self, queue: str) -> QueueProfile | None:
        """The profile of ``queue``, or None when flyworkers does not manage that queue."""
        return self.queues.get(queue)


def raw_settings() -> dict[str, Any]:
    """The ``FLYWORKERS`` dict as written in settings (empty when absent)."""
    from django.conf import settings

    value = getattr(settings, "FLYWORKERS", None) or {}
    if not isinstance(value, Mapping):
        raise ImproperlyConfigured("FLYWORKERS must be a dict.")
    return dict(value)


def _from_env(raw: Mapping[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value in (None, ""):
        value = os.environ.get(ENV_DEFAULTS[key]) or None
    return None if value is None else str(value)


def _as_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ImproperlyConfigured(f"{where} must be an integer, got {value!r}.")
    try:
        return int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{where} must be an integer, got {value!r}.") from None


def parse_profile(name: str, raw: Mapping[str, Any] | None) -> QueueProfile:
    """Turn one ``QUEUES`` entry into a :class:`QueueProfile` (unknown keys are ignored here)."""
    merged = {**PROFILE_DEFAULTS, **(raw or {})}
    where = f"FLYWORKERS['QUEUES'][{name!r}]"
    guest = {**PROFILE_DEFAULTS["GUEST"], **(merged["GUEST"] or {})}
    cmd = merged["CMD"]
    if isinstance(cmd, str):
        cmd = cmd.split()
    return QueueProfile(
        name=name,
        max_machines=_as_int(merged["MAX_MACHINES"], f"{where}['MAX_MACHINES']"),
        min_machines=_as_int(merged["MIN_MACHINES"], f"{where}['MIN_MACHINES']"),
        jobs_per_machine=max(
            1, _as_int(merged["JOBS_PER_MACHINE"], f"{where}['JOBS_PER_MACHINE']")
        ),
        guest=MappingProxyType(guest),
        region=merged["REGION"] or None,
        idle_timeout=_as_int(merged["IDLE_TIMEOUT"], f"{where}['IDLE_TIMEOUT']"),
        cmd=tuple(str(part) for part in cmd) if cmd else None,
        env=MappingProxyType({str(k): str(v) for k, v in (merged["ENV"] or {}).items()}),
    )


def parse(raw: Mapping[str, Any]) -> FlySettings:
    """Parse a raw ``FLYWORKERS`` dict, filling defaults from the environment."""
    merged = {**TOP_LEVEL_DEFAULTS, **raw}
    wake_mode = merged["WAKE_MODE"]
    if wake_mode not in WAKE_MODES:
        raise ImproperlyConfigured(
            f"FLYWORKERS['WAKE_MODE'] must be one of {', '.join(WAKE_MODES)}; got {wake_mode!r}."
        )
    token = _from_env(raw, "API_TOKEN")
    queues = merged["QUEUES"] or {}
    if not isinstance(queues, Mapping):
        raise ImproperlyConfigured("FLYWORKERS['QUEUES'] must be a dict of queue name -> profile.")
    return FlySettings(
        api_url=(_from_env(raw, "API_URL") or DEFAULT_API_URL).rstrip("/"),
        api_token=Token(token) if token else None,
        app_name=_from_env(raw, "APP_NAME"),
        image=_from_env(raw, "IMAGE"),
        region=_from_env(raw, "REGION"),
        wake_mode=wake_mode,
        global_max_machines=_as_int(merged["GLOBAL_MAX_MACHINES"], "GLOBAL_MAX_MACHINES"),
        http_timeout=float(merged["HTTP_TIMEOUT"]),
        api_retry_seconds=float(merged["API_RETRY_SECONDS"]),
        boot_timeout=float(merged["BOOT_TIMEOUT"]),
        stop_timeout=_as_int(merged["STOP_TIMEOUT"], "STOP_TIMEOUT"),
        worker_ttl=_as_int(merged["WORKER_TTL"], "WORKER_TTL"),
        stuck_after=_as_int(merged["STUCK_AFTER"], "STUCK_AFTER"),
        prune_after_days=_as_int(merged["PRUNE_AFTER_DAYS"], "PRUNE_AFTER_DAYS"),
        queues=MappingProxyType(
            {name: parse_profile(name, profile) for name, profile in queues.items()}
        ),
    )


@cache
def get_settings() -> FlySettings:
    """The current settings, parsed once and cached until ``FLYWORKERS`` changes."""
    return parse(raw_settings())


def reset(**kwargs: Any) -> None:
    """``setting_changed`` receiver: forget the cached settings."""
    if kwargs.get("setting") in (None, "FLYWORKERS", "RQ_QUEUES"):
        get_settings.cache_clear()
