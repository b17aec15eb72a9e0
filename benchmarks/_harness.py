"""What the emulator benchmarks share: real parts, one configuration for both sides, statistics.

A benchmark calls :func:`prepare` first. It points this process at a throw-away SQLite file,
a redis-server port and an emulator port, and at ``benchmarks.settings``, which reads
``FLYWORKERS`` from the environment. Worker Machines inherit that environment from the
emulator (as Fly Machines inherit app secrets), so they run with the same profiles. Then:

* :func:`redis_server` and :func:`emulator` start the real parts (rate limits on);
* :func:`use_profiles` switches the queue profiles (start a new emulator afterwards so its
  Machines see them too);
* :func:`unsupported` says, in one line, why this build rejects a profile;
* :func:`percentile` and :func:`table` summarize and print.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from django_flyworkers.emulator import EmulatorServer
    from django_flyworkers.testing import RedisServer

WORKDIR = ROOT / "tests"
"""Where Machines run: ``tests/manage.py``, which puts the repository root on the path."""


@dataclass(frozen=True)
class Bench:
    """The throw-away parts of one benchmark run."""

    tmp: Path
    redis_port: int
    api_port: int
    token: str
    wake_mode: str

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"


def prepare(
    profiles: Mapping[str, Mapping[str, Any]], *, wake_mode: str = "thread", prefix: str = "bench"
) -> Bench:
    """Configure this process for a benchmark, ``django.setup()`` and migrate a fresh database.

    ``profiles`` (queue -> ``FLYWORKERS`` profile) must name every queue the run will use:
    django-rq reads ``RQ_QUEUES`` once.
    """
    from django_flyworkers.testing import EMULATOR_TOKEN, free_port

    tmp = Path(tempfile.mkdtemp(prefix=f"flyworkers-{prefix}-"))
    bench = Bench(tmp, free_port(), free_port(), EMULATOR_TOKEN, wake_mode)
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "benchmarks.settings",
            "FLYWORKERS_TEST_DB": str(tmp / "bench.sqlite3"),
            "FLYWORKERS_TEST_REDIS_URL": bench.redis_url,
            "FLYWORKERS_API_URL": bench.api_url,
            "FLY_API_TOKEN": bench.token,
            "FLYWORKERS_BENCH_PROFILES": json.dumps(profiles),
            "FLYWORKERS_BENCH_WAKE_MODE": wake_mode,
        }
    )
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    return bench


def cleanup(bench: Bench, *, keep: bool = False) -> None:
    """Remove the run's temporary files (database, Machine logs, stamps), unless ``keep``."""
    if keep:
        print(f"kept {bench.tmp} (the database and the Machines' logs) for a look")
        return
    shutil.rmtree(bench.tmp, ignore_errors=True)


def redis_server(bench: Bench) -> RedisServer:
    """A redis-server on the run's port (use it as a context manager)."""
    from django_flyworkers.testing import RedisServer

    return RedisServer(bench.redis_port)


def emulator(
    bench: Bench, env: Mapping[str, str] | None = None, *, preload: bool = False
) -> EmulatorServer:
    """The Machines API emulator on the run's port, with Fly's rate limits on.

    Its Machines get this process's environment as it is now, plus ``env``. With `preload`
    they fork from a zygote (`django_flyworkers.emulator.zygote`): boots cost a fraction of
    the CPU and time of a real interpreter's, which a quick check wants and a figure of boot
    time or Machine-seconds must not have.
    """
    from django_flyworkers.emulator import EmulatorServer

    return EmulatorServer(
        port=bench.api_port,
        token=bench.token,
        workdir=WORKDIR,
        rate_limits=True,
        env=env,
        log_dir=bench.tmp / "logs",
        preload=preload,
    )


@contextlib.contextmanager
def use_profiles(bench: Bench, profiles: Mapping[str, Mapping[str, Any]]) -> Iterator[None]:
    """Run with these queue profiles, here and (through the environment) in new Machines."""
    from django.test import override_settings

    from benchmarks.settings import flyworkers_setting

    previous = os.environ["FLYWORKERS_BENCH_PROFILES"]
    os.environ["FLYWORKERS_BENCH_PROFILES"] = json.dumps(profiles)
    try:
        with override_settings(FLYWORKERS=flyworkers_setting(profiles, bench.wake_mode)):
            yield
    finally:
        os.environ["FLYWORKERS_BENCH_PROFILES"] = previous


def unsupported() -> str | None:
    """Why this build rejects the current ``FLYWORKERS`` (one line), or None if it accepts it.

    The settings must parse and pass the ``flyworkers.*`` system checks without an error: that
    is how a profile key or value this build does not know yet shows up.
    """
    from django.core import checks

    from django_flyworkers import conf

    _, problems = conf.validate(conf.raw_settings())
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return f"flyworkers.{problems[0].id}: {problems[0].message}{more}"
    errors = [
        message
        for message in checks.run_checks()
        if (message.id or "").startswith("flyworkers.") and message.is_serious()
    ]
    if not errors:
        return None
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{errors[0].id}: {errors[0].msg}{more}"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(cell) for cell in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        first, *rest = (
            cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        )
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def seconds(value: float, digits: int = 2) -> str:
    """``1.23s``, or ``-`` for NaN."""
    return "-" if math.isnan(value) else f"{value:.{digits}f}s"
