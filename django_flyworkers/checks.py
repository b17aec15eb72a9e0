"""System checks for the ``FLYWORKERS`` setting. Ids are stable; the README lists them.

=================  =====================================================================
flyworkers.E001    FLYWORKERS is not a dict, or a value has the wrong type
flyworkers.E002    API token missing while WAKE_MODE is not "off"
flyworkers.E003    APP_NAME missing while WAKE_MODE is not "off"
flyworkers.E004    IMAGE missing while WAKE_MODE is not "off"
flyworkers.E005    a FLYWORKERS queue is missing from RQ_QUEUES
flyworkers.E006    django_rq is not in INSTALLED_APPS
flyworkers.E007    RQ['QUEUE_CLASS'] is not django_flyworkers.FlyQueue (or a subclass)
flyworkers.E008    MAX_MACHINES < 1 or MIN_MACHINES > MAX_MACHINES (or < 0)
flyworkers.E009    unknown FLYWORKERS key or unknown profile key
flyworkers.E010    unknown GUEST key
flyworkers.E011    WAKE_MODE is not one of "thread", "sync", "off"
flyworkers.W001    plain-http API URL to a non-local host with DEBUG=False
flyworkers.W002    an RQ queue is not managed by flyworkers (its jobs start no Machine)
=================  =====================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from django_flyworkers import conf

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "_api.internal"})


def register() -> None:
    """Register the checks (called from ``AppConfig.ready``)."""
    checks.register(check_settings, "flyworkers")


def _error(msg: str, id: str, hint: str | None = None) -> checks.CheckMessage:
    return checks.Error(msg, hint=hint, id=f"flyworkers.{id}")


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Validate FLYWORKERS, RQ_QUEUES and RQ against each other."""
    try:
        raw = conf.raw_settings()
    except ImproperlyConfigured as exc:
        return [_error(str(exc), "E001")]
    messages: list[checks.CheckMessage] = []
    messages += _unknown_keys(raw)
    if raw.get("WAKE_MODE", "thread") not in conf.WAKE_MODES:
        messages.append(
            _error(
                f"FLYWORKERS['WAKE_MODE'] is {raw.get('WAKE_MODE')!r}.",
                "E011",
                hint='Use "thread" (default), "sync" or "off".',
            )
        )
        return messages
    try:
        parsed = conf.parse(raw)
    except ImproperlyConfigured as exc:
        return [*messages, _error(str(exc), "E001")]
    messages += _required(parsed)
    messages += _queues(raw, parsed)
    messages += _rq_wiring()
    messages += _api_url(parsed)
    return messages


def _unknown_keys(raw: Mapping[str, Any]) -> list[checks.CheckMessage]:
    messages = []
    for key in sorted(set(raw) - set(conf.TOP_LEVEL_DEFAULTS)):
        messages.append(
            _error(
                f"Unknown FLYWORKERS key {key!r}.",
                "E009",
                hint=f"Known keys: {', '.join(conf.TOP_LEVEL_DEFAULTS)}.",
            )
        )
    queues = raw.get("QUEUES") or {}
    if not isinstance(queues, Mapping):
        return [*messages, _error("FLYWORKERS['QUEUES'] must be a dict.", "E001")]
    for name, profile in queues.items():
        if profile is None:
            continue
        if not isinstance(profile, Mapping):
            messages.append(_error(f"FLYWORKERS['QUEUES'][{name!r}] must be a dict.", "E001"))
            continue
        for key in sorted(set(profile) - set(conf.PROFILE_DEFAULTS)):
            messages.append(
                _error(
                    f"Unknown key {key!r} in FLYWORKERS['QUEUES'][{name!r}].",
                    "E009",
                    hint=f"Known keys: {', '.join(conf.PROFILE_DEFAULTS)}.",
                )
            )
        guest = profile.get("GUEST") or {}
        for key in sorted(set(guest) - conf.GUEST_KEYS):
            messages.append(
                _error(
                    f"Unknown GUEST key {key!r} in FLYWORKERS['QUEUES'][{name!r}].",
                    "E010",
                    hint=f"Fly guest keys: {', '.join(sorted(conf.GUEST_KEYS))}.",
                )
            )
    return messages


def _required(parsed: conf.FlySettings) -> list[checks.CheckMessage]:
    if parsed.wake_mode == "off":
        return []
    missing = [
        ("E002", "API token", parsed.api_token, "API_TOKEN", "FLY_API_TOKEN"),
        ("E003", "app name", parsed.app_name, "APP_NAME", "FLY_APP_NAME"),
        ("E004", "worker image", parsed.image, "IMAGE", "FLY_IMAGE_REF"),
    ]
    return [
        _error(
            f"FLYWORKERS has no {what} while WAKE_MODE is {parsed.wake_mode!r}.",
            id,
            hint=f"Set FLYWORKERS['{key}'] or the {env} environment variable, "
            'or set WAKE_MODE to "off".',
        )
        for id, what, value, key, env in missing
        if not value
    ]


def _queues(raw: Mapping[str, Any], parsed: conf.FlySettings) -> list[checks.CheckMessage]:
    rq_queues = getattr(settings, "RQ_QUEUES", None) or {}
    messages = []
    for name, profile in parsed.queues.items():
        where = f"FLYWORKERS['QUEUES'][{name!r}]"
        if name not in rq_queues:
            messages.append(
                _error(
                    f"{where} names a queue that is not in RQ_QUEUES.",
                    "E005",
                    hint=f"Add {name!r} to RQ_QUEUES or remove it from FLYWORKERS['QUEUES'].",
                )
            )
        if profile.max_machines < 1:
            messages.append(_error(f"{where}['MAX_MACHINES'] must be at least 1.", "E008"))
        if profile.min_machines < 0 or profile.min_machines > profile.max_machines:
            messages.append(
                _error(
                    f"{where}['MIN_MACHINES'] must be between 0 and MAX_MACHINES "
                    f"({profile.max_machines}); got {profile.min_machines}.",
                    "E008",
                )
            )
    for name in rq_queues:
        if name not in parsed.queues:
            messages.append(
                checks.Warning(
                    f"RQ queue {name!r} is not in FLYWORKERS['QUEUES']: enqueueing there starts "
                    "no Machine.",
                    hint="Add it to FLYWORKERS['QUEUES'] (an empty dict takes the defaults) "
                    "or run a worker for it yourself.",
                    id="flyworkers.W002",
                )
            )
    return messages


def _rq_wiring() -> list[checks.CheckMessage]:
    from django.apps import apps

    from django_flyworkers.queue import FlyQueue

    messages = []
    if not apps.is_installed("django_rq"):
        messages.append(
            _error(
                "django_rq is not in INSTALLED_APPS.",
                "E006",
                hint='Add "django_rq" to INSTALLED_APPS before "django_flyworkers".',
            )
        )
    path = (getattr(settings, "RQ", None) or {}).get("QUEUE_CLASS")
    queue_class: Any = None
    if isinstance(path, str):
        try:
            queue_class = import_string(path)
        except ImportError:
            queue_class = None
    elif isinstance(path, type):
        queue_class = path
    if not (isinstance(queue_class, type) and issubclass(queue_class, FlyQueue)):
        messages.append(
            _error(
                f"RQ['QUEUE_CLASS'] is {path!r}, not django_flyworkers.FlyQueue.",
                "E007",
                hint='Set RQ = {"QUEUE_CLASS": "django_flyworkers.FlyQueue"}: django-rq\'s '
                "admin and workers ignore per-queue QUEUE_CLASS, so it must be global.",
            )
        )
    return messages


def _api_url(parsed: conf.FlySettings) -> list[checks.CheckMessage]:
    url = urlparse(parsed.api_url)
    if url.scheme == "http" and url.hostname not in LOCAL_HOSTS and not settings.DEBUG:
        return [
            checks.Warning(
                f"FLYWORKERS['API_URL'] is plain http ({parsed.api_url}) with DEBUG=False: the "
                "API token would cross the network unencrypted.",
                hint="Use https://api.machines.dev, or http://_api.internal:4280 on Fly's "
                "private network.",
                id="flyworkers.W001",
            )
        ]
    return []
