"""Fly.io Machines API client (httpx, no Django).

Usage::

    from django_flyworkers.machines import MachinesClient, MachineState

    with MachinesClient("https://api.machines.dev", token, "my-app") as client:
        machine = client.create({"image": image}, region="ams")
        client.wait(machine.id, MachineState.STARTED, instance_id=machine.instance_id)

Modules: ``client`` (:class:`MachinesClient`), ``models`` (frozen dataclasses), ``errors``
(the error tree), ``retry`` (:class:`RetryPolicy`).
"""

from .client import DEFAULT_BASE_URL, MachinesClient
from .errors import (
    Conflict,
    LeaseHeld,
    MachineNotFound,
    MachinesAPIError,
    PreconditionFailed,
    RateLimited,
    TransportError,
    Unauthorized,
    WaitTimeout,
)
from .models import Lease, Machine, MachineEvent, MachineState, StartResult
from .retry import RetryPolicy

__all__ = [
    "DEFAULT_BASE_URL",
    "Conflict",
    "Lease",
    "LeaseHeld",
    "Machine",
    "MachineEvent",
    "MachineNotFound",
    "MachineState",
    "MachinesAPIError",
    "MachinesClient",
    "PreconditionFailed",
    "RateLimited",
    "RetryPolicy",
    "StartResult",
    "TransportError",
    "Unauthorized",
    "WaitTimeout",
]
