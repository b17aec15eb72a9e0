"""A fork server for emulated Machines: Python imported once, each boot forked from it.

Most of a worker Machine's boot on a laptop is Python importing Django, rq, redis and httpx
(about 0.5 s of CPU each time). A test run or a demo boots a hundred Machines, so the
emulator can start them from a *zygote* instead (``Emulator(preload=True)``): one process
that has already imported those third-party modules and forks a copy of itself for each
``python <script> ...`` Machine command. The copy then does what a fresh interpreter would:
new session, log file on stdout and stderr, working directory, environment, ``sys.argv``,
``sys.path[0]``, runs the script as ``__main__`` and exits with its status after atexit
handlers and non-daemon threads. Only the imports are shared, never state: Django settings,
the app registry and this project's own modules load in the Machine, from its environment.

Nothing is preloaded that reads settings at import. A module that reads an environment
variable at import (rq's ``RQ_KEY_PREFIX``) keeps the zygote's value in a fork, so the zygote
records which variables its imports read, and a command whose environment differs in one of
them, or in a ``PYTHON*`` variable, the locale or ``TZ``, starts the ordinary way. So does a
command that is not ``python <existing script>`` or ``python -c``, and everything when the
zygote cannot start.

The zygote says ``ready`` once its imports are done. Until then, and whenever an answer takes
longer than `SPAWN_TIMEOUT`, Machines start the ordinary way: the emulator launches them
under its lock, which must never wait on a zygote still importing on a busy machine (a hung
zygote is killed, and its Machines with it).

Protocol (one JSON object per line): the emulator sends ``spawn`` (argv, env, cwd, and a log
path or ``stdio``) and gets ``spawned`` (pid or error) back in order; the zygote reports
``exited`` when a Machine's main process exits, and leaves it unreaped (so its pid, which is
also its session id, cannot be reused while the emulator signals what is left of the session)
until the emulator sends ``reap`` and gets ``reaped`` with the return code (negative for a
signal, as `subprocess`). With ``stdio``, three descriptors for the child's stdin, stdout and
stderr come first over a Unix socket (SCM_RIGHTS): that is how
`django_flyworkers.testing.processes.ForkedPopen` hands a forked command the pipes
`subprocess` made for it. The zygote process itself is `zygote_process`.

The Machine processes are the zygote's children, not the emulator's; the emulator signals
them by pid, as it does the processes of any session. POSIX only; no Django import here.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

DEFAULT_PRELOAD = (
    "asyncio",
    "decimal",
    "email.message",
    "json",
    "logging.config",
    "sqlite3",
    "ssl",
    "uuid",
    "django.contrib.admin.options",
    "django.contrib.admin.sites",
    "django.core.management",
    "django.db.backends.sqlite3.base",
    "django.db.models",
    "django.forms",
    "django.http",
    "django.template.defaulttags",
    "django.urls",
    "django.views.generic",
    "httpx",
    "psycopg",
    "redis",
    "rq",
    "rq.job",
    "rq.queue",
    "rq.worker",
)
"""Third-party and stdlib modules a worker Machine imports, none reading settings at import.

A module that fails to import (psycopg where it is not installed) is left out.
"""


_STARTUP_VARS = ("LANG", "LC_ALL", "LC_CTYPE", "TZ")
"""Besides ``PYTHON*``, what an interpreter reads as it starts: the locale (its stdio
encoding) and the time zone (the ``time`` module reads it once, from C)."""


def same_interpreter(
    argv: list[str],
    env: Mapping[str, str],
    zygote_env: Mapping[str, str],
    read_at_import: Iterable[str] = (),
) -> bool:
    """Whether a fork of the zygote runs `argv` in `env` as ``exec`` would.

    True for ``<this interpreter> <script file> ...`` (or ``-c <source> ...``, which
    `spawn` takes where no file must exist) when every variable the zygote's start read is
    as the zygote's: each ``PYTHON*`` one (they change how an interpreter starts: path, hash
    seed, bytecode, warnings), the locale, the time zone, and those its preloaded modules
    read at import (`read_at_import`, such as rq's ``RQ_KEY_PREFIX``).
    """
    if len(argv) < 2 or argv[0] != sys.executable:
        return False
    if argv[1].startswith("-") and (argv[1] != "-c" or len(argv) < 3):
        return False
    keys = {key for key in (*env, *zygote_env) if key.startswith("PYTHON")}
    keys.update(_STARTUP_VARS, read_at_import)
    return all(env.get(key) == zygote_env.get(key) for key in keys)


SERVER = Path(__file__).with_name("zygote_process.py")
"""The zygote's own script (`zygote_process`), run by a new interpreter."""

SPAWN_TIMEOUT = 10.0
"""Seconds a ready zygote may take to answer a spawn before it is given up as hung."""


class ZygoteProcess:
    """A Machine's main process forked by the zygote: `pid`, then `wait_exited`, `reap`."""

    def __init__(self, zygote: Zygote, pid: int) -> None:
        self.pid = pid
        self._zygote = zygote
        self._exited = threading.Event()
        self._reaped: queue.Queue[int] = queue.Queue(maxsize=1)

    def wait_exited(self, timeout: float | None = None) -> bool:
        """Block until the process has exited (it stays a zombie: its pid is not reused).

        False if it is still running after `timeout` seconds.
        """
        return self._exited.wait(timeout)

    def reap(self) -> int:
        """Reap the exited process; its return code (``-signal`` when a signal killed it)."""
        with contextlib.suppress(OSError):  # a dead zygote answers for itself (see _read)
            self._zygote.send({"op": "reap", "pid": self.pid})
        return self._reaped.get()


class Zygote:
    """The emulator's side of a fork server: starts it, asks it for Machines, hears exits.

    `spawn` returns None whenever a Machine should start the ordinary way instead.
    """

    def __init__(self, modules: Iterable[str], *, env: Mapping[str, str], cwd: Path) -> None:
        self.env = dict(env)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._spawned: queue.Queue[ZygoteProcess | None] = queue.Queue()
        self._processes: dict[int, ZygoteProcess] = {}
        self._closed = False
        self._ready = threading.Event()
        self.read_at_import: frozenset[str] = frozenset()
        """Environment variables the preloaded modules read (known once ready)."""
        # The socket carries descriptors (SCM_RIGHTS), which a pipe cannot.
        self._fd_socket, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [sys.executable, str(SERVER), f"--fd-socket={theirs.fileno()}", *modules]
        self.command = " ".join(argv)
        """The zygote's command line, which /proc also shows for every process it forked."""
        try:
            self._popen = subprocess.Popen(
                argv,
                cwd=cwd,
                env=self.env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,  # a terminal's Ctrl-C is for the emulator, not for it
            )
        except BaseException:
            self._fd_socket.close()
            raise
        finally:
            theirs.close()
        assert self._popen.stdin is not None and self._popen.stdout is not None
        self._to: IO[bytes] = self._popen.stdin
        self._from: IO[bytes] = self._popen.stdout
        self._reader = threading.Thread(target=self._read, name="emulator-zygote", daemon=True)
        self._reader.start()

    def spawn(
        self,
        argv: list[str],
        env: Mapping[str, str],
        cwd: Path,
        log: Path | None = None,
        *,
        stdio: tuple[int, int, int] | None = None,
        new_session: bool = True,
    ) -> ZygoteProcess | None:
        """Fork a process running `argv`, or None if it must be started with exec.

        Its stdout and stderr go to `log` (a Machine), or it gets `stdio`, three descriptors
        for its stdin, stdout and stderr (`ForkedPopen`). `new_session` as `setsid()`.
        """
        if not same_interpreter(argv, env, self.env, self.read_at_import):
            return None
        if argv[1] != "-c" and not Path(cwd, argv[1]).is_file():
            return None
        with self._lock:  # one spawn at a time: the answers come back in order
            if self._closed or not self._ready.is_set():
                return None
            try:
                request = {
                    "argv": argv,
                    "env": dict(env),
                    "cwd": str(cwd),
                    "log": None if log is None else str(log),
                    "stdio": stdio is not None,
                    "session": new_session,
                }
                if stdio is not None:
                    # First the descriptors, then the request that says to take them.
                    socket.send_fds(self._fd_socket, [b"s"], list(stdio))
                self.send({"op": "spawn", **request})
                return self._spawned.get(timeout=SPAWN_TIMEOUT)
            except OSError:
                return None
            except queue.Empty:
                # Hung: kill it; its reader then kills any Machine it forked after all.
                self._closed = True
                self._popen.kill()
                return None

    @property
    def closed(self) -> bool:
        """Closed, or gone: `spawn` returns None from now on."""
        return self._closed

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the zygote has done its imports; False if it is not ready (or gone)."""
        return self._ready.wait(timeout) and not self._closed

    def send(self, message: dict[str, Any]) -> None:
        """Write one request (raises OSError once the zygote is gone)."""
        with self._send_lock:
            self._to.write(json.dumps(message).encode() + b"\n")
            self._to.flush()

    def close(self) -> None:
        """Stop the zygote (its Machines are the runner's to kill first)."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._to.close()
        try:
            self._popen.wait(5)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            self._popen.wait()
        self._reader.join(5)
        self._fd_socket.close()

    def _read(self) -> None:
        for line in self._from:
            message = json.loads(line)
            op = message["op"]
            if op == "ready":
                self.read_at_import = frozenset(message.get("environ", ()))
                self._ready.set()
                continue
            if op == "spawned":
                # Registered here, before any "exited" for it can be read.
                pid = message.get("pid")
                spawned = ZygoteProcess(self, pid) if isinstance(pid, int) else None
                if spawned is not None:
                    self._processes[pid] = spawned
                self._spawned.put(spawned)
                continue
            process = self._processes.get(message["pid"])
            if process is None:
                continue
            if op == "exited":
                process._exited.set()
            elif op == "reaped":
                del self._processes[message["pid"]]
                process._reaped.put(message["returncode"])
        # The zygote is gone, and with it the parent that reports its Machines' exits: end
        # them as a host crash would (SIGKILL, the runner then kills what is left of each
        # session), so that no spawn and no Machine waits forever.
        self._closed = True
        self._spawned.put(None)
        for pid, process in list(self._processes.items()):
            # The pid too: a Machine forked just before may not have its own session yet.
            for kill in (os.kill, os.killpg):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    kill(pid, signal.SIGKILL)
            process._exited.set()
            with contextlib.suppress(queue.Full):
                process._reaped.put_nowait(-signal.SIGKILL)
