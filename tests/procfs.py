"""What /proc says about a process, for tests that watch Machine processes (Linux only)."""

from __future__ import annotations

from pathlib import Path


def proc_state(pid: int) -> str:
    """The state letter: R running, S sleeping, T stopped (frozen), Z zombie; "" once gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2]
