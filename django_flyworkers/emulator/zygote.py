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

Nothing is preloaded that reads settings or the environment at import. A command that is
not ``python <existing script>``, or an environment whose ``PYTHON*`` variables differ from
the zygote's, starts the ordinary way. So does everything when the zygote cannot start.

The zygote says ``ready`` once its imports are done. Until then, and whenever an answer takes
longer than `SPAWN_TIMEOUT`, Machines start the ordinary way: the emulator launches them
under its lock, which must never wait on a zygote still importing on a busy machine (a hung
zygote is killed, and its Machines with it).

Protocol (one JSON object per line): the emulator sends ``spawn`` (argv, env, cwd, log) and
gets ``spawned`` (pid or error) back in order; the zygote reports ``exited`` when a Machine's
main process exits, and leaves it unreaped (so its pid, which is also its session id, cannot
be reused while the emulator signals what is left of the session) until the emulator sends
``reap`` and gets ``reaped`` with the return code (negative for a signal, as `subprocess`).

The Machine processes are the zygote's children, not the emulator's; the emulator signals
them by pid, as it does the processes of any session. POSIX only; no Django import here.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import traceback
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


def same_interpreter(
    argv: list[str], env: Mapping[str, str], zygote_env: Mapping[str, str]
) -> bool:
    """Whether a fork of the zygote runs `argv` in `env` as ``exec`` would.

    True for ``<this interpreter> <script file> ...`` when every ``PYTHON*`` variable (they
    change how an interpreter starts: path, hash seed, bytecode, warnings) is as the
    zygote's.
    """
    if len(argv) < 2 or argv[0] != sys.executable or argv[1].startswith("-"):
        return False
    python_vars = {key for key in (*env, *zygote_env) if key.startswith("PYTHON")}
    return all(env.get(key) == zygote_env.get(key) for key in python_vars)


SPAWN_TIMEOUT = 10.0
"""Seconds a ready zygote may take to answer a spawn before it is given up as hung."""


class ZygoteProcess:
    """A Machine's main process forked by the zygote: `pid`, then `wait_exited`, `reap`."""

    def __init__(self, zygote: Zygote, pid: int) -> None:
        self.pid = pid
        self._zygote = zygote
        self._exited = threading.Event()
        self._reaped: queue.Queue[int] = queue.Queue(maxsize=1)

    def wait_exited(self) -> None:
        """Block until the process has exited (it stays a zombie: its pid is not reused)."""
        self._exited.wait()

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
        self._popen = subprocess.Popen(
            [sys.executable, __file__, *modules],
            cwd=cwd,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C is for the emulator, not for it
        )
        assert self._popen.stdin is not None and self._popen.stdout is not None
        self._to: IO[bytes] = self._popen.stdin
        self._from: IO[bytes] = self._popen.stdout
        self._reader = threading.Thread(target=self._read, name="emulator-zygote", daemon=True)
        self._reader.start()

    def spawn(
        self, argv: list[str], env: Mapping[str, str], cwd: Path, log: Path
    ) -> ZygoteProcess | None:
        """Fork a Machine process running `argv`, or None if it must be started with exec."""
        if not same_interpreter(argv, env, self.env) or not Path(cwd, argv[1]).is_file():
            return None
        with self._lock:  # one spawn at a time: the answers come back in order
            if self._closed or not self._ready.is_set():
                return None
            try:
                request = {"argv": argv, "env": dict(env), "cwd": str(cwd), "log": str(log)}
                self.send({"op": "spawn", **request})
                return self._spawned.get(timeout=SPAWN_TIMEOUT)
            except OSError:
                return None
            except queue.Empty:
                # Hung: kill it; its reader then kills any Machine it forked after all.
                self._closed = True
                self._popen.kill()
                return None

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

    def _read(self) -> None:
        for line in self._from:
            message = json.loads(line)
            op = message["op"]
            if op == "ready":
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


# -- the zygote process -----------------------------------------------------------------------


def _serve(modules: list[str]) -> None:
    # The protocol gets its own descriptors; 0 and 1 point at /dev/null, so a Machine never
    # inherits buffered protocol output on the stdout it writes its log to.
    commands = os.dup(0)
    answers = os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    for name in modules:
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    # Objects imported so far live as long as the process: keep the collector off them, so
    # a Machine's collections neither scan them nor copy their pages.
    import gc

    gc.freeze()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    running: set[int] = set()
    pending = b""

    def answer(message: dict[str, Any]) -> None:
        os.write(answers, json.dumps(message).encode() + b"\n")

    answer({"op": "ready"})

    while True:
        readable, _, _ = select.select([commands, wake_r], [], [])
        if wake_r in readable:
            os.read(wake_r, 4096)
        for pid in list(running):
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                running.discard(pid)
                answer({"op": "exited", "pid": pid})
        if commands not in readable:
            continue
        chunk = os.read(commands, 1 << 16)
        if not chunk:
            return  # the emulator is gone
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            request = json.loads(line)
            if request["op"] == "reap":
                _, status = os.waitpid(request["pid"], 0)
                returncode = os.waitstatus_to_exitcode(status)
                answer({"op": "reaped", "pid": request["pid"], "returncode": returncode})
                continue
            try:
                pid = os.fork()
            except OSError as exc:
                answer({"op": "spawned", "error": str(exc)})
                continue
            if pid == 0:
                _machine(request, fds=(commands, answers, wake_r, wake_w))
            running.add(pid)
            answer({"op": "spawned", "pid": pid})


def _machine(request: dict[str, Any], fds: tuple[int, ...]) -> None:
    """In the forked child: become ``python <script> args`` in its own session, and exit."""
    code = 1
    try:
        os.setsid()  # first: from here on, killing the session kills this Machine
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in fds:
            os.close(fd)
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        script = request["argv"][1]
        sys.argv = request["argv"][1:]
        sys.path.insert(0, os.path.dirname(os.path.realpath(script)))
        code = _run_main(script)
    finally:
        os._exit(code)


def _run_main(script: str) -> int:
    """Run `script` as ``__main__`` and finish as the interpreter would; the exit status."""
    import runpy

    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = _exit_status(exc.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        _finish()
        # As CPython does: die of the SIGINT, so the parent sees the signal.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    _finish()
    return code


def _exit_status(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


def _finish() -> None:
    """What interpreter shutdown does before the process ends: threads, atexit, flush."""
    import atexit

    with contextlib.suppress(BaseException):
        threading._shutdown()  # type: ignore[attr-defined]  # joins non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


if __name__ == "__main__":
    # Run as a script: sys.path[0] is this directory, which a Machine must not see.
    sys.path.pop(0)
    _serve(sys.argv[1:])
