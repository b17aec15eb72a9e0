"""The test suite's database: chosen from ``DATABASE_URL``, and the same one in worker processes.

Worker Machines run ``tests/manage.py`` without the test runner, so they open ``NAME``: these
tests hold ``tests/settings.py`` to giving them the database the tests set up, on SQLite and on
PostgreSQL (``make test-postgres``).
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from django_flyworkers import ledger
from django_flyworkers.testing import processes

TESTS = Path(__file__).resolve().parent


def settings_with(monkeypatch: pytest.MonkeyPatch, **env: str | None) -> dict[str, Any]:
    """``tests/settings.py`` evaluated afresh under ``env`` (None removes a variable)."""
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    return dict(runpy.run_path(str(TESTS / "settings.py"))["DATABASES"]["default"])


@pytest.mark.django_db(transaction=True)
def test_a_worker_process_opens_the_database_the_tests_use() -> None:
    ledger.record_scale_event("default", "create", machine_id="shared-db-probe", reason="probe")
    probe = (
        "from django_flyworkers.models import ScaleEvent; "
        "print(ScaleEvent.objects.filter(machine_id='shared-db-probe').count())"
    )
    # As the emulator starts a Machine: tests/manage.py, this process's environment.
    done = processes.run(
        [sys.executable, "manage.py", "shell", "-c", probe],
        cwd=TESTS,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    # The last line: Django's shell may first say what it imported.
    assert done.stdout.strip().splitlines()[-1] == "1"


def test_without_database_url_the_tests_share_an_sqlite_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    db_file = str(tmp_path / "run.sqlite3")
    database = settings_with(monkeypatch, DATABASE_URL=None, FLYWORKERS_TEST_DB=db_file)
    assert database["ENGINE"] == "django.db.backends.sqlite3"
    assert database["NAME"] == database["TEST"]["NAME"] == db_file
    assert "journal_mode=WAL" in database["OPTIONS"]["init_command"]


def test_a_postgres_url_gives_a_database_named_once_per_process_tree(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = "postgres://flyer:s3cret@127.0.0.1:6543/appdb"
    first = settings_with(monkeypatch, DATABASE_URL=url, FLYWORKERS_TEST_DB_NAME=None)
    assert first["ENGINE"] == "django.db.backends.postgresql"
    assert (first["USER"], first["PASSWORD"], first["HOST"], first["PORT"]) == (
        "flyer",
        "s3cret",
        "127.0.0.1",
        6543,
    )
    # Not the URL's database: one of the run's own, which pytest-django creates and drops.
    assert first["NAME"].startswith("flyworkers_test_")
    assert first["TEST"]["NAME"] == first["NAME"]
    # The name went into the environment, so a worker process (same settings, inherited
    # environment) resolves the very same database.
    assert os.environ["FLYWORKERS_TEST_DB_NAME"] == first["NAME"]
    again = settings_with(monkeypatch)
    assert again["NAME"] == first["NAME"]
    # Another run (a fresh environment) gets another database.
    other = settings_with(monkeypatch, FLYWORKERS_TEST_DB_NAME=None)
    assert other["NAME"] != first["NAME"]


def test_this_run_uses_the_database_url_it_was_given() -> None:
    engine = settings.DATABASES["default"]["ENGINE"]
    url = os.environ.get("DATABASE_URL", "")
    expected = "postgresql" if url.startswith(("postgres:", "postgresql:")) else "sqlite3"
    assert engine == f"django.db.backends.{expected}"


@pytest.mark.django_db(transaction=True)
def test_the_flush_between_tests_keeps_content_types_and_permissions_only() -> None:
    from django.contrib.auth.models import Permission, User
    from django.contrib.contenttypes.models import ContentType
    from django.core.management import call_command

    from django_flyworkers.models import ScaleEvent

    kept = (
        sorted(ContentType.objects.values_list("id", "model")),
        sorted(Permission.objects.values_list("id", "codename")),
    )
    assert kept[1], "post_migrate created the permissions once"
    User.objects.create_user("flushed", password="x")
    ledger.record_scale_event("default", "create", machine_id="flushed", reason="probe")

    # As TransactionTestCase calls it after each test (tests/testapp/.../flush.py).
    call_command("flush", verbosity=0, interactive=False, reset_sequences=False)

    assert not User.objects.exists() and not ScaleEvent.objects.exists()
    after = (
        sorted(ContentType.objects.values_list("id", "model")),
        sorted(Permission.objects.values_list("id", "codename")),
    )
    assert after == kept
