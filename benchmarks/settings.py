"""Settings for the benchmarks: the test project's, with the database taken from the environment.

``FLYWORKERS_BENCH_DATABASE_URL`` (``postgres://user:password@host:port/name``) selects
PostgreSQL; without it the test project's SQLite file (WAL mode) is used. Worker processes the
benchmarks start inherit the variable, so they write to the same database.
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

FLYWORKERS = {**FLYWORKERS, "WAKE_MODE": os.environ.get("FLYWORKERS_BENCH_WAKE_MODE", "off")}
LOGGING = {"version": 1, "disable_existing_loggers": False}
