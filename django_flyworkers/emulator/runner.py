"""Local processes behind emulated Machines: start, signal, kill, reap.

Each run is started in its own session, which holds everything it forks, even an RQ
work-horse that moves to a process group of its own. When the main process exits, whatever is
left in its session is SIGKILLed before the main process is reaped, the way Fly tears down the
whole VM; reaping last keeps the pid (and so the session id) from being reused while we still
signal it.
POSIX only.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .zygote import Zygote

logger = logging.getLogger("django_flyworkers.emulator")

PYTHON_NAMES = frozenset({"python", "python3"})
"""argv[0] values replaced by the emulator's own interpreter, so Machines run in its venv."""


class MachineProcess(Protocol):
    """The main process of a run, started with exec or forked by the zygote."""

    pid: int

    def wait_exited(self) -> object:
        """Block until it exits, without reaping it (its pid stays reserved)."""

    def reap(self) -> int:
        """Reap it after `wait_exited`: the return code, ``-signal`` if a signal killed it."""


class _Exec:
    """A run started the ordinary way: fork and exec of its command (`subprocess.Popen`)."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid

    def wait_exited(self) -> None:
        if hasattr(os, "waitid"):
            with contextlib.suppress(ChildProcessError):
                os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)

    def reap(self) -> int:
        return self.popen.wait()


@dataclass
class _Run:
    run_id: int
    machine_id: str
    process: MachineProcess
    command: str
    reaper: threading.Thread | None = None


def local_argv(argv: Iterable[str]) -> list[str]:
    """The argv to execute locally: ``python``/``python3`` become ``sys.executable``."""
    args = list(argv)
    if args and args[0] in PYTHON_NAMES:
        args[0] = sys.executable
    return args


def group_members(pgids: Iterable[int]) -> list[int]:
    """Pids of live (not zombie) processes whose process group or session is one of `pgids`.

    The session matters: an RQ work-horse calls ``setpgrp()`` and leaves its parent's group,
    but not its session, and a VM that stops takes it down too.

    Zombies are dead: they only wait for a parent to reap them, and orphans whose new parent
    (init) does not reap them stay zombies, which would fool a ``killpg(pgid, 0)`` check.
    """
    wanted = set(pgids)
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: best effort, zombies count as alive
        alive = []
        for pgid in wanted:
            try:
                os.killpg(pgid, 0)
                alive.append(pgid)
            except (ProcessLookupError, PermissionError):
                pass
        return alive
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Format: "pid (comm) state ppid pgrp ..."; comm may contain spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] not in ("Z", "X") and wanted & {int(fields[2]), int(fields[3])}:
            found.append(int(entry.name))
    return found


def kill_session(sid: int, signum: int) -> None:
    """Signal every process of a run: its group and whatever left the group for its own.

    After SIGKILL comes SIGCONT: Linux kills a stopped (suspended) process on SIGKILL alone,
    the SIGCONT makes sure elsewhere. Never before the SIGKILL, or a frozen worker could run
    a little, and take a job, before it dies.
    """
    signals = (signum, signal.SIGCONT) if signum == signal.SIGKILL else (signum,)
    for sig in signals:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(sid, sig)
        for pid in group_members([sid]):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def process_stats(pids: Iterable[int]) -> list[dict[str, Any]]:
    """``GET .../ps`` entries (fly-go's ProcessStat) for these pids, read from /proc.

    Fly does not document the units; here ``cpu`` is CPU time in milliseconds, ``rss`` bytes,
    ``stime`` the start time (Unix seconds) and ``rtime`` seconds since then.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    boot = _boot_time()
    now = time.time()
    stats = []
    for pid in sorted(pids):
        proc = Path(f"/proc/{pid}")
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            directory = os.readlink(proc / "cwd")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        fields = stat[stat.rindex(")") + 2 :].split()
        started = boot + int(fields[19]) / ticks
        stats.append(
            {
                "pid": pid,
                "command": " ".join(part.decode(errors="replace") for part in cmdline),
                "directory": directory,
                "cpu": (int(fields[11]) + int(fields[12])) * 1000 // ticks,
                "rss": int(fields[21]) * page,
                "stime": int(started),
                "rtime": max(0, int(now - started)),
                "listen_sockets": [],
            }
        )
    return stats


def _boot_time() -> float:
    with contextlib.suppress(OSError, ValueError, StopIteration):
        lines = Path("/proc/stat").read_text().splitlines()
        return float(next(line.split()[1] for line in lines if line.startswith("btime ")))
    return 0.0


class ProcessRunner:
    """Starts runs, signals them and reports each exit through `on_exit(run_id, returncode)`.

    `on_exit` is called from a reaper thread (never under the caller's call to `launch`), so the
    caller may take its own lock in it. With `preload` modules, ``python <script>`` runs fork
    from a zygote that imported them once (see `zygote`), instead of starting a new interpreter.
    """

    def __init__(
        self,
        *,
        workdir: Path,
        log_dir: Path,
        base_env: Mapping[str, str],
        on_exit: Callable[[int, int], None],
        preload: Iterable[str] = (),
    ) -> None:
        self.workdir = workdir
        self.log_dir = log_dir
        self.base_env = dict(base_env)
        self.on_exit = on_exit
        self.preload = tuple(preload)
        self._lock = threading.Lock()
        self._live: dict[int, _Run] = {}
        self._threads: list[threading.Thread] = []
        self._pgids: list[int] = []
        self._zygote: Zygote | None = None
        self._zygote_lock = threading.Lock()
        if self.preload:
            self._start_zygote()  # now, so that it has done its imports by the first boot

    def log_path(self, machine_id: str) -> Path:
        return self.log_dir / f"{machine_id}.log"

    def launch(
        self, machine_id: str, run_id: int, argv: Iterable[str], env: Mapping[str, str]
    ) -> None:
        """Start a run. A command that cannot start exits with 127 (not found) or 126."""
        args = local_argv(argv)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_path(machine_id)
        with open(log_path, "ab") as log:
            log.write(_banner(f"run {run_id} starting: {args!r}"))
            log.flush()
            process: MachineProcess | None = self._fork(args, env, log_path)
            if process is None:
                try:
                    process = _Exec(
                        subprocess.Popen(
                            args,
                            cwd=self.workdir,
                            env={**self.base_env, **env},
                            stdin=subprocess.DEVNULL,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        )
                    )
                except OSError as exc:
                    log.write(_banner(f"run {run_id} could not start: {exc}"))
                    code = 127 if exc.errno in (errno.ENOENT, errno.ENOTDIR) else 126
                    logger.warning(
                        "machine=%s run=%s cannot start %r: %s", machine_id, run_id, args, exc
                    )
                    self._spawn(lambda: self.on_exit(run_id, code), f"emulator-noexec-{run_id}")
                    return
        run = _Run(run_id, machine_id, process, " ".join(args))
        with self._lock:
            self._live[run_id] = run
            self._pgids.append(process.pid)
        logger.debug("machine=%s run=%s pid=%s started %r", machine_id, run_id, process.pid, args)
        run.reaper = self._spawn(lambda: self._reap(run), f"emulator-reaper-{process.pid}")

    def _fork(
        self, args: list[str], env: Mapping[str, str], log_path: Path
    ) -> MachineProcess | None:
        """The run forked from the zygote, or None where it must start with exec."""
        with self._zygote_lock:
            zygote = self._zygote
        if zygote is None:
            return None
        return zygote.spawn(args, {**self.base_env, **env}, self.workdir, log_path)

    def zygote_ready(self, timeout: float = 0.0) -> bool:
        """Whether ``python <script>`` runs fork from the zygote now (waiting up to `timeout`).

        Until the zygote has done its imports, runs start with exec: a benchmark or a test
        that must measure or see forked runs waits for this first.
        """
        with self._zygote_lock:
            zygote = self._zygote
        return zygote is not None and zygote.wait_ready(timeout)

    def _start_zygote(self) -> None:
        try:
            self._zygote = Zygote(self.preload, env=self.base_env, cwd=self.workdir)
        except OSError as exc:
            logger.warning("the zygote cannot start (%s); Machines start with exec", exc)
            self.preload = ()

    def signal(self, run_id: int, signum: int, *, group: bool) -> bool:
        """Signal a live run's main process or process group; False if it is gone."""
        with self._lock:
            run = self._live.get(run_id)
            if run is None:
                return False
            # Under the lock the leader is alive or an unreaped zombie: its pid is not reused.
            try:
                if group:
                    os.killpg(run.process.pid, signum)
                    kill_session(run.process.pid, signum)
                else:
                    os.kill(run.process.pid, signum)
            except (ProcessLookupError, PermissionError):
                return False
            return True

    def processes(self, run_id: int) -> list[dict[str, Any]]:
        """`process_stats` of every live process in a run's session.

        A process forked from the zygote shows the zygote's command line in /proc: it is
        reported with the run's command, as a process of that command started with exec.
        """
        with self._lock:
            run = self._live.get(run_id)
            pids = group_members([run.process.pid]) if run else []
            zygote = self._zygote
        stats = process_stats(pids)
        if run is not None and zygote is not None:
            for stat in stats:
                if stat["command"] == zygote.command:
                    stat["command"] = run.command
        return stats

    def pid(self, run_id: int) -> int | None:
        with self._lock:
            run = self._live.get(run_id)
            return run.process.pid if run else None

    def live_runs(self) -> list[int]:
        with self._lock:
            return list(self._live)

    def kill(self, run_ids: Iterable[int], *, timeout: float = 5.0) -> None:
        """SIGKILL the sessions of these runs and wait until every process of them is dead.

        Waiting for the main process is not enough: a work-horse in its own group, frozen or
        not, is another process the kernel ends in its own time, on a busy host a moment later.
        """
        reapers, sessions = [], []
        for run_id in run_ids:
            with self._lock:
                run = self._live.get(run_id)
            if run is not None:
                sessions.append(run.process.pid)
                self.signal(run_id, signal.SIGKILL, group=True)
                if run.reaper is not None:
                    reapers.append(run.reaper)
        deadline = time.monotonic() + timeout
        for reaper in reapers:
            reaper.join(max(0.0, deadline - time.monotonic()))
        while sessions and group_members(sessions) and time.monotonic() < deadline:
            time.sleep(0.005)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Kill every run, join every reaper thread and stop the zygote."""
        self.kill(self.live_runs(), timeout=timeout)
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._zygote_lock:
            zygote, self._zygote = self._zygote, None
            self.preload = ()  # no zygote after shutdown
        if zygote is not None:
            zygote.close()

    def all_pgids(self) -> list[int]:
        """The process group id (= main pid) of every run ever started."""
        with self._lock:
            return list(self._pgids)

    def _spawn(self, target: Callable[[], None], name: str) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()
        return thread

    def _reap(self, run: _Run) -> None:
        pid = run.process.pid
        # Wait for the exit without reaping, so the pid cannot be reused while we signal it.
        run.process.wait_exited()
        with self._lock:
            self._live.pop(run.run_id, None)
            kill_session(pid, signal.SIGKILL)
        returncode = run.process.reap()
        with contextlib.suppress(OSError), open(self.log_path(run.machine_id), "ab") as log:
            log.write(_banner(f"run {run.run_id} exited: returncode {returncode}"))
        logger.debug(
            "machine=%s run=%s pid=%s exited rc=%s", run.machine_id, run.run_id, pid, returncode
        )
        try:
            self.on_exit(run.run_id, returncode)
        except Exception:  # a reaper thread must never die silently
            logger.exception("machine=%s run=%s exit handler failed", run.machine_id, run.run_id)


def _banner(text: str) -> bytes:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return f"--- flyworkers emulator {stamp}: {text}\n".encode()
