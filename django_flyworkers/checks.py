"""System checks for the ``FLYWORKERS`` setting. Ids are stable; the README lists them.

=================  =====================================================================
flyworkers.E001    FLYWORKERS is not a dict, or a value has the wrong type or is out of range
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
flyworkers.E012    IDLE_ACTION "suspend" with a GUEST Fly cannot suspend (memory > 2048 MB, GPUs)
flyworkers.W001    plain-http API URL to a non-local host with DEBUG=False
flyworkers.W002    an RQ queue is not managed by flyworkers (its jobs start no Machine)
=================  =====================================================================
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from django.conf import settings
from django.core import checks
from django.utils.module_loading import import_string

from django_flyworkers import conf

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "_api.internal"})


def register() -> None:
    """Register the checks (called from ``AppConfig.ready``)."""
    checks.register(check_settings, "flyworkers")


def _error(msg: str, id: str, hint: str | None = None) -> checks.CheckMessage:
    return checks.Error(msg, hint=hint, id=f"flyworkers.{id}")


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Validate FLYWORKERS, RQ_QUEUES and RQ against each other.

    Bad values and unknown keys come from :func:`conf.validate`, the one parser; this module
    only renders them, and adds what needs more than ``FLYWORKERS`` to judge.
    """
    parsed, problems = conf.validate(conf.raw_settings())
    messages = [_error(problem.message, problem.id, problem.hint) for problem in problems]
    # A value already reported as bad is not reported again as missing or unmanaged.
    reported = tuple(problem.key for problem in problems)
    messages += _required(parsed, reported)
    messages += _queues(parsed, reported)
    messages += _rq_wiring()
    messages += _api_url(parsed)
    return messages


def _reported(key: str, reported: tuple[str, ...]) -> bool:
    """Whether ``key``, or a setting that holds it, was already reported as a problem."""
    return any(key == bad or key.startswith(f"{bad}[") for bad in reported)


def _required(parsed: conf.FlySettings, reported: tuple[str, ...]) -> list[checks.CheckMessage]:
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
        if not value and not _reported(f"FLYWORKERS[{key!r}]", reported)
    ]


def _queues(parsed: conf.FlySettings, reported: tuple[str, ...]) -> list[checks.CheckMessage]:
    rq_queues = getattr(settings, "RQ_QUEUES", None) or {}
    messages = []
    for name in parsed.queues:
        where = f"FLYWORKERS['QUEUES'][{name!r}]"
        if name not in rq_queues:
            messages.append(
                _error(
                    f"{where} names a queue that is not in RQ_QUEUES.",
                    "E005",
                    hint=f"Add {name!r} to RQ_QUEUES or remove it from FLYWORKERS['QUEUES'].",
                )
            )
    for name in rq_queues:
        if name in parsed.queues or _reported(f"FLYWORKERS['QUEUES'][{name!r}]", reported):
            continue
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
