"""Settings for enqueue_overhead, drain and soak: the test project's, with the database from
the environment.

``FLYWORKERS_BENCH_DATABASE_URL`` (``postgres://user:password@host:port/name``) selects
PostgreSQL; without it the test project's SQLite file (WAL mode) is used. Worker processes the
benchmarks start inherit the variables, so they write to the same database.
``FLYWORKERS_BENCH_WAKE_MODE`` (default "off"), ``FLYWORKERS_BENCH_HTTP_TIMEOUT`` and
``FLYWORKERS_BENCH_API_RETRY_SECONDS`` set those ``FLYWORKERS`` keys.
"""

import os
from urllib.parse import unquote, urlsplit

from tests.settings import *  # noqa: F403
from tests.settings import FLYWORKERS

_url = os.environ.get("FLYWORKERS_BENCH_DATABASE_URL", "")
if _url:
    _parts = urlsplit(_url)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": _parts.path.lstrip("/"),
            "USER": unquote(_parts.username or ""),
            "PASSWORD": unquote(_parts.password or ""),
            "HOST": _parts.hostname or "",
            "PORT": str(_parts.port or ""),
        }
    }

FLYWORKERS = {
    **FLYWORKERS,
    "WAKE_MODE": os.environ.get("FLYWORKERS_BENCH_WAKE_MODE", "off"),
    "HTTP_TIMEOUT": float(os.environ.get("FLYWORKERS_BENCH_HTTP_TIMEOUT", "30")),
    "API_RETRY_SECONDS": float(os.environ.get("FLYWORKERS_BENCH_API_RETRY_SECONDS", "3")),
}
LOGGING = {"version": 1, "disable_existing_loggers": False}
