"""The demo's processes: started in their own group, stopped in order, none left behind.

Every process the demo starts inherits ``RUN_MARKER=<a fresh id>`` in its environment, so
leftovers are found by that marker, never by a process name that could match someone else's.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from django_flyworkers.testing import wait_for

HERE = Path(__file__).resolve().parent
RUN_MARKER = "FLYWORKERS_DEMO_RUN"
"""Exported with a fresh id: every process the demo starts inherits it."""


def _die_with_parent() -> None:
    # Linux: if the demo itself is SIGKILLed, its helper processes get SIGTERM instead of
    # living on. Elsewhere the normal cleanup is all there is.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(args: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    """Start a helper (``manage.py ...``) in this directory, its output in ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, *args],
            cwd=HERE,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Its own process group: a terminal's Ctrl-C reaches the demo, which stops the
            # helpers in order (web server and scaler before the emulator and Redis).
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def terminate(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def marked_processes(marker: str) -> list[tuple[int, str]]:
    """Live processes (not zombies) whose environment carries ``RUN_MARKER=marker``."""
    needle = f"{RUN_MARKER}={marker}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if state != "Z":
            found.append((pid, cmdline))
    return found


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


def check_leftovers(marker: str, out: TextIO) -> int:
    """Every process started by this run must be gone (looked up by the run marker)."""
    if not marker or not Path("/proc").is_dir():
        return 0
    try:
        left = wait_for(lambda: not marked_processes(marker), 10, "processes to exit")
    except TimeoutError:
        left = False
    if left:
        out.write("Stopped everything this demo started: no process left behind.\n")
        out.flush()
        return 0
    for pid, cmdline in marked_processes(marker):
        out.write(f"Left behind: pid {pid}: {cmdline}\n")
    return 1
