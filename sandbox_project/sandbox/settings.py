"""Settings for the sandbox project: django-flyworkers wired up exactly as the README says.

Everything that differs between a laptop and Fly comes from the environment, because worker
Machines run this same file: on Fly they get the app's secrets and ``FLY_*`` variables, in
the demo the emulator passes them the demo runner's environment.

``DATABASE_URL``  default: SQLite in this directory (WAL, since workers write concurrently)
``REDIS_URL``     default: redis://127.0.0.1:6379/0 (``make demo`` starts an embedded Redis
                  and sets this; nothing is started when settings are imported)
``FLY_API_TOKEN`` set it to talk to Fly; without it the Machines API is the local emulator
                  (``manage.py flyworkers_emulator``) at http://127.0.0.1:4280.
``DJANGO_SECRET_KEY``, ``DJANGO_DEBUG``, ``DJANGO_ALLOWED_HOSTS``, ``FLYWORKERS_WAKE_MODE``.
"""

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in ("1", "true", "yes", "on")


DEBUG = env_flag("DJANGO_DEBUG")
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or ""
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("Set DJANGO_SECRET_KEY (or DJANGO_DEBUG=1 for local use).")
    SECRET_KEY = "sandbox-insecure-key-for-local-use-only"

FLY_APP_NAME = os.environ.get("FLY_APP_NAME", "")
ALLOWED_HOSTS = [
    host.strip()
    for host in os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost").split(",")
    if host.strip()
]
CSRF_TRUSTED_ORIGINS = []
if FLY_APP_NAME:
    ALLOWED_HOSTS.append(f"{FLY_APP_NAME}.fly.dev")
    CSRF_TRUSTED_ORIGINS.append(f"https://{FLY_APP_NAME}.fly.dev")
    # Fly's proxy terminates TLS and says so in X-Forwarded-Proto.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = not DEBUG

USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_rq",
    "django_flyworkers",
    "gallery",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
try:  # Installed in the Docker image only: gunicorn serves static files through it.
    import whitenoise  # noqa: F401
except ImportError:
    pass
else:
    MIDDLEWARE.insert(1, "whitenoise.middleware.WhiteNoiseMiddleware")

ROOT_URLCONF = "sandbox.urls"
WSGI_APPLICATION = "sandbox.wsgi.application"
STATIC_URL = "/static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

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


def database_from_url(url: str) -> dict:
    """``sqlite:///relative.db``, ``sqlite:////abs/path.db`` or ``postgres://u:p@host/db``."""
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        path = unquote(parsed.path)[1:]  # sqlite:///rel.db -> "rel.db", sqlite:////abs -> "/abs"
        if path not in ("", ":memory:") and not Path(path).is_absolute():
            path = str(BASE_DIR / path)
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": path,
            # Worker processes write job state while the web process reads: WAL lets them.
            "OPTIONS": {
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                "timeout": 30,
                "transaction_mode": "IMMEDIATE",
            },
        }
    if parsed.scheme in ("postgres", "postgresql"):
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": unquote(parsed.path.lstrip("/")),
            "USER": unquote(parsed.username or ""),
            "PASSWORD": unquote(parsed.password or ""),
            "HOST": parsed.hostname or "",
            "PORT": str(parsed.port or ""),
            "CONN_MAX_AGE": 60,
            "CONN_HEALTH_CHECKS": True,
        }
    raise ImproperlyConfigured(f"DATABASE_URL scheme {parsed.scheme!r} is not supported here.")


DATABASES = {"default": database_from_url(os.environ.get("DATABASE_URL", "sqlite:///db.sqlite3"))}

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
RQ_QUEUES = {"default": {"URL": REDIS_URL}, "images": {"URL": REDIS_URL}}
# Global, not per queue: django-rq's admin and workers ignore a per-queue QUEUE_CLASS.
RQ = {"QUEUE_CLASS": "django_flyworkers.FlyQueue"}
# Django's tasks framework on the same queues (gallery.jobs.count_photos).
TASKS = {"default": {"BACKEND": "django_flyworkers.tasks.FlyTaskBackend", "QUEUES": ["default"]}}

# With FLY_API_TOKEN set, API_URL/APP_NAME/IMAGE/REGION stay None and django-flyworkers reads
# FLYWORKERS_API_URL (else https://api.machines.dev), FLY_APP_NAME, FLY_IMAGE_REF and
# FLY_REGION, which Fly sets on every Machine. Without a token: the local emulator.
LOCAL_EMULATOR = not os.environ.get("FLY_API_TOKEN")
# `DEMO_IDLE_ACTION=suspend make demo`: idle workers suspend their Machines (the warm pool)
# instead of exiting. Fly suspends Machines of at most 2 GB, so the images queue then runs
# on one performance CPU with 2 GB instead of two with 4 GB.
IDLE_ACTION = os.environ.get("DEMO_IDLE_ACTION", "stop")
IMAGES_GUEST = (
    {"cpu_kind": "performance", "cpus": 1, "memory_mb": 2048}
    if IDLE_ACTION == "suspend"
    else {"cpu_kind": "performance", "cpus": 2, "memory_mb": 4096}
)
FLYWORKERS = {
    "API_URL": os.environ.get("FLYWORKERS_API_URL")
    or ("http://127.0.0.1:4280" if LOCAL_EMULATOR else None),
    "API_TOKEN": "sandbox-local-emulator" if LOCAL_EMULATOR else None,
    "APP_NAME": None if FLY_APP_NAME else "flyworkers-sandbox",
    "IMAGE": None if os.environ.get("FLY_IMAGE_REF") else "flyworkers-sandbox:local",
    "WAKE_MODE": os.environ.get("FLYWORKERS_WAKE_MODE", "thread"),
    # Worker Machines' stop_config: a stopping worker may finish its longest job
    # (make_thumbnail, timeout=300) before SIGKILL. fly.toml's kill_timeout matches it.
    "STOP_TIMEOUT": 300,
    "QUEUES": {
        # Quick jobs: one small shared-CPU Machine per 10 queued jobs, at most two.
        "default": {"MAX_MACHINES": 2, "JOBS_PER_MACHINE": 10, "IDLE_ACTION": IDLE_ACTION},
        # CPU-heavy jobs: bigger Machines, one per 4 queued jobs, at most three.
        "images": {
            "MAX_MACHINES": 3,
            "JOBS_PER_MACHINE": 4,
            "IDLE_ACTION": IDLE_ACTION,
            "GUEST": IMAGES_GUEST,
        },
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django_flyworkers": {"handlers": ["console"], "level": "INFO"}},
}
