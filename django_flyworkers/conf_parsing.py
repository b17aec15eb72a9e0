"""How :func:`conf.validate` reads a raw ``FLYWORKERS`` value: every key once, each bad value
and unknown key noted as a :class:`conf.Problem` (with its check id) and replaced by its
default, so one pass finds them all."""

from __future__ import annotations

import math
import os
import re
import shlex
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, TypeVar, cast
from urllib.parse import urlparse

from django_flyworkers.conf import (
    DEFAULT_API_URL,
    ENV_DEFAULTS,
    IDLE_ACTIONS,
    MAX_DAYS,
    MODES,
    PROFILE_DEFAULTS,
    SUSPEND_MAX_MEMORY_MB,
    TOP_LEVEL_DEFAULTS,
    WAKE_MODES,
    FlySettings,
    Problem,
    QueueProfile,
    Token,
    check_number,
)
from django_flyworkers.guest import KEYS as GUEST_KEYS
from django_flyworkers.guest import Guest, validate_guest
from django_flyworkers.prices import FLY_PRICES, CpuPrices, Prices

PRICE_KEYS = frozenset({"shared", "performance", "rootfs_gb_per_second"})
CPU_PRICE_KEYS = frozenset({"cpu_per_second", "memory_gb_per_second"})

# Fly app names: lowercase letters, digits and dashes. Regions: Fly's short codes ("ord").
_APP_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")
_REGION = re.compile(r"[a-z0-9]{2,}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOKEN_SCHEMES = ("FlyV1 ", "Bearer ")
# Set by the library on every worker Machine; a profile's ENV must not fight it.
_RESERVED_ENV = frozenset({"FLYWORKERS_QUEUE"})

T = TypeVar("T")


class _Collector:
    """Reads values with a default to fall back on, and notes every problem it finds."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, key: str, message: str, id: str = "E001", hint: str | None = None) -> None:
        self.problems.append(Problem(id, key, message, hint))

    def number(self, value: Any, key: str, default: T, **bounds: Any) -> T:
        try:
            return cast(T, check_number(value, **bounds))
        except ValueError as exc:
            self.add(key, f"{key} {exc}.")
            return default

    def choice(self, value: Any, key: str, choices: tuple[str, ...], id: str = "E001") -> bool:
        if isinstance(value, str) and value in choices:
            return True
        names = ", ".join(f'"{choice}"' for choice in choices)
        self.add(key, f"{key} must be one of {names}; got {value!r}.", id)
        return False

    def string(
        self,
        value: Any,
        key: str,
        pattern: re.Pattern[str] | None = None,
        what: str = "",
        label: str | None = None,
    ) -> str | None:
        label = label or key
        if value is None:
            return None
        if not isinstance(value, str):
            self.add(key, f"{label} must be a string, got {type(value).__name__} {value!r}.")
        elif not value.strip() or any(ch.isspace() for ch in value):
            self.add(key, f"{label} must not be empty or contain whitespace, got {value!r}.")
        elif pattern is not None and not pattern.fullmatch(value):
            self.add(key, f"{label} must be {what}, got {value!r}.")
        else:
            return value
        return None

    def mapping(self, value: Any, key: str, what: str) -> Mapping[Any, Any] | None:
        if value is None:
            return {}
        if isinstance(value, Mapping):
            return value
        self.add(key, f"{key} must be a dict of {what}, got {type(value).__name__} {value!r}.")
        return None

    def unknown(self, raw: Mapping[Any, Any], known: Any, key: str, id: str = "E009") -> None:
        for name in sorted((k for k in raw if k not in known), key=repr):
            self.add(
                f"{key}[{name!r}]",
                f"Unknown key {name!r} in {key}.",
                id,
                hint=f"Known keys: {', '.join(known)}.",
            )


def _from_env(raw: Mapping[str, Any], name: str) -> tuple[Any, str, str]:
    """The value of ``name`` (the environment's when unset), its key, and how to call it in a
    message (which says when the value came from the environment)."""
    value = raw.get(name)
    key = label = f"FLYWORKERS[{name!r}]"
    if value is None or value == "":
        variable = ENV_DEFAULTS[name]
        value = os.environ.get(variable) or None
        label = f"{key} (from env {variable})"
    return value, key, label


def _api_url(c: _Collector, raw: Mapping[str, Any]) -> str:
    value, key, label = _from_env(raw, "API_URL")
    if value is None:
        return DEFAULT_API_URL
    url = urlparse(value) if isinstance(value, str) else None
    if url is None or url.scheme not in ("http", "https") or not url.hostname:
        c.add(
            key,
            f"{label} must be an http(s) URL such as {DEFAULT_API_URL!r}, got {value!r}.",
            hint="The emulator is http://127.0.0.1:4280; inside Fly, http://_api.internal:4280.",
        )
        return DEFAULT_API_URL
    return value.rstrip("/")


def _api_token(c: _Collector, raw: Mapping[str, Any]) -> Token | None:
    value, key, label = _from_env(raw, "API_TOKEN")
    if value is None:
        return None
    # Never echo the value: it is a secret, even when it is malformed.
    if not isinstance(value, str):
        c.add(key, f"{label} must be a string, got a value of type {type(value).__name__}.")
        return None
    bare = value
    for scheme in _TOKEN_SCHEMES:
        if bare.startswith(scheme):
            bare = bare[len(scheme) :]
            break
    if not bare or any(ch.isspace() for ch in bare):
        c.add(
            key,
            f"{label} contains whitespace or a newline (or is only a scheme).",
            hint='Paste the token exactly as `fly tokens create deploy` prints it ("FlyV1 '
            'fm2_..."), without a trailing newline.',
        )
        return None
    return Token(value)


def _cmd(c: _Collector, value: Any, key: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            parts = shlex.split(value)
        except ValueError as exc:
            c.add(key, f"{key} cannot be split like a shell command line ({exc}): {value!r}.")
            return None
    elif isinstance(value, list | tuple):
        parts = list(value)
    else:
        c.add(key, f"{key} must be a list of strings or a string, got {value!r}.")
        return None
    if not parts or not all(isinstance(part, str) and part for part in parts):
        c.add(key, f"{key} must be a non-empty list of non-empty strings, got {value!r}.")
        return None
    return tuple(parts)


def _env(c: _Collector, value: Any, key: str) -> Mapping[str, str]:
    env = c.mapping(value, key, "variable name -> string")
    good: dict[str, str] = {}
    for name, text in (env or {}).items():
        where = f"{key}[{name!r}]"
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            c.add(where, f"{where}: {name!r} is not an environment variable name.")
        elif name in _RESERVED_ENV:
            c.add(where, f"{where}: {name} is set by django-flyworkers itself.")
        elif not isinstance(text, str):
            c.add(where, f"{where} must be a string, got {type(text).__name__} {text!r}.")
        else:
            good[name] = text
    return MappingProxyType(good)


def _guest(c: _Collector, value: Any, key: str) -> Guest:
    guest = c.mapping(value, key, "Fly guest keys")
    if guest is None:
        return Guest()
    unknown = [name for name in guest if name not in GUEST_KEYS]
    for name in sorted(unknown, key=repr):
        c.add(
            f"{key}[{name!r}]",
            f"Unknown GUEST key {name!r} in {key}.",
            "E010",
            hint=f"Fly guest keys: {', '.join(sorted(GUEST_KEYS))}.",
        )
    try:
        return validate_guest({k: v for k, v in guest.items() if k not in unknown})
    except ValueError as exc:
        c.add(key, f"{key}: {exc}", hint="Fly's guest rules: see django_flyworkers.guest.")
        return Guest()


def _profile(c: _Collector, name: Any, raw: Any) -> QueueProfile | None:
    where = f"FLYWORKERS['QUEUES'][{name!r}]"
    if not isinstance(name, str) or not name:
        c.add(where, f"{where}: a queue name must be a non-empty string.")
        return None
    profile = c.mapping(raw, where, "profile keys")
    if profile is None:
        return None
    c.unknown(profile, PROFILE_DEFAULTS, where)
    merged = {**PROFILE_DEFAULTS, **profile}

    def key(name: str) -> str:
        return f"{where}[{name!r}]"

    # Type errors are E001; out-of-range machine counts have their own id, E008.
    counts = {"integer": True, "minimum": -math.inf}
    max_machines = c.number(merged["MAX_MACHINES"], key("MAX_MACHINES"), 1, **counts)
    if max_machines < 1:
        c.add(
            key("MAX_MACHINES"),
            f"{key('MAX_MACHINES')} must be at least 1, got {max_machines}.",
            "E008",
        )
        max_machines = 1
    min_machines = c.number(merged["MIN_MACHINES"], key("MIN_MACHINES"), 0, **counts)
    if not 0 <= min_machines <= max_machines:
        c.add(
            key("MIN_MACHINES"),
            f"{key('MIN_MACHINES')} must be between 0 and MAX_MACHINES ({max_machines}); "
            f"got {min_machines}.",
            "E008",
        )
        min_machines = 0
    idle_action = merged["IDLE_ACTION"]
    if not c.choice(idle_action, key("IDLE_ACTION"), IDLE_ACTIONS):
        idle_action = "stop"
    mode = merged["MODE"]
    if not c.choice(mode, key("MODE"), MODES):
        mode = "pool"
    guest = _guest(c, merged["GUEST"], key("GUEST"))
    if idle_action == "suspend":
        _suspendable(c, guest, key("GUEST"))
    return QueueProfile(
        name=name,
        max_machines=max_machines,
        min_machines=min_machines,
        jobs_per_machine=c.number(
            merged["JOBS_PER_MACHINE"], key("JOBS_PER_MACHINE"), 10, integer=True, minimum=1
        ),
        guest=guest,
        region=c.string(merged["REGION"], key("REGION"), _REGION, "a Fly region code"),
        idle_timeout=c.number(merged["IDLE_TIMEOUT"], key("IDLE_TIMEOUT"), 0, integer=True),
        idle_action=idle_action,
        mode=mode,
        cmd=_cmd(c, merged["CMD"], key("CMD")),
        env=_env(c, merged["ENV"], key("ENV")),
    )


def _suspendable(c: _Collector, guest: Guest, key: str) -> None:
    """Fly's suspend limits: memory at most 2 GB, no GPU (and no swap, which a profile cannot
    set)."""
    hint = 'Use IDLE_ACTION "stop" for this queue, or a smaller guest without GPUs.'
    if guest.memory_mb > SUSPEND_MAX_MEMORY_MB:
        c.add(
            key,
            f"{key} has memory_mb {guest.memory_mb}, but Fly suspends only Machines with at "
            f'most {SUSPEND_MAX_MEMORY_MB} MB (IDLE_ACTION is "suspend").',
            "E012",
            hint,
        )
    if guest.has_gpu:
        c.add(
            key,
            f"{key} asks for GPUs, but Fly cannot suspend a GPU Machine "
            '(IDLE_ACTION is "suspend").',
            "E012",
            hint,
        )


def _prices(c: _Collector, value: Any) -> Prices:
    key = "FLYWORKERS['PRICES']"
    raw = c.mapping(value, key, "prices (see django_flyworkers.prices)")
    if not raw:
        return FLY_PRICES
    c.unknown(raw, sorted(PRICE_KEYS), key)
    kinds: dict[str, CpuPrices] = {}
    for kind in ("shared", "performance"):
        default: CpuPrices = getattr(FLY_PRICES, kind)
        where = f"{key}[{kind!r}]"
        given = c.mapping(raw.get(kind), where, "cpu_per_second / memory_gb_per_second") or {}
        c.unknown(given, sorted(CPU_PRICE_KEYS), where)
        kinds[kind] = CpuPrices(
            **{
                name: c.number(
                    given.get(name, getattr(default, name)),
                    f"{where}[{name!r}]",
                    getattr(default, name),
                    maximum=1.0,
                )
                for name in sorted(CPU_PRICE_KEYS)
            }
        )
    rootfs = c.number(
        raw.get("rootfs_gb_per_second", FLY_PRICES.rootfs_gb_per_second),
        f"{key}['rootfs_gb_per_second']",
        FLY_PRICES.rootfs_gb_per_second,
        maximum=1.0,
    )
    return Prices(kinds["shared"], kinds["performance"], rootfs_gb_per_second=rootfs)


def read(raw: Any) -> tuple[FlySettings, list[Problem]]:
    """The settings in ``raw`` and every problem found in it (see :func:`conf.validate`)."""
    c = _Collector()
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        c.add("FLYWORKERS", f"FLYWORKERS must be a dict, got {type(raw).__name__}.")
        raw = {}
    c.unknown(raw, TOP_LEVEL_DEFAULTS, "FLYWORKERS")
    merged = {**TOP_LEVEL_DEFAULTS, **raw}

    def key(name: str) -> str:
        return f"FLYWORKERS[{name!r}]"

    def number(name: str, **bounds: Any) -> Any:
        return c.number(merged[name], key(name), TOP_LEVEL_DEFAULTS[name], **bounds)

    def from_env(name: str, pattern: re.Pattern[str] | None = None, what: str = "") -> Any:
        value, key, label = _from_env(raw, name)
        return c.string(value, key, pattern, what, label)

    api_url = _api_url(c, raw)
    api_token = _api_token(c, raw)
    app_name = from_env("APP_NAME", _APP_NAME, "a Fly app name (lowercase letters, digits, -)")
    image = from_env("IMAGE")
    region = from_env("REGION", _REGION, "a Fly region code such as 'ord'")
    wake_mode = merged["WAKE_MODE"]
    if not c.choice(wake_mode, key("WAKE_MODE"), WAKE_MODES, "E011"):
        wake_mode = "thread"
    top = {
        "global_max_machines": number("GLOBAL_MAX_MACHINES", integer=True, minimum=1),
        "http_timeout": number("HTTP_TIMEOUT", above=True),
        "api_retry_seconds": number("API_RETRY_SECONDS"),
        "boot_timeout": number("BOOT_TIMEOUT", above=True),
        "stop_timeout": number("STOP_TIMEOUT", integer=True, minimum=1),
        "worker_ttl": number("WORKER_TTL", integer=True, minimum=1),
        "stuck_after": number("STUCK_AFTER", integer=True),
        "prune_after_days": number("PRUNE_AFTER_DAYS", integer=True, maximum=MAX_DAYS),
    }
    prices = _prices(c, merged["PRICES"])
    queues = c.mapping(merged["QUEUES"], key("QUEUES"), "queue name -> profile") or {}
    profiles = {name: _profile(c, name, profile) for name, profile in queues.items()}
    settings = FlySettings(
        api_url=api_url,
        api_token=api_token,
        app_name=app_name,
        image=image,
        region=region,
        wake_mode=wake_mode,
        queues=MappingProxyType({n: p for n, p in profiles.items() if p is not None}),
        prices=prices,
        **top,
    )
    return settings, c.problems
