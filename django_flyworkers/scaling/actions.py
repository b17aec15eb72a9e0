"""The only way flyworkers acts on a Machine: call the API once, record it, say how it went.

Each function makes exactly one Machines API call (through the client's own retries), times
it, writes one :class:`~django_flyworkers.models.ScaleEvent` and returns an
:class:`ActionResult` that is truthy when the call succeeded. A
:class:`~django_flyworkers.machines.MachinesAPIError` never escapes: it becomes
``ok=False`` with the (token-redacted) error text in ``detail``, and a WARNING log line.

The scaler, the reaper and the admin's actions all go through here, so every action on a
Machine appears once in the ledger, with its reason and, for the admin, the user's name.
Keeping the ledger's Machine rows, presence and signals in step is the caller's business.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from django_flyworkers import ledger
from django_flyworkers.machines import Machine, MachinesAPIError, MachinesClient, StartResult
from django_flyworkers.models import ScaleEvent

logger = logging.getLogger("django_flyworkers.scaler")

T = TypeVar("T")


@dataclass(frozen=True)
class ActionResult:
    """What one action did. Truthy when the API call succeeded."""

    action: str
    """``create``, ``start``, ``stop``, ``suspend``, ``update``, ``destroy``, ``wait``, or
    (recorded by the scaler, not an API call) ``wake`` and ``capped``."""
    queue: str
    machine_id: str = ""
    ok: bool = True
    detail: str = ""
    """The error text (token-redacted) when the call failed, else a note (may be empty)."""
    machine: Machine | None = None
    """The Machine the API returned, when it returned one (create, update)."""
    error: MachinesAPIError | None = field(default=None, repr=False, compare=False)
    """The client's error when the call failed (its class says whether another path may work)."""

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        text = f"{self.action} {self.machine_id}".strip()
        return text if self.ok else f"{text}: {self.detail}"


def _act(
    action: str,
    queue: str,
    machine_id: str,
    call: Callable[[], T],
    *,
    reason: str,
    user: str,
    note: Callable[[T], str] | None = None,
) -> tuple[ActionResult, T | None]:
    started = time.monotonic()
    try:
        value = call()
    except MachinesAPIError as exc:
        elapsed = int((time.monotonic() - started) * 1000)
        detail = str(exc)
        logger.warning(
            "flyworkers: %s %s for queue %s failed: %s", action, machine_id, queue, detail
        )
        ledger.record_event(
            queue,
            action,
            machine_id,
            reason=reason,
            outcome=ScaleEvent.Outcome.ERROR,
            detail=detail,
            duration_ms=elapsed,
            user=user,
        )
        result = ActionResult(action, queue, machine_id, ok=False, detail=detail, error=exc)
        return result, None
    elapsed = int((time.monotonic() - started) * 1000)
    machine = value if isinstance(value, Machine) else None
    machine_id = machine.id if machine is not None else machine_id
    detail = note(value) if note is not None else ""
    ledger.record_event(
        queue, action, machine_id, reason=reason, detail=detail, duration_ms=elapsed, user=user
    )
    return ActionResult(action, queue, machine_id, detail=detail, machine=machine), value


def create(
    client: MachinesClient,
    queue: str,
    config: Mapping[str, Any],
    *,
    reason: str,
    name: str | None = None,
    region: str | None = None,
    skip_launch: bool = False,
    user: str = "",
) -> ActionResult:
    """Create a Machine (booting it unless ``skip_launch``); ``result.machine`` is the new one."""

    def call() -> Machine:
        return client.create(config, name=name, region=region, skip_launch=skip_launch)

    return _act("create", queue, "", call, reason=reason, user=user)[0]


def start(
    client: MachinesClient, queue: str, machine_id: str, *, reason: str, user: str = ""
) -> ActionResult:
    """Start a created, stopped or suspended Machine (a no-op success if already started).

    The ScaleEvent's detail says ``resumed`` when the Machine was suspended (or suspending).
    """
    result, _ = _act(
        "start",
        queue,
        machine_id,
        lambda: client.start(machine_id),
        reason=reason,
        user=user,
        note=_start_note,
    )
    return result


def _start_note(started: StartResult) -> str:
    if started.already_started:
        return "already started"
    return "resumed" if started.previous_state in RESUMED_FROM else ""


RESUMED_FROM = frozenset({"suspended", "suspending"})
"""States a start resumes from (the Machine's frozen processes carry on) rather than boots."""


def stop(
    client: MachinesClient,
    queue: str,
    machine_id: str,
    *,
    reason: str,
    signal: str | None = None,
    timeout: float | None = None,
    user: str = "",
) -> ActionResult:
    """Ask a Machine to stop (``signal``, then SIGKILL after ``timeout`` seconds)."""

    def call() -> None:
        client.stop(machine_id, signal=signal, timeout=timeout)

    return _act("stop", queue, machine_id, call, reason=reason, user=user)[0]


def suspend(
    client: MachinesClient, queue: str, machine_id: str, *, reason: str, user: str = ""
) -> ActionResult:
    """Snapshot and suspend a started Machine."""
    call = lambda: client.suspend(machine_id)  # noqa: E731
    return _act("suspend", queue, machine_id, call, reason=reason, user=user)[0]


def update(
    client: MachinesClient,
    queue: str,
    machine_id: str,
    config: Mapping[str, Any],
    *,
    reason: str,
    user: str = "",
) -> ActionResult:
    """Replace a Machine's config (a stopped Machine stays stopped)."""
    call = lambda: client.update(machine_id, config)  # noqa: E731
    return _act("update", queue, machine_id, call, reason=reason, user=user)[0]


def destroy(
    client: MachinesClient,
    queue: str,
    machine_id: str,
    *,
    reason: str,
    force: bool = False,
    user: str = "",
) -> ActionResult:
    """Destroy a Machine; ``force`` kills it first if it is running."""
    call = lambda: client.destroy(machine_id, force=force)  # noqa: E731
    return _act("destroy", queue, machine_id, call, reason=reason, user=user)[0]


def wait(
    client: MachinesClient,
    queue: str,
    machine_id: str,
    state: str,
    *,
    reason: str,
    timeout: float = 30,
    instance_id: str | None = None,
    user: str = "",
) -> ActionResult:
    """Block until the Machine reaches ``state`` or ``timeout`` seconds pass (then not ok)."""

    def call() -> None:
        client.wait(machine_id, state, instance_id=instance_id, timeout=timeout)

    return _act("wait", queue, machine_id, call, reason=reason, user=user)[0]
