"""Settings for the django-flyworkers test suite.

Worker Machines started by the emulator run ``tests/manage.py`` with these same settings, so
everything they share with the test process comes from the environment: the Redis URL (chosen
once per process tree), the database (an SQLite file, or a PostgreSQL database named once per
process tree when ``DATABASE_URL`` points at a server), the emulator URL and token.
"""

import os
import secrets
from pathlib import Path
from typing import Any

import dj_database_url

from django_flyworkers.testing import REDIS_URL_ENV, reserve_redis_url

BASE_DIR = Path(__file__).resolve().parent
SECRET_KEY = "flyworkers-tests-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
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
    "tests.testapp",
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

# Django's advice for tests: the default hasher spends about 0.5 s of CPU on every password,
# and fixtures (admin_user, the browser tests' users) make many.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

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


def _own_resources_per_xdist_worker() -> None:
    """Under pytest-xdist, give each worker its own Redis port and database.

    xdist workers inherit the controller's environment, where these choices may already sit;
    processes a worker starts (emulated Machines, ``manage.py`` commands) inherit the worker's,
    marked with its id, and so keep its choices.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and os.environ.get("FLYWORKERS_TEST_OWNER") != worker:
        for key in (REDIS_URL_ENV, "FLYWORKERS_TEST_DB", "FLYWORKERS_TEST_DB_NAME"):
            os.environ.pop(key, None)
        os.environ["FLYWORKERS_TEST_OWNER"] = worker


_own_resources_per_xdist_worker()


def _test_database() -> dict[str, Any]:
    """The database this test run and its worker processes share, from ``DATABASE_URL``.

    Without ``DATABASE_URL`` (``make test``), an SQLite file. With a PostgreSQL URL, a database
    of that server named once per process tree (``FLYWORKERS_TEST_DB_NAME``): pytest-django
    creates it, workers inherit the name and connect to it, pytest-django drops it at the end.
    In both cases TEST NAME == NAME, so workers (which never run the test runner) open the
    very database the tests set up.
    """
    url = os.environ.get("DATABASE_URL", "")
    if url and not url.startswith("sqlite"):
        database = dict(dj_database_url.parse(url))
        # A unique name per run: two runs (or a left-over database) on one server never meet.
        name = os.environ.setdefault(
            "FLYWORKERS_TEST_DB_NAME", f"flyworkers_test_{os.getpid()}_{secrets.token_hex(3)}"
        )
        database.update(NAME=name, TEST={"NAME": name})
        return database
    # A file, not :memory:, because worker processes write job state to the same database.
    default = BASE_DIR.parent / ".test-db" / f"tests-{os.getpid()}.sqlite3"
    path = dj_database_url.parse(url)["NAME"] if url else None
    db_file = os.environ.setdefault("FLYWORKERS_TEST_DB", str(path or default))
    Path(db_file).parent.mkdir(exist_ok=True)
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": db_file,
        "TEST": {"NAME": db_file},
        "OPTIONS": {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            # WAL lets worker processes write while the test process reads.
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        },
    }


DATABASES = {"default": _test_database()}

REDIS_URL = reserve_redis_url()
RQ_QUEUES = {
    "default": {"URL": REDIS_URL},
    "images": {"URL": REDIS_URL},
    "other": {"URL": REDIS_URL},
    "render": {"URL": REDIS_URL},  # dedicated: a Machine per job (tests/test_dedicated.py)
}
RQ = {"QUEUE_CLASS": "django_flyworkers.FlyQueue"}

FLYWORKERS = {
    "API_URL": os.environ.get("FLYWORKERS_API_URL", "http://127.0.0.1:4280"),
    "API_TOKEN": os.environ.get("FLY_API_TOKEN", "flyworkers-test-token"),
    "APP_NAME": os.environ.get("FLY_APP_NAME", "flyworkers-tests"),
    "IMAGE": os.environ.get("FLY_IMAGE_REF", "registry.fly.io/flyworkers-tests:v1"),
    "REGION": "ord",
    "WAKE_MODE": "sync",
    "API_RETRY_SECONDS": 3,
    "QUEUES": {
        "default": {"MAX_MACHINES": 2},
        "images": {"MAX_MACHINES": 3},
        "other": {"MAX_MACHINES": 1},
        "render": {"MAX_MACHINES": 2, "MODE": "dedicated"},
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django_flyworkers": {"handlers": ["console"], "level": "INFO"}},
}

# Django's tasks framework (django.tasks; on Django 5.2 the django-tasks backport) on
# flyworkers' queues: tests/test_tasks.py.
TASKS = {
    "default": {
        "BACKEND": "django_flyworkers.tasks.FlyTaskBackend",
        "QUEUES": ["default", "images", "other", "render"],
    }
}
