"""The Machine's own API over a Unix socket: discovery and a real HTTP server on a socket.

The server here is a tiny ``http.server`` on a ``socketserver.UnixStreamServer`` that answers
like Fly's ``/.fly/api`` (host ``flaps``, no token), so the client's UDS transport, headers
and error handling run for real.
"""

from __future__ import annotations

import json
import os
import shutil
import socketserver
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from django_flyworkers.machines import (
    MachinesAPIError,
    MachinesClient,
    PreconditionFailed,
    RetryPolicy,
    TransportError,
    local,
    local_api_socket,
)
from django_flyworkers.machines.local import LOCAL_API_SOCKET_ENV

APP = "local-app"
SUSPEND = f"/v1/apps/{APP}/machines/m1/suspend"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeLocalApi:
    """What the socket server answers, and what it was asked."""

    path: str
    answers: dict[tuple[str, str], list[tuple[int, Any]]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)

    def answer(self, method: str, path: str, *replies: tuple[int, Any]) -> None:
        self.answers[(method, path)] = list(replies)

    def reply(self, method: str, path: str) -> tuple[int, Any]:
        queue = self.answers.get((method, path))
        if not queue:
            return 404, "404 page not found"
        return queue.pop(0) if len(queue) > 1 else queue[0]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def _handle(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        api = self.server.api
        api.seen.append(
            Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        )
        status, payload = api.reply(self.command, self.path.split("?")[0])
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _handle

    def address_string(self) -> str:  # a Unix socket peer has no host
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    api: FakeLocalApi


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Short path: a Unix socket path must fit in 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="fw-uds-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def api(socket_dir: Path) -> Iterator[FakeLocalApi]:
    sock = socket_dir / "api"
    server = _Server(str(sock), _Handler)
    server.api = FakeLocalApi(str(sock))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.api
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(autouse=True)
def no_socket_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No inherited setting, and no real /.fly/api, unless a test sets one."""
    monkeypatch.delenv(LOCAL_API_SOCKET_ENV, raising=False)
    monkeypatch.setattr(local, "LOCAL_API_SOCKET", str(tmp_path / "no-such-socket"))


# -- the client over the socket -----------------------------------------------------------


def local_client(path: str, retry: RetryPolicy | None = None) -> MachinesClient:
    client = MachinesClient.local(APP, path, retry=retry)
    assert client is not None
    return client


def test_suspend_goes_to_flaps_over_the_socket_without_a_token(api: FakeLocalApi) -> None:
    api.answer("POST", SUSPEND, (200, {"ok": True}))
    client = MachinesClient.local(APP, api.path)
    assert client is not None
    with client:
        client.suspend("m1")
        assert client.socket_path == api.path
        assert "socket=" in repr(client) and "flaps" in repr(client)
    (request,) = api.seen
    assert (request.method, request.path) == ("POST", SUSPEND)
    assert request.headers["host"] == "flaps"
    assert "authorization" not in request.headers
    assert request.headers["user-agent"].startswith("django-flyworkers/")


def test_local_client_reads_machines_and_fly_errors(api: FakeLocalApi) -> None:
    machine = {"id": "m1", "name": "w", "state": "started", "config": {"image": "img:2"}}
    api.answer("GET", f"/v1/apps/{APP}/machines/m1", (200, machine))
    api.answer(
        "POST",
        SUSPEND,
        (412, {"error": "failed_precondition: unable to suspend machine from current state: "
               "'stopped'"}),
    )  # fmt: skip
    with local_client(api.path) as client:
        fetched = client.get("m1")
        assert fetched.is_running and fetched.image == "img:2"
        with pytest.raises(PreconditionFailed) as info:
            client.suspend("m1")
    assert "current state: 'stopped'" in str(info.value)
    assert info.value.path == SUSPEND


def test_already_suspended_is_a_success(api: FakeLocalApi) -> None:
    api.answer(
        "POST", SUSPEND, (412, {"error": "failed_precondition: current state: 'suspending'"})
    )
    with local_client(api.path) as client:
        client.suspend("m1")
    assert len(api.seen) == 1


def test_local_client_does_not_retry_unless_asked(api: FakeLocalApi) -> None:
    api.answer("POST", SUSPEND, (503, {"error": "unavailable: busy"}), (200, {"ok": True}))
    with local_client(api.path) as client:
        assert client.retry_policy.max_elapsed == 0
        with pytest.raises(MachinesAPIError) as info:
            client.suspend("m1")
    assert info.value.status == 503 and len(api.seen) == 1
    api.answer("POST", SUSPEND, (503, {"error": "unavailable: busy"}), (200, {"ok": True}))
    sleeps: list[float] = []
    retry = RetryPolicy(max_elapsed=5, sleep=sleeps.append, rand=lambda: 1.0)
    with local_client(api.path, retry) as client:
        client.suspend("m1")
    assert len(api.seen) == 3 and len(sleeps) == 1


def test_socket_that_went_away_is_a_transport_error(api: FakeLocalApi, socket_dir: Path) -> None:
    client = MachinesClient.local(APP, api.path)
    assert client is not None
    os.unlink(api.path)
    with client, pytest.raises(TransportError) as info:
        client.suspend("m1")
    assert info.value.ambiguous is False  # nothing was sent: safe to fall back to the token


# -- discovery ----------------------------------------------------------------------------


def test_env_names_the_socket(api: FakeLocalApi, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LOCAL_API_SOCKET_ENV, api.path)
    assert local_api_socket() == api.path
    api.answer("POST", SUSPEND, (200, {"ok": True}))
    client = MachinesClient.local(APP)
    assert client is not None
    with client:
        client.suspend("m1")
    assert api.seen[0].path == SUSPEND


def test_default_socket_is_used_when_present(
    api: FakeLocalApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local, "LOCAL_API_SOCKET", api.path)
    assert local_api_socket() == api.path
    assert local_api_socket({LOCAL_API_SOCKET_ENV: ""}) is None  # empty: never a socket
    assert local_api_socket({LOCAL_API_SOCKET_ENV: "  "}) is None


def test_no_socket_means_no_local_client(
    socket_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert local_api_socket() is None  # no /.fly/api here, nothing said about it
    assert MachinesClient.local(APP) is None
    assert caplog.text == ""
    regular = socket_dir / "file"
    regular.write_text("not a socket")
    missing = socket_dir / "missing"
    for path in (regular, missing, socket_dir):
        assert local_api_socket({LOCAL_API_SOCKET_ENV: str(path)}) is None
        assert f"{LOCAL_API_SOCKET_ENV}={path} is not a Unix socket" in caplog.text


# Imports first: after dropping root, the interpreter's own files may be out of reach.
_PROBE = """
import os, sys
from django_flyworkers.machines import local_api_socket
if os.geteuid() == 0:
    os.setgid(65534)
    os.setuid(65534)
print(local_api_socket({"FLYWORKERS_LOCAL_API_SOCKET": sys.argv[1]}))
"""


@pytest.mark.parametrize(("mode", "usable"), [(0o600, False), (0o666, True)])
def test_a_socket_this_user_cannot_open_is_not_used(
    api: FakeLocalApi, mode: int, usable: bool
) -> None:
    """Fly's socket serves privileged processes; an image that drops root may be refused."""
    os.chmod(api.path, mode)
    if os.geteuid() != 0:
        os.chown(api.path, -1, -1)  # ours: 0o600 is then usable, so only 0o666 tells
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE, api.path],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    expected = api.path if usable or os.geteuid() != 0 else "None"
    assert probe.stdout.strip() == expected
