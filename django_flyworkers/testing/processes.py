"""Python commands for tests, forked from a preloaded interpreter: ``subprocess`` at less CPU.

A test that runs ``manage.py flyworkers_scale`` or a script as a real process pays about half
a second of CPU for the interpreter to import Django, rq, redis and httpx again. `ForkedPopen`
is `subprocess.Popen` for such commands, except that ``<this interpreter> <script> ...`` is
forked from a *zygote* (the emulator's fork server, `django_flyworkers.emulator.zygote`) that
imported those modules once. The child gets the pipes, environment, working directory and
``argv`` that `subprocess` would have given it, runs the script as ``__main__`` and ends with
the status a new interpreter would have; Django settings and your own modules still load in
the child. Anything else (``python -c``, other programs, ``preexec_fn``, ``pass_fds``, a
different ``PYTHON*`` environment) starts with exec, as `subprocess.Popen` does::

    from django_flyworkers.testing.processes import ForkedPopen, run

    done = run([sys.executable, "manage.py", "check"], capture_output=True, text=True)
    with ForkedPopen([sys.executable, "manage.py", "flyworkers_scale", "--watch", "1"],
                     stdout=subprocess.PIPE, text=True) as watch:
        ...

A forked child is the zygote's child, not the caller's: wait for it through its
`ForkedPopen` (``wait``, ``poll``, ``communicate``), never with ``os.waitpid``. The zygote
starts with the first call (and again after it died) and stops when the process exits. If
it dies, the commands it forked are killed (they end with ``-SIGKILL``). POSIX only.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from django_flyworkers.emulator.zygote import DEFAULT_PRELOAD, Zygote, ZygoteProcess

READY_TIMEOUT = 60.0
"""Seconds the first call waits for the zygote's imports; after that, commands start with exec."""

_lock = threading.Lock()
_zygote: Zygote | None = None
_unwaited: set[ForkedPopen] = set()  # forked, exit status not collected yet


def unwaited() -> list[ForkedPopen]:
    """Commands forked here whose exit status nobody has collected (running, or not waited for).

    A test suite can check after each test that none outlives it (``poll()`` collects one
    that has exited).
    """
    with _lock:
        return list(_unwaited)


def zygote() -> Zygote:
    """This process's zygote, started (and waited for) on first use, and again if it died."""
    global _zygote
    with _lock:
        if _zygote is None or _zygote.closed:
            if _zygote is None:
                atexit.register(_close)
            _zygote = Zygote(DEFAULT_PRELOAD, env=os.environ, cwd=Path.cwd())
            _zygote.wait_ready(READY_TIMEOUT)
        return _zygote


def _close() -> None:
    if _zygote is not None:
        _zygote.close()


class ForkedPopen(subprocess.Popen):  # type: ignore[type-arg]  # str or bytes, as Popen
    """`subprocess.Popen` that forks ``<this interpreter> <script> ...`` from the zygote.

    ``forked`` tells which way the command started.
    """

    _zygote_process: ZygoteProcess | None = None

    @property
    def forked(self) -> bool:
        return self._zygote_process is not None

    def _execute_child(  # type: ignore[override]  # Popen's private hook, same arguments
        self,
        args: Any,
        executable: Any,
        preexec_fn: Any,
        close_fds: bool,
        pass_fds: Sequence[int],
        cwd: Any,
        env: Any,
        startupinfo: Any,
        creationflags: int,
        shell: bool,
        p2cread: int,
        p2cwrite: int,
        c2pread: int,
        c2pwrite: int,
        errread: int,
        errwrite: int,
        *rest: Any,
    ) -> None:
        _restore_signals, gid, gids, uid, umask, start_new_session, process_group = rest
        plain = not (shell or executable or preexec_fn or pass_fds or not close_fds)
        plain = plain and gid is None and gids is None and uid is None and umask < 0
        plain = plain and process_group in (None, -1) and isinstance(args, (list, tuple))
        if plain:
            argv = [os.fsdecode(arg) for arg in args]
            environ = os.environ if env is None else env
            stdio = (
                p2cread if p2cread != -1 else 0,
                c2pwrite if c2pwrite != -1 else 1,
                errwrite if errwrite != -1 else 2,
            )
            self._zygote_process = zygote().spawn(
                argv,
                {os.fsdecode(k): os.fsdecode(v) for k, v in environ.items()},
                # Absolute: the zygote's own working directory is not ours.
                Path(os.path.abspath(os.fsdecode(cwd))) if cwd is not None else Path.cwd(),
                stdio=stdio,
                new_session=start_new_session,
            )
        if self._zygote_process is None:
            super()._execute_child(  # type: ignore[misc]
                args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite,
                *rest,
            )  # fmt: skip
            return
        sys.audit("subprocess.Popen", argv[0], argv, cwd, env)
        self.pid = self._zygote_process.pid
        with _lock:
            _unwaited.add(self)
        self._child_created = True
        # Our copies of the child's ends: the zygote holds its own until it has forked.
        self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)  # type: ignore[attr-defined]

    def _internal_poll(self, _deadstate: Any = None, **kwargs: Any) -> int | None:
        process = self._zygote_process
        if process is None:
            return super()._internal_poll(_deadstate, **kwargs)  # type: ignore[misc, no-any-return]
        if self.returncode is None and self._waitpid_lock.acquire(False):  # type: ignore[attr-defined]
            try:
                if self.returncode is None and process.wait_exited(0):
                    self.returncode = process.reap()
                    _collected(self)
            finally:
                self._waitpid_lock.release()  # type: ignore[attr-defined]
        return self.returncode

    def _try_wait(self, wait_flags: int) -> tuple[int, int]:
        process = self._zygote_process
        if process is None:
            return super()._try_wait(wait_flags)  # type: ignore[misc, no-any-return]
        if not process.wait_exited(0 if wait_flags & os.WNOHANG else None):
            return (0, 0)
        status = _wait_status(process.reap())
        _collected(self)
        return (self.pid, status)


def _collected(process: ForkedPopen) -> None:
    with _lock:
        _unwaited.discard(process)


def _wait_status(returncode: int) -> int:
    """The ``waitpid`` status that `subprocess` turns back into `returncode`."""
    return -returncode if returncode < 0 else (returncode & 0xFF) << 8


def run(
    args: Sequence[str | os.PathLike[str]],
    *,
    input: Any = None,
    capture_output: bool = False,
    timeout: float | None = None,
    check: bool = False,
    **kwargs: Any,
) -> subprocess.CompletedProcess[Any]:
    """`subprocess.run`, with the command started by `ForkedPopen`."""
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    if capture_output:
        kwargs["stdout"] = subprocess.PIPE
        kwargs["stderr"] = subprocess.PIPE
    with ForkedPopen(args, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        except BaseException:
            process.kill()
            raise
        returncode = process.poll()
    assert returncode is not None
    if check and returncode:
        raise subprocess.CalledProcessError(returncode, process.args, stdout, stderr)
    return subprocess.CompletedProcess(process.args, returncode, stdout, stderr)
