"""The environment the hot-path benchmarks (enqueue_overhead, drain, soak) run in.

Each picks a throw-away SQLite file and free loopback ports, and points
``benchmarks.db_settings`` at them through the environment, which the worker processes it
starts inherit.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchEnv:
    workdir: Path
    redis_port: int
    api_port: int


def bench_environment(prefix: str, wake_mode: str, **extra: str) -> BenchEnv:
    """Set the environment for one benchmark run and return where things are."""
    from django_flyworkers.testing import EMULATOR_TOKEN, free_port

    env = BenchEnv(Path(tempfile.mkdtemp(prefix=f"flyworkers-{prefix}-")), free_port(), free_port())
    os.environ.update(
        DJANGO_SETTINGS_MODULE="benchmarks.db_settings",
        FLYWORKERS_TEST_DB=str(env.workdir / f"{prefix}.sqlite3"),
        FLYWORKERS_TEST_REDIS_URL=f"redis://127.0.0.1:{env.redis_port}/0",
        FLYWORKERS_API_URL=f"http://127.0.0.1:{env.api_port}",
        FLY_API_TOKEN=EMULATOR_TOKEN,
        FLYWORKERS_BENCH_WAKE_MODE=wake_mode,
        **extra,
    )
    return env
