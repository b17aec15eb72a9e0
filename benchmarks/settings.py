"""Django settings for the benchmarks: the test project's apps, with ``FLYWORKERS`` from the env.

The benchmark process and the worker Machines it starts through the emulator read the same
environment, so both see the same configuration:

* ``FLYWORKERS_BENCH_PROFILES``: JSON, queue name -> ``FLYWORKERS`` profile dict;
* ``FLYWORKERS_BENCH_WAKE_MODE``: ``WAKE_MODE`` of the process (default ``"thread"``);
* ``FLYWORKERS_TEST_DB``, ``FLYWORKERS_TEST_REDIS_URL``, ``FLYWORKERS_API_URL``,
  ``FLY_API_TOKEN``: the throw-away SQLite file, redis-server and emulator.

Unlike ``tests/settings.py`` this module does not import ``django_flyworkers.testing`` (which
imports pytest), so a worker pays at start-up what a production worker pays.
``FLYWORKERS_BENCH_IMPORT_TESTING=1`` imports it anyway, to measure what that costs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PROFILES_ENV = "FLYWORKERS_BENCH_PROFILES"
WAKE_MODE_ENV = "FLYWORKERS_BENCH_WAKE_MODE"
IMPORT_TESTING_ENV = "FLYWORKERS_BENCH_IMPORT_TESTING"

if os.environ.get(IMPORT_TESTING_ENV) == "1":
    import django_flyworkers.testing  # noqa: F401

BASE_DIR = Path(__file__).resolve().parent
SECRET_KEY = "flyworkers-benchmarks-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
TIME_ZONE = "UTC"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_rq",
    "django_flyworkers",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "tests.urls"
STATIC_URL = "/static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("FLYWORKERS_TEST_DB", str(BASE_DIR / "bench.sqlite3")),
        "OPTIONS": {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            # WAL: worker processes write job state while the benchmark reads it.
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        },
    }
}

REDIS_URL = os.environ.get("FLYWORKERS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
_PROFILES: dict[str, Any] = json.loads(os.environ.get(PROFILES_ENV) or "{}")
# django-rq reads RQ_QUEUES once, so every queue a run will use must be in the first JSON.
RQ_QUEUES = {name: {"URL": REDIS_URL} for name in ["default", *_PROFILES]}
RQ = {"QUEUE_CLASS": "django_flyworkers.FlyQueue"}


def flyworkers_setting(profiles: Mapping[str, Any], wake_mode: str = "thread") -> dict[str, Any]:
    """The ``FLYWORKERS`` dict for these queue profiles, pointed at the benchmark's emulator."""
    return {
        "API_URL": os.environ.get("FLYWORKERS_API_URL", "http://127.0.0.1:4280"),
        "API_TOKEN": os.environ.get("FLY_API_TOKEN", "flyworkers-test-token"),
        "APP_NAME": os.environ.get("FLY_APP_NAME", "flyworkers-bench"),
        "IMAGE": os.environ.get("FLY_IMAGE_REF", "registry.fly.io/flyworkers-bench:v1"),
        "REGION": "ord",
        "WAKE_MODE": wake_mode,
        "QUEUES": {name: dict(profile) for name, profile in profiles.items()},
    }


FLYWORKERS = flyworkers_setting(_PROFILES, os.environ.get(WAKE_MODE_ENV) or "thread")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "django_flyworkers": {"handlers": ["console"], "level": "WARNING"},
        # The client's 429 retries: the benchmarks count them from the emulator's stats.
        "django_flyworkers.machines": {"level": "ERROR"},
    },
}
