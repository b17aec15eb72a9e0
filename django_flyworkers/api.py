"""The configured Machines API client, one per process and settings."""

from __future__ import annotations

import os
import threading

from django_flyworkers.conf import FlySettings, get_settings
from django_flyworkers.exceptions import NotConfigured
from django_flyworkers.machines import MachinesClient, RetryPolicy

_lock = threading.Lock()
_cached: tuple[int, FlySettings, MachinesClient] | None = None


def get_client() -> MachinesClient:
    """A :class:`MachinesClient` for ``FLYWORKERS``.

    Reused within a process; rebuilt after a fork or a settings change.
    """
    global _cached
    settings = get_settings()
    with _lock:
        # httpx connection pools must not cross a fork (gunicorn, rq work horses).
        if _cached and _cached[0] == os.getpid() and _cached[1] is settings:
            return _cached[2]
        if not settings.api_token or not settings.app_name:
            raise NotConfigured(
                "FLYWORKERS needs API_TOKEN (or env FLY_API_TOKEN) and APP_NAME "
                "(or env FLY_APP_NAME) to call the Machines API."
            )
        client = MachinesClient(
            settings.api_url,
            str(settings.api_token),
            settings.app_name,
            timeout=settings.http_timeout,
            retry=RetryPolicy(max_elapsed=settings.api_retry_seconds),
        )
        _cached = (os.getpid(), settings, client)
        return client
