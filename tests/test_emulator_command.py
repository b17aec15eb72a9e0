"""manage.py flyworkers_emulator runs the emulator; bad input is a one-line CommandError."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from django_flyworkers.testing import free_port

MANAGE = Path(__file__).parent / "manage.py"


def test_runs_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(MANAGE), "flyworkers_emulator", "--port", str(port),
         "--token", "T", "--workdir", str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in line
        response = httpx.get(
            f"http://127.0.0.1:{port}/v1/apps/a/machines", headers={"Authorization": "Bearer T"}
        )
        assert response.status_code == 200 and response.json() == []
        assert httpx.get(f"http://127.0.0.1:{port}/v1/apps/a/machines").status_code == 401
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "0"], "argument --port: must be at least 1, got 0"),
        (["--port", "65536"], "argument --port: must be at most 65535"),
        (["--boot-delay", "-1"], "argument --boot-delay: must be at least 0"),
        (["--boot-delay", "inf"], "argument --boot-delay: must be a finite number"),
        (["--workdir", "/nonexistent/dir"], "is not a directory"),
    ],
)
def test_bad_arguments(args: list[str], message: str) -> None:
    started = time.monotonic()
    with pytest.raises(CommandError, match=message):
        call_command("flyworkers_emulator", "--token", "T", *args)
    assert time.monotonic() - started < 5
