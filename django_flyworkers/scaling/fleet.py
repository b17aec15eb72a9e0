"""The app's Machines as this process last listed them.

Fly allows about one list a second per app, and a burst of enqueues on several queues would
otherwise list once per queue and pass. So a list younger than a second is reused: the scaler
asks for ``listing(max_age=1)``, patches in what it did itself (a created Machine, a start, a
destroy), and relies on the booting set in Redis for what other processes did meanwhile.

The last list also tells ``flyworkers_scale --watch`` whether anything of a queue is in
motion; when nothing is and Redis shows no demand, a pass needs no API call at all.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable

from django_flyworkers.machines import Machine, MachinesClient

_lock = threading.Lock()


@dataclasses.dataclass
class _Listing:
    pid: int
    client: MachinesClient
    taken: float
    """``time.monotonic()`` when the list was taken."""
    machines: list[Machine]


_last: _Listing | None = None


def listing(
    client: MachinesClient, *, max_age: float = 0.0, clock: Callable[[], float] = time.monotonic
) -> list[Machine]:
    """Every Machine of the app: this process's last list if younger than ``max_age`` seconds
    (and from the same client), else a fresh one. Raises what the client raises."""
    global _last
    with _lock:
        last = _last
        if (
            last is not None
            and last.pid == os.getpid()
            and last.client is client
            and clock() - last.taken < max_age
        ):
            return list(last.machines)
    machines = client.list()
    with _lock:
        _last = _Listing(os.getpid(), client, clock(), list(machines))
    return machines


def last_listed(client: MachinesClient) -> list[Machine] | None:
    """This process's last list from ``client``, however old, or None if it has none."""
    with _lock:
        last = _last
        if last is None or last.pid != os.getpid() or last.client is not client:
            return None
        return list(last.machines)


def note(machine: Machine, **changes: str) -> None:
    """Put what an action returned (or a state it caused) into the last list."""
    with _lock:
        if _last is None:
            return
        updated = dataclasses.replace(machine, **changes) if changes else machine  # type: ignore[arg-type]
        rest = [m for m in _last.machines if m.id != machine.id]
        _last.machines = [*rest, updated]


def drop(machine_id: str) -> None:
    """A Machine we destroyed leaves the last list."""
    with _lock:
        if _last is not None:
            _last.machines = [m for m in _last.machines if m.id != machine_id]


def forget() -> None:
    """Drop the last list (tests, between cases; a settings change makes a new client anyway)."""
    global _last
    with _lock:
        _last = None
