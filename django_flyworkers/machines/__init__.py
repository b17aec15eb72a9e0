"""Fly.io Machines API client (httpx, no Django).

Usage::

    from django_flyworkers.machines import MachinesClient, MachineState

    with MachinesClient("https://api.machines.dev", token, "my-app") as client:
        machine = client.create({"image": image}, region="ams")
        client.wait(machine.id, MachineState.STARTED, instance_id=machine.instance_id)

    redact(text, token)        # text with every piece of the token removed

Modules: ``client`` (:class:`MachinesClient`), ``models`` (frozen dataclasses), ``errors``
(the error tree, and predicates on Fly's messages), ``retry`` (:class:`RetryPolicy`),
``redaction`` (:class:`Redactor`), ``local`` (the Machine's own ``/.fly/api`` socket);
``_transport`` is the client's private plumbing.
"""

from typing import TYPE_CHECKING, Any

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
from .local import DEFAULT_BASE_URL, local_api_socket
from .models import Lease, Machine, MachineEvent, MachineState, StartResult
from .redaction import Redactor, redact
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
    "Redactor",
    "RetryPolicy",
    "StartResult",
    "TransportError",
    "Unauthorized",
    "WaitTimeout",
    "local_api_socket",
    "redact",
]

if TYPE_CHECKING:
    from .client import MachinesClient


def __getattr__(name: str) -> Any:
    # The client (and httpx under it) loads on first use: a worker Machine that never calls the
    # API boots without it, about 30 ms sooner; the settings only need DEFAULT_BASE_URL.
    if name == "MachinesClient":
        from .client import MachinesClient

        return MachinesClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
