"""Shared fixtures: real redis-server and emulator fixtures (django_flyworkers.testing.plugin)."""

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from django_flyworkers.testing import processes

# Bytecode caches on, for the processes this run starts (xdist workers, worker Machines, commands):
# with PYTHONDONTWRITEBYTECODE set, as on some CI images, each of the hundreds of Python processes
# a run starts would compile this project's modules again, and each xdist worker would rewrite
# every test module's asserts again.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

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


@pytest.fixture(autouse=True)
def _no_forked_command_outlives_its_test() -> Iterator[None]:
    """A command a test forked and left running would go on reading this process's Redis in
    later tests (taking their jobs, holding their locks): kill it, and say which it was."""
    yield
    left = [process for process in processes.unwaited() if process.poll() is None]
    for process in left:
        process.kill()
        process.wait(10)
    if left:
        commands = [" ".join(map(str, process.args[1:])) for process in left]
        warnings.warn(f"killed commands a test left running: {commands}", stacklevel=1)


@pytest.fixture(scope="session")
def django_db_modify_db_settings_xdist_suffix() -> None:
    """Keep database names as tests/settings.py chose them, already one per xdist worker.

    pytest-django would add ``_gw0`` to the test database's name only, and worker processes,
    which open NAME, would then miss the database the tests set up.
    """


@pytest.hookimpl(trylast=True)  # after pytest-django's own reordering by database use
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Start the tests marked ``slow(seconds)`` first, longest first: processes end together.

    Under pytest-xdist (``make test``) the run ends when its busiest process does: a long test
    picked up last keeps one process busy while the others wait. xdist hands each process its
    first two tests in turn and then one more whenever it finishes one, so the one queued behind
    a running test waits for it: the longest tests go one to a process, then a quick one behind
    each, then the other long ones, each followed by a quick one.
    """

    def seconds(item: pytest.Item) -> float:
        marker = item.get_closest_marker("slow")
        return float(marker.args[0]) if marker and marker.args else 0.0

    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    slow = sorted((item for item in items if seconds(item)), key=seconds, reverse=True)
    quick = [item for item in items if not seconds(item)]
    head = slow[:workers] + quick[:workers]
    slow, quick = slow[workers:], quick[workers:]
    paired = [item for pair in zip(slow, quick, strict=False) for item in pair]
    rest = slow[len(paired) // 2 :] + quick[len(paired) // 2 :]
    items[:] = head + paired + rest


def pytest_report_header(config: pytest.Config) -> str:
    """Say which database this run uses: `make test` is SQLite, `make test-postgres` PostgreSQL."""
    from django.conf import settings

    database = settings.DATABASES["default"]
    return f"database: {database['ENGINE'].rsplit('.', 1)[-1]} {database['NAME']}"
