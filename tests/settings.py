"""Settings for the django-flyworkers test suite.

Worker Machines started by the emulator run ``tests/manage.py`` with these same settings, so
everything they share with the test process comes from the environment: the Redis URL (chosen
once per process tree), the SQLite file, the emulator URL and token.
"""

import os
from pathlib import Path

from django_flyworkers.testing import reserve_redis_url

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

# A file, not :memory:, because worker processes write job state to the same database.
_DB_FILE = os.environ.setdefault(
    "FLYWORKERS_TEST_DB", str(BASE_DIR.parent / ".test-db" / f"tests-{os.getpid()}.sqlite3")
)
Path(_DB_FILE).parent.mkdir(exist_ok=True)
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": _DB_FILE,
        "TEST": {"NAME": _DB_FILE},
        "OPTIONS": {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            # WAL lets worker processes write while the test process reads.
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        },
    }
}

REDIS_URL = reserve_redis_url()
RQ_QUEUES = {
    "default": {"URL": REDIS_URL},
    "images": {"URL": REDIS_URL},
    "other": {"URL": REDIS_URL},
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
        "QUEUES": ["default", "images", "other"],
    }
}
