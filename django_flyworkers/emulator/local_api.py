"""Each Machine's local API: the emulator's routes on a Unix socket, without a token.

On Fly a Machine reaches the Machines API through the Unix socket ``/.fly/api`` (HTTP, host
``flaps``, the usual ``/v1/apps/{app}/machines/{id}/...`` routes) and needs no token to act
on itself (docs: reference/suspend-resume). The emulator gives every Machine its own socket
and passes its path in ``FLYWORKERS_LOCAL_API_SOCKET``; worker code uses that path when set,
else ``/.fly/api``, so the same client code runs here and on Fly.

One thread watches every listening socket (a selector) and hands each connection to a
thread of its own, so a hundred Machines cost one idle thread, not a hundred.
"""

from __future__ import annotations

import contextlib
import selectors
import shutil
import socket
import socketserver
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler

LOCAL_API_ENV = "FLYWORKERS_LOCAL_API_SOCKET"
"""The environment variable that tells a Machine where its local API socket is."""

WSGIApp = Callable[[Mapping[str, Any], Callable[..., Any]], Iterable[bytes]]
_MAX_UNIX_PATH = 100  # sockaddr_un.sun_path is 108 bytes on Linux, 104 on macOS


class _Handler(WSGIRequestHandler):
    def setup(self) -> None:
        super().setup()
        # A Unix socket peer has no address; WSGIRequestHandler expects (host, port).
        self.client_address = ("local", 0)

    def address_string(self) -> str:
        return "local"

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, path: str, app: WSGIApp) -> None:
        super().__init__(path, _Handler)
        self.application = app
        # What wsgiref's WSGIServer.setup_environ would give; the Host is Fly's "flaps".
        self.base_environ = {
            "SERVER_NAME": "flaps",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PORT": "80",
            "REMOTE_HOST": "",
            "CONTENT_LENGTH": "",
            "SCRIPT_NAME": "",
        }

    def get_app(self) -> WSGIApp:
        return self.application


class LocalApi:
    """Per-Machine Unix sockets serving `app_for(machine_id)`; see the module docstring."""

    def __init__(self, app_for: Callable[[str], WSGIApp]) -> None:
        self._app_for = app_for
        self.directory = Path(tempfile.mkdtemp(prefix="flyemu-", dir=_short_tmp()))
        self._servers: dict[str, _Server] = {}
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._wake_recv, self._wake_send = socket.socketpair()
        self._selector.register(self._wake_recv, selectors.EVENT_READ)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="emulator-local-api", daemon=True)
        self._thread.start()

    def open(self, machine_id: str) -> str:
        """The socket path of a Machine, listening from now on (idempotent)."""
        with self._lock:
            server = self._servers.get(machine_id)
            if server is None:
                path = self.directory / f"{machine_id}.sock"
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                server = self._servers[machine_id] = _Server(str(path), self._app_for(machine_id))
                self._selector.register(server.socket, selectors.EVENT_READ, server)
                self._wake()
            return str(server.server_address)

    def path(self, machine_id: str) -> str | None:
        """The socket path of a Machine, if it has one open."""
        with self._lock:
            server = self._servers.get(machine_id)
            return str(server.server_address) if server else None

    def close(self, machine_id: str) -> None:
        """Stop listening for this Machine and remove its socket."""
        with self._lock:
            server = self._servers.pop(machine_id, None)
            if server is not None:
                self._discard(server)

    def close_all(self) -> None:
        with self._lock:
            for server in self._servers.values():
                self._discard(server)
            self._servers.clear()

    def shutdown(self) -> None:
        """Close every socket, stop the thread and remove the socket directory."""
        self.close_all()
        with self._lock:
            self._closed = True
            self._wake()
        self._thread.join(5)
        self._selector.close()
        self._wake_recv.close()
        self._wake_send.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _discard(self, server: _Server) -> None:
        # Under self._lock. Registration changes happen under the lock; the loop's select()
        # is woken so that it never waits on a closed socket.
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(server.socket)
        server.server_close()
        with contextlib.suppress(OSError):
            Path(str(server.server_address)).unlink()
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_send.send(b"x")

    def _loop(self) -> None:
        while True:
            try:
                ready = self._selector.select()
            except (OSError, ValueError):  # a socket closed under select(): look again
                ready = []
            ready_servers = []
            for key, _ in ready:
                if key.fileobj is self._wake_recv:
                    with contextlib.suppress(OSError):
                        self._wake_recv.recv(4096)
                else:
                    ready_servers.append(key.data)
            with self._lock:
                if self._closed:
                    return
                live = [s for s in ready_servers if s in self._servers.values()]
            for server in live:
                # Accepts and starts a thread for the connection (ThreadingMixIn). A server
                # closed meanwhile raises OSError or ValueError (closed file descriptor).
                with contextlib.suppress(OSError, ValueError):
                    server.handle_request()


def _short_tmp() -> str:
    """A temp directory whose socket paths fit in ``sun_path`` (TMPDIR can be long)."""
    candidate = tempfile.gettempdir()
    if len(candidate) + len("/flyemu-xxxxxxxx/0123456789abcd.sock") <= _MAX_UNIX_PATH:
        return candidate
    return "/tmp"
