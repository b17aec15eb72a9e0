"""Shared fixtures: real redis-server and emulator fixtures (django_flyworkers.testing.plugin)."""

import os
from pathlib import Path

import pytest

# Worker Machines run tests/manage.py from the tests directory.
os.environ.setdefault("FLYWORKERS_TEST_WORKDIR", str(Path(__file__).resolve().parent))

pytest_plugins = ["django_flyworkers.testing.plugin"]


@pytest.fixture(autouse=True, scope="session")
def _remove_test_db_file() -> object:
    yield
    db = os.environ.get("FLYWORKERS_TEST_DB")
    if db:
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(db + suffix).unlink(missing_ok=True)


def pytest_report_header(config: pytest.Config) -> str:
    """Say which database this run uses: `make test` is SQLite, `make test-postgres` PostgreSQL."""
    from django.conf import settings

    database = settings.DATABASES["default"]
    return f"database: {database['ENGINE'].rsplit('.', 1)[-1]} {database['NAME']}"
