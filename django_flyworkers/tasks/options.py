"""The backend's ``OPTIONS`` and the ids of its system checks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

E_OPTIONS = "flyworkers.E040"
"""System check id: the backend's ``OPTIONS`` are not valid."""
E_QUEUE = "flyworkers.E041"
"""System check id: a queue in the backend's ``QUEUES`` is not in ``RQ_QUEUES``."""


@dataclass(frozen=True)
class Options:
    """The backend's ``OPTIONS``, validated."""

    enqueue_on_commit: bool = True
    result_ttl: int | None = None
    timeout: int | None = None
    retry: int = 0


OPTION_DEFAULTS: Mapping[str, Any] = {
    "ENQUEUE_ON_COMMIT": True,
    "RESULT_TTL": None,
    "TIMEOUT": None,
    "RETRY": 0,
}
"""Every ``OPTIONS`` key and its default (``None``: the queue's django-rq default)."""


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_options(raw: Any) -> tuple[Options, list[str]]:
    """``OPTIONS`` -> (the options, problems). Bad values fall back to their defaults."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        return Options(), [f"OPTIONS must be a dict, got {type(raw).__name__}"]
    problems = [
        f"unknown OPTIONS key {key!r} (known: {', '.join(OPTION_DEFAULTS)})"
        for key in raw
        if key not in OPTION_DEFAULTS
    ]
    values = {**OPTION_DEFAULTS, **{k: v for k, v in raw.items() if k in OPTION_DEFAULTS}}
    rules = {
        "ENQUEUE_ON_COMMIT": (lambda v: isinstance(v, bool), "True or False"),
        "RESULT_TTL": (
            lambda v: v is None or (_whole(v) and v >= -1),
            "None, -1 (keep forever) or a number of seconds >= 0",
        ),
        "TIMEOUT": (lambda v: v is None or (_whole(v) and v > 0), "None or seconds > 0"),
        "RETRY": (lambda v: _whole(v) and v >= 0, "a whole number >= 0"),
    }
    for key, (ok, expected) in rules.items():
        if not ok(values[key]):
            problems.append(f"OPTIONS[{key!r}] must be {expected}, got {values[key]!r}")
            values[key] = OPTION_DEFAULTS[key]
    options = Options(
        enqueue_on_commit=values["ENQUEUE_ON_COMMIT"],
        result_ttl=values["RESULT_TTL"],
        timeout=values["TIMEOUT"],
        retry=values["RETRY"],
    )
    return options, problems
