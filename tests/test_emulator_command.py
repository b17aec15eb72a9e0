"""manage.py flyworkers_emulator runs the emulator; bad input is a one-line CommandError."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from django.core.management import call_command, load_command_class
from django.core.management.base import CommandError

from django_flyworkers.emulator import EmulatorControl, EmulatorServer, serve
from django_flyworkers.emulator import __main__ as emulator_cli
from django_flyworkers.emulator.server import is_loopback
from django_flyworkers.testing import free_port, processes, wait_for

MANAGE = Path(__file__).parent / "manage.py"


def test_runs_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    proc = processes.ForkedPopen(
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


@pytest.mark.parametrize("preload", [True, False])
def test_preload_forks_machines_from_preloaded_imports(tmp_path: Path, preload: bool) -> None:
    (tmp_path / "which.py").write_text(
        "import sys\nsys.exit(10 if 'django' in sys.modules else 20)\n"
    )
    port = free_port()
    args = [sys.executable, str(MANAGE), "flyworkers_emulator", "--port", str(port),
            "--token", "T", "--workdir", str(tmp_path)]  # fmt: skip
    args += ["--preload"] if preload else []
    proc = processes.ForkedPopen(args, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # once the zygote has done its imports
        assert ("Machines fork from preloaded imports" in line) is preload
        with EmulatorControl(f"http://127.0.0.1:{port}", "T") as fly:
            response = httpx.post(
                f"http://127.0.0.1:{port}/v1/apps/a/machines",
                headers={"Authorization": "Bearer T"},
                json={
                    "config": {
                        "image": "img",
                        "init": {"cmd": ["python", "which.py"]},
                        "restart": {"policy": "no"},
                    }
                },
            )
            assert response.status_code == 200, response.text
            machine_id = response.json()["id"]
            wait_for(lambda: fly.stats()["machines"][machine_id]["exit_codes"], what="the exit")
            assert fly.stats()["machines"][machine_id]["exit_codes"] == [10 if preload else 20]
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


# -- a non-loopback --host needs --allow-remote ------------------------------------------------

REMOTE = "0.0.0.0"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.1.2.3", False),
        ("192.168.0.10", False),
        ("fly.example.com", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_server_refuses_a_remote_host_unless_allowed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pass --allow-remote"):
        EmulatorServer(host=REMOTE, token="T", workdir=tmp_path)
    with pytest.raises(ValueError, match="refusing to serve"):
        serve(REMOTE, free_port(), "T", tmp_path)
    allowed = EmulatorServer(host=REMOTE, token="T", workdir=tmp_path, allow_remote=True)
    allowed.stop()  # constructed, never started: nothing was bound


def test_cli_refuses_a_remote_host_in_one_line_binding_nothing(tmp_path: Path) -> None:
    port = free_port()
    # Hold the port: an emulator that tried to bind it would fail with "cannot serve" (exit 1)
    # instead of refusing before binding (exit 2).
    with socket.socket() as held:
        held.bind(("127.0.0.1", port))  # conflicts with 0.0.0.0:port; never listens
        result = subprocess.run(
            [sys.executable, "-m", "django_flyworkers.emulator", "--host", REMOTE,
             "--port", str(port), "--token", "T", "--workdir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=30,
        )  # fmt: skip
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: refusing to serve on '0.0.0.0'")
    assert "--allow-remote" in line


def test_command_refuses_a_remote_host_in_one_line() -> None:
    with pytest.raises(CommandError) as exc:
        call_command("flyworkers_emulator", "--token", "T", "--host", REMOTE, "--port", "1")
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith("refusing to serve on '0.0.0.0'") and "--allow-remote" in message


def test_help_says_remote_hosts_need_allow_remote() -> None:
    parser = load_command_class("django_flyworkers", "flyworkers_emulator").create_parser(
        "manage.py", "flyworkers_emulator"
    )
    for text in (parser.format_help(), emulator_cli._parser().format_help()):
        words = " ".join(text.split())
        assert "non-loopback" in words and "--allow-remote" in words
        assert "runs any command" in words
