"""Parsing what clients send: Machine configs, Go durations, signals, commands, memory.

Pure functions; each bad value raises a 400 `ApiError` naming the field.
"""

from __future__ import annotations

import json
import re
import signal
from typing import Any

from .errors import JSON, bad_request

DEFAULT_MEMORY_MB = 256
SUSPEND_MAX_MEMORY_MB = 2048
"""Fly suspends Machines of at most 2 GB (docs: reference/suspend-resume, "Requirements")."""

RESTART_POLICIES = {
    "": "on-failure",
    "on-failure": "on-failure",
    "on-fail": "on-failure",
    "no": "no",
    "always": "always",
}

_DURATION_PART = re.compile(r"(\d*\.?\d+)(ns|us|µs|ms|s|m|h)")
_DURATION = re.compile(r"(?:\d*\.?\d+(?:ns|us|µs|ms|s|m|h))+")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object, what: str) -> float | None:
    """Seconds from a Go duration ("10s", "1m30s"), a numeric string (seconds) or a number.

    Numbers follow fly-go (nanoseconds), except that values below 1e6 are taken as seconds:
    nobody means a sub-millisecond timeout, and `"timeout": 10` then does what it says.
    None, "", 0 and "0s" return None, meaning "use the default" (fly-go sends "0s" when unset).
    """
    if value is None or value == "":
        return None
    seconds: float
    if isinstance(value, bool):
        raise bad_request(f'invalid {what} {value!r}: use a duration such as "10s"')
    if isinstance(value, int | float):
        seconds = value / 1e9 if value >= 1_000_000 else float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            if not _DURATION.fullmatch(text):
                raise bad_request(
                    f'invalid {what} "{value}": use a Go duration such as "10s" or "1m30s"'
                ) from None
            seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(text))
    else:
        raise bad_request(f'invalid {what} {value!r}: use a duration such as "10s"')
    if seconds < 0:
        raise bad_request(f"invalid {what} {value!r}: must not be negative")
    return seconds or None


def parse_signal(value: object) -> int | None:
    """A signal number from a name ("SIGTERM", "term") or a number (fly-go's Kill sends 9)."""
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value)
    elif isinstance(value, str):
        name = value.strip().upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        try:
            return int(signal.Signals[name])
        except KeyError:
            raise bad_request(
                f'invalid signal "{value}": use a name such as "SIGTERM" or a number'
            ) from None
    else:
        raise bad_request(f'invalid signal {value!r}: use a name such as "SIGTERM" or a number')
    try:
        return int(signal.Signals(number))
    except ValueError:
        raise bad_request(f"invalid signal {value!r}: unknown signal number") from None


def _str_list(value: object, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad_request(f'{where} must be a list of strings, e.g. ["python", "-m", "app"]')
    return list(value)


def _command_of(spec: JSON, where: str) -> list[str]:
    exec_ = _str_list(spec.get("exec"), f"{where}.exec")
    if exec_:
        return exec_
    return _str_list(spec.get("entrypoint"), f"{where}.entrypoint") + _str_list(
        spec.get("cmd"), f"{where}.cmd"
    )


def resolve_command(config: JSON) -> list[str]:
    """The argv a Machine runs: init.exec, else init.entrypoint + init.cmd, else processes[0]."""
    init = config.get("init") or {}
    if not isinstance(init, dict):
        raise bad_request("config.init must be an object")
    argv = _command_of(init, "config.init")
    processes = config.get("processes") or []
    if not argv and isinstance(processes, list) and processes and isinstance(processes[0], dict):
        argv = _command_of(processes[0], "config.processes[0]")
    if not argv:
        raise bad_request(
            "config has no command to run: the emulator cannot read the image's ENTRYPOINT/CMD, "
            "so set config.init.exec, config.init.cmd or config.processes[0].cmd "
            '(for example ["python", "-m", "myapp.worker"])'
        )
    return argv


def memory_mb(config: JSON) -> int:
    """``guest.memory_mb``, else what the ``size`` preset gives, else Fly's 256 MB."""
    guest = config.get("guest") or {}
    if isinstance(guest, dict) and isinstance(guest.get("memory_mb"), int):
        return int(guest["memory_mb"])
    size = config.get("size")
    match = (
        re.fullmatch(r"(shared-cpu|performance)-(\d+)x", size) if isinstance(size, str) else None
    )
    if match:
        per_cpu = DEFAULT_MEMORY_MB if match.group(1) == "shared-cpu" else 2048
        return per_cpu * int(match.group(2))
    return DEFAULT_MEMORY_MB


def suspend_refusal(config: JSON) -> str | None:
    """Why Fly would not suspend a Machine with this config, or None if it can.

    Fly's requirements (docs: reference/suspend-resume): at most 2 GB of memory, no swap
    (``init.swap_size_mb``), no ``schedule``, no GPU. Fly's error text for these cases is not
    in any public source we found, so the wording is the emulator's, in Fly's style.
    """
    memory = memory_mb(config)
    if memory > SUSPEND_MAX_MEMORY_MB:
        return (
            f"machine cannot be suspended: its memory ({memory} MB) is over the "
            f"{SUSPEND_MAX_MEMORY_MB} MB limit for suspend"
        )
    init = config.get("init") or {}
    if isinstance(init, dict) and init.get("swap_size_mb"):
        return "machine cannot be suspended: it has swap configured (init.swap_size_mb)"
    guest = config.get("guest") or {}
    if isinstance(guest, dict) and (guest.get("gpus") or guest.get("gpu_kind")):
        return "machine cannot be suspended: machines with GPUs cannot be suspended"
    if config.get("schedule"):
        return "machine cannot be suspended: machines with a schedule cannot be suspended"
    return None


def string_map(value: object, where: str) -> dict[str, str]:
    """An object of strings (env, metadata), or a 400 naming the offending key."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"{where} must be an object of strings")
    for key, item in value.items():
        if not isinstance(item, str):
            raise bad_request(f"{where}.{key} must be a string, got {type(item).__name__}")
    return dict(value)


def stop_settings(config: JSON) -> tuple[int, float | None]:
    """(signal, timeout) from ``stop_config``: SIGINT and None (the default) when unset."""
    stop_config = config.get("stop_config") or {}
    signum = parse_signal(stop_config.get("signal")) or signal.SIGINT
    return signum, parse_duration(stop_config.get("timeout"), "stop_config.timeout")


def validate_config(config: object) -> JSON:
    """Check the parts of a config the emulator acts on; return a JSON-clean deep copy."""
    if not isinstance(config, dict):
        raise bad_request("config is required and must be an object")
    image = config.get("image")
    if not isinstance(image, str) or not image.strip():
        raise bad_request(
            "config.image is required (any image reference; the emulator runs "
            "config.init / config.processes locally)"
        )
    string_map(config.get("env"), "config.env")
    string_map(config.get("metadata"), "config.metadata")
    restart = config.get("restart") or {}
    if not isinstance(restart, dict) or restart.get("policy", "") not in RESTART_POLICIES:
        raise bad_request('config.restart.policy must be one of "no", "always", "on-failure"')
    retries = restart.get("max_retries")
    if retries is not None and (not isinstance(retries, int) or retries < 0):
        raise bad_request("config.restart.max_retries must be a non-negative integer")
    stop_config = config.get("stop_config") or {}
    if not isinstance(stop_config, dict):
        raise bad_request("config.stop_config must be an object")
    stop_settings(config)
    resolve_command(config)
    try:
        copied: JSON = json.loads(json.dumps(config))
    except (TypeError, ValueError) as exc:
        raise bad_request(f"config is not valid JSON: {exc}") from None
    return copied


def machine_env(config: JSON) -> dict[str, str]:
    """``config.env`` overlaid with ``processes[0].env``."""
    env = string_map(config.get("env"), "config.env")
    processes: Any = config.get("processes") or []
    if processes and isinstance(processes[0], dict):
        env.update(string_map(processes[0].get("env"), "config.processes[0].env"))
    return env
