"""Serve the emulator over HTTP: a threaded stdlib WSGI server, and `serve()` for CLIs.

The stdlib server is enough: one thread per connection handles many concurrent long-poll
waits, and there is no extra dependency for users' CI.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import socketserver
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from .app import Emulator

logger = logging.getLogger("django_flyworkers.emulator")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1).

    Host names other than ``localhost`` count as remote: resolving them could mean a DNS
    query, and what they resolve to can change.
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback `host` unless `allow_remote` (ValueError with a one-line reason)."""
    if not allow_remote and not is_loopback(host):
        raise ValueError(
            f"refusing to serve on {host!r}: the emulator runs the commands it is sent, so it "
            "binds loopback only (127.0.0.1, ::1, localhost); pass --allow-remote to bind "
            "another address"
        )


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), which can stall on a DNS lookup.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)
        self.setup_environ()


class _ThreadingWSGIServerV6(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.client_address[0], format % args)

    def address_string(self) -> str:
        return str(self.client_address[0])


class EmulatorServer:
    """The emulator on a real socket, served from a background thread.

    Usage::

        with EmulatorServer(token="T", workdir=tmp_path) as srv:
            client = httpx.Client(base_url=srv.url, headers={"Authorization": "Bearer T"})

    `token` is required. ``port=0`` picks a free port; `url` has the real one after
    `start()`. `stop()` shuts the server down and kills every Machine process it started.
    A `host` that is not loopback is refused (ValueError) unless ``allow_remote=True``: the
    emulator runs whatever command a client sends it.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str = "",
        workdir: Path | str = ".",
        rate_limits: bool = True,
        boot_delay: float = 0.0,
        env: Mapping[str, str] | None = None,
        *,
        allow_remote: bool = False,
        **options: Any,
    ) -> None:
        check_host(host, allow_remote)
        self.host = host
        self.port = port
        self.emulator = Emulator(token, workdir, rate_limits, boot_delay, env, **options)
        self._httpd: _ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("EmulatorServer.url is only known after start()")
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self._httpd.server_port}"

    def start(self) -> EmulatorServer:
        if self._httpd is not None:
            return self
        server_class = _ThreadingWSGIServerV6 if ":" in self.host else _ThreadingWSGIServer
        self._httpd = server_class((self.host, self.port), _QuietHandler)
        self._httpd.set_app(self.emulator)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="emulator-http",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and kill every process group the emulator started."""
        # First the emulator: it wakes pending waits and kills the Machines.
        self.emulator.shutdown()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


ZYGOTE_WAIT = 30.0
"""Seconds `serve` waits for the zygote's imports before it announces itself (then it goes on
with exec boots until they are done)."""


def serve(
    host: str,
    port: int,
    token: str,
    workdir: Path | str,
    rate_limits: bool = True,
    boot_delay: float = 0.0,
    *,
    log_dir: Path | str | None = None,
    announce: Callable[[str], None] | None = None,
    allow_remote: bool = False,
    preload: bool = False,
) -> None:
    """Run the emulator until SIGINT or SIGTERM, then kill every Machine process.

    `announce` receives the one-line "listening" message (default: print it). Signal handlers
    are installed only when called from the main thread. A non-loopback `host` is refused
    (ValueError, nothing bound) unless `allow_remote`. With `preload`, ``python <script>``
    Machines fork from a zygote that imported Django, rq, redis and httpx once (see
    `Emulator`); the message comes once it has, so the first boots are forked too.
    """
    check_host(host, allow_remote)
    stopping = threading.Event()
    previous: dict[signal.Signals, Any] = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, on_signal)
    server = EmulatorServer(
        host,
        port,
        token,
        workdir,
        rate_limits,
        boot_delay,
        log_dir=log_dir,
        allow_remote=allow_remote,
        preload=preload,
    )
    try:
        server.start()
        forked = preload and server.emulator.runner.zygote_ready(timeout=ZYGOTE_WAIT)
        message = (
            f"Fly Machines emulator listening on {server.url} "
            f"(machine logs in {server.emulator.log_dir}"
            f"{'; Machines fork from preloaded imports' if forked else ''})"
        )
        (announce or (lambda line: print(line, flush=True)))(message)
        while not stopping.wait(0.5):
            pass
    finally:
        server.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
