"""Pytest fixtures for testing code that uses django-flyworkers, on real parts.

Load them in your ``conftest.py``::

    pytest_plugins = ["django_flyworkers.testing.plugin"]

* ``redis_server`` (session): a real ``redis-server`` on the port chosen by
  :func:`~django_flyworkers.testing.reserve_redis_url`; ``redis_flush`` flushes it around a
  test.
* ``fly_emulator_server`` (session) and ``fly_emulator`` (per test): the Machines API
  emulator over a real socket, reset around each test, with ``FLYWORKERS`` pointed at it.
* With pytest-django, ``django_db_setup`` is extended to close the connections of the
  ``WAKE_MODE="thread"`` waker before the test database is dropped (PostgreSQL refuses to
  drop a database another session uses).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from django_flyworkers.testing import (
    API_URL_ENV,
    EMULATOR_TOKEN,
    RedisServer,
    free_port,
    port_of,
    reserve_redis_url,
)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real ``redis-server`` on the port chosen by :func:`reserve_redis_url`."""
    server = RedisServer(port_of(reserve_redis_url()))
    with server:
        yield server


@pytest.fixture
def redis_flush(redis_server: RedisServer) -> Iterator[RedisServer]:
    """The session Redis, flushed before and after the test."""
    import redis

    from django_flyworkers import release

    conn = redis.Redis.from_url(redis_server.url)
    conn.flushall()
    release.forget()  # first-seen times of releases were in the flushed Redis
    yield redis_server
    conn.flushall()
    release.forget()
    conn.close()


@pytest.fixture(scope="session")
def fly_emulator_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The Machines API emulator over a real socket, for the whole session.

    Machines run in ``FLYWORKERS_TEST_WORKDIR`` (default: the current directory), so a
    Machine command ``python manage.py rqworker`` finds your project's ``manage.py``. They
    fork from a zygote that imported Django, rq, redis and httpx once (``preload=True``), so
    a boot costs little CPU; your project's own code still loads in each Machine.
    Stopping it kills every process it started.
    """
    from django_flyworkers.emulator import EmulatorServer

    workdir = Path(os.environ.get("FLYWORKERS_TEST_WORKDIR", os.getcwd()))
    port = free_port()
    # Machines inherit this process's environment, as Fly Machines inherit app secrets: that
    # is how a worker finds the API (for its own wake-ups) and its token.
    saved = {key: os.environ.get(key) for key in (API_URL_ENV, "FLY_API_TOKEN")}
    os.environ[API_URL_ENV] = f"http://127.0.0.1:{port}"
    os.environ["FLY_API_TOKEN"] = EMULATOR_TOKEN
    server = EmulatorServer(
        host="127.0.0.1",
        port=port,
        token=EMULATOR_TOKEN,
        workdir=workdir,
        rate_limits=True,
        preload=True,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
        leftover = server.emulator.leftover_pids()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        # Stopping the emulator must end every process its Machines started, work-horses too.
        assert leftover == [], f"processes left behind by emulated Machines: {leftover}"


@pytest.fixture
def fly_emulator(fly_emulator_server: Any, settings: Any) -> Iterator[Any]:
    """The session emulator, reset before and after the test, with FLYWORKERS pointed at it."""
    from django_flyworkers.emulator import EmulatorControl
    from django_flyworkers.scaling import fleet
    from django_flyworkers.scaling.background import waker

    control = EmulatorControl(fly_emulator_server.url, EMULATOR_TOKEN)
    control.reset()
    fleet.forget()  # a Machines list from the previous test must not be reused
    flyworkers = dict(getattr(settings, "FLYWORKERS", {}))
    flyworkers.update(API_URL=fly_emulator_server.url, API_TOKEN=EMULATOR_TOKEN)
    settings.FLYWORKERS = flyworkers
    try:
        yield fly_emulator_server
    finally:
        waker.cancel()  # no retry of this test's wake-ups may reach the next test
        control.reset()
        fleet.forget()


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: None) -> Iterator[None]:
    """pytest-django's test database, and at its end the waker thread's connections closed."""
    yield
    from django_flyworkers.scaling.background import waker

    waker.close_connections()
