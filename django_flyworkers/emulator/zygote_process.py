"""The zygote process itself: imports once, then forks a child for each spawn request.

Run as a script by `zygote.Zygote` (``python zygote_process.py --fd-socket=N module ...``);
see `zygote` for the protocol. Standard library only: it must import nothing of this
project, whose modules a forked command loads for itself.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import signal
import socket
import sys
import threading
import traceback
from typing import Any


def _serve(fd_socket: socket.socket, modules: list[str]) -> None:
    # The protocol gets its own descriptors; 0 and 1 point at /dev/null, so a Machine never
    # inherits buffered protocol output on the stdout it writes its log to.
    commands = os.dup(0)
    answers = os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    read_at_import = _import(modules)
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

    answer({"op": "ready", "environ": sorted(read_at_import)})

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
            own = (commands, answers, wake_r, wake_w, fd_socket.fileno())
            child = _fork(request, fd_socket, own)
            if child is None:
                answer({"op": "spawned", "error": "fork failed"})
                continue
            running.add(child)
            answer({"op": "spawned", "pid": child})


def _fork(request: dict[str, Any], fd_socket: socket.socket, own: tuple[int, ...]) -> int | None:
    """Fork the child `request` asks for; its pid once it leads its session (None: no fork).

    `own` are the zygote's descriptors, which the child closes.
    """
    stdio: list[int] = []
    if request.get("stdio"):
        _, stdio, _, _ = socket.recv_fds(fd_socket, 1, 3)
    # The child closes its end once it leads its own session: "spawned" waits for that, so the
    # caller can signal the session (or its process group) from the answer on.
    settled_r, settled_w = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:
            _machine(request, fds=(*own, settled_r), stdio=stdio, settled=settled_w)
        os.close(settled_w)
        settled_w = -1
        _read_to_eof(settled_r)
        return pid
    except OSError:
        return None
    finally:
        for fd in (*stdio, settled_r, settled_w):  # the child's now (or nobody's)
            if fd != -1:
                os.close(fd)


def _read_to_eof(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, 1):
                return
        except InterruptedError:  # pragma: no cover  (PEP 475 retries; a handler may raise)
            continue


def _import(modules: list[str]) -> set[str]:
    """Import `modules` (skipping those that fail); the environment variables they read.

    A module that reads a variable at import (rq's ``RQ_KEY_PREFIX``) keeps the zygote's
    value in every fork: a command whose environment differs there must start with exec.
    """
    read: set[str] = set()
    environ_class = type(os.environ)

    class Recording(environ_class):  # type: ignore[valid-type, misc]
        def __getitem__(self, key: str) -> str:
            read.add(key)
            return str(super().__getitem__(key))

        def __contains__(self, key: object) -> bool:
            read.add(str(key))
            return bool(super().__contains__(key))

    os.environ.__class__ = Recording  # get(), getenv() and `in` all come through these two
    try:
        for name in modules:
            with contextlib.suppress(Exception):
                importlib.import_module(name)
    finally:
        os.environ.__class__ = environ_class
    return read


def _machine(request: dict[str, Any], fds: tuple[int, ...], stdio: list[int], settled: int) -> None:
    """In the forked child: become ``python <script> args`` (in its own session), and exit."""
    code = 1
    try:
        if request.get("session", True):
            os.setsid()  # first: from here on, killing the session kills this Machine
        os.close(settled)  # the zygote may answer "spawned" now
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in fds:
            os.close(fd)
        if stdio:
            for target, fd in enumerate(stdio):
                os.dup2(fd, target)  # dup2 clears close-on-exec: a command they start inherits
            for fd in set(stdio) - {0, 1, 2}:
                os.close(fd)
        else:
            log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.close(log)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        code = _run_main(request["argv"][1:])
    finally:
        os._exit(code)


def _run_main(args: list[str]) -> int:
    """Run ``python <args>`` as ``__main__`` and finish as the interpreter would; the status.

    `args` is ``[script, ...]`` or ``["-c", source, ...]``.
    """
    code = 0
    try:
        if args[0] == "-c":
            sys.argv = ["-c", *args[2:]]
            sys.path.insert(0, "")
            _run_source(args[1])
        else:
            import runpy

            sys.argv = args
            sys.path.insert(0, os.path.dirname(os.path.realpath(args[0])))
            runpy.run_path(args[0], run_name="__main__")
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


def _run_source(source: str) -> None:
    """``python -c source``: the code runs in a fresh ``__main__`` module."""
    import types

    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = main
    exec(compile(source, "<string>", "exec"), main.__dict__)


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
    _fd_option, *_modules = sys.argv[1:]
    _serve(socket.socket(fileno=int(_fd_option.partition("=")[2])), _modules)
