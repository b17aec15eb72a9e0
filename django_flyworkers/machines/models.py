"""Immutable views of Machines API objects.

Every object is built with ``from_api(dict)``, which tolerates missing optional fields and
ignores unknown ones (Fly adds fields often). Nested JSON (``config``, event payloads, the raw
response) is **deep-frozen**: dicts become read-only ``MappingProxyType`` views and lists
become tuples, so a ``Machine`` can be shared between threads without copies. To change a
config, take a mutable copy with :meth:`Machine.config_copy` (the client also accepts the
frozen mapping as-is and converts it back to JSON).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

__all__ = [
    "Lease",
    "Machine",
    "MachineEvent",
    "MachineState",
    "StartResult",
    "freeze",
    "thaw",
]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _empty() -> Mapping[str, Any]:
    return _EMPTY


class MachineState(enum.StrEnum):
    """Known Machine states (Fly docs, "Machine states").

    ``Machine.state`` stays a plain ``str`` so a state Fly adds later does not break
    parsing; compare with these members (``machine.state == MachineState.STARTED``).

    ``suspending`` is transient (on its way to ``suspended``). ``suspended`` is persistent
    and *startable*: a start resumes the frozen process in a few hundred milliseconds. A
    suspended Machine is capacity that is asleep, not a live worker.
    """

    # Persistent
    CREATED = "created"
    STARTED = "started"
    STOPPED = "stopped"
    SUSPENDED = "suspended"
    FAILED = "failed"
    # Transient
    CREATING = "creating"
    STARTING = "starting"
    STOPPING = "stopping"
    RESTARTING = "restarting"
    SUSPENDING = "suspending"
    DESTROYING = "destroying"
    UPDATING = "updating"
    REPLACING = "replacing"
    LAUNCH_FAILED = "launch_failed"
    # Terminal
    DESTROYED = "destroyed"
    REPLACED = "replaced"
    MIGRATED = "migrated"

    @classmethod
    def transient(cls) -> frozenset[str]:
        """States a Machine passes through on its way to another state."""
        return _TRANSIENT

    @classmethod
    def gone(cls) -> frozenset[str]:
        """States of a Machine that no longer exists (or is about to stop existing)."""
        return _GONE

    @classmethod
    def startable(cls) -> frozenset[str]:
        """Persistent states a start takes to ``started``: created, stopped, suspended."""
        return _STARTABLE


_TRANSIENT = frozenset(
    {
        MachineState.CREATING,
        MachineState.STARTING,
        MachineState.STOPPING,
        MachineState.RESTARTING,
        MachineState.SUSPENDING,
        MachineState.DESTROYING,
        MachineState.UPDATING,
        MachineState.REPLACING,
        MachineState.LAUNCH_FAILED,
    }
)
_GONE = frozenset({MachineState.DESTROYING, MachineState.DESTROYED})
_STARTABLE = frozenset({MachineState.CREATED, MachineState.STOPPED, MachineState.SUSPENDED})


@dataclass(frozen=True)
class MachineEvent:
    """One entry of a Machine's event log (``launch``, ``start``, ``exit``, ``update`` ...)."""

    type: str
    status: str
    source: str = ""
    timestamp: datetime | None = None
    """When it happened (Fly sends Unix milliseconds), UTC."""
    id: str | None = None
    request: Mapping[str, Any] = field(default_factory=_empty, repr=False, hash=False)
    """Event payload, deep-frozen; for ``exit`` events it holds ``exit_event``."""

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> MachineEvent:
        request = data.get("request")
        return cls(
            type=_str(data.get("type")),
            status=_str(data.get("status")),
            source=_str(data.get("source")),
            timestamp=_from_millis(data.get("timestamp")),
            id=_opt_str(data.get("id")),
            request=freeze(request) if isinstance(request, Mapping) else _EMPTY,
        )

    @property
    def exit_event(self) -> Mapping[str, Any]:
        """The ``exit_event`` payload of an ``exit`` event, else an empty mapping."""
        # fly-go prefers the MonitorEvent copy when both are present.
        monitor = self.request.get("MonitorEvent")
        if isinstance(monitor, Mapping) and isinstance(monitor.get("exit_event"), Mapping):
            payload: Mapping[str, Any] = monitor["exit_event"]
            return payload
        direct = self.request.get("exit_event")
        return direct if isinstance(direct, Mapping) else _EMPTY

    @property
    def exit_code(self) -> int | None:
        """Exit code of the main process for ``exit`` events, else ``None``."""
        code = self.exit_event.get("exit_code")
        return code if isinstance(code, int) and not isinstance(code, bool) else None

    @property
    def requested_stop(self) -> bool:
        """True when the exit was caused by a stop request through the API."""
        return bool(self.exit_event.get("requested_stop", False))


@dataclass(frozen=True)
class Machine:
    """A Fly Machine as the API last described it.

    ``config``, ``metadata``, ``events`` and ``raw`` are left out of ``repr`` because configs
    carry environment variables that may hold secrets.
    """

    id: str
    name: str
    state: str
    """A :class:`MachineState` value, or a state this library does not know yet."""
    region: str = ""
    instance_id: str = ""
    """Id of the current version; changes on every update."""
    private_ip: str = ""
    image: str = ""
    """``config.image``."""
    config: Mapping[str, Any] = field(default_factory=_empty, repr=False, hash=False)
    """Deep-frozen ``config`` (``incomplete_config`` when the host is unreachable)."""
    metadata: Mapping[str, str] = field(default_factory=_empty, repr=False, hash=False)
    """``config.metadata``."""
    events: tuple[MachineEvent, ...] = field(default=(), repr=False, hash=False)
    """Newest first."""
    created_at: datetime | None = None
    updated_at: datetime | None = None
    nonce: str | None = field(default=None, repr=False)
    """Lease nonce; only set by create with ``lease_ttl``."""
    host_status: str = "ok"
    raw: Mapping[str, Any] = field(default_factory=_empty, repr=False, compare=False, hash=False)
    """The whole response, deep-frozen, for fields not modelled here."""

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> Machine:
        """Build from a Machines API JSON object; ``id`` is the only required field."""
        machine_id = data.get("id")
        if not isinstance(machine_id, str) or not machine_id:
            raise ValueError("Machine object without an 'id'")
        raw: Mapping[str, Any] = freeze(data)
        config = raw.get("config")
        if not isinstance(config, Mapping):
            config = raw.get("incomplete_config")
        frozen_config: Mapping[str, Any] = config if isinstance(config, Mapping) else _EMPTY
        metadata = frozen_config.get("metadata")
        image = frozen_config.get("image")
        events = raw.get("events")
        parsed = [
            MachineEvent.from_api(event)
            for event in (events if isinstance(events, tuple) else ())
            if isinstance(event, Mapping)
        ]
        # Fly lists events newest first; sort defensively (stable, so ties keep API order).
        parsed.sort(key=_event_sort_key, reverse=True)
        return cls(
            id=machine_id,
            name=_str(data.get("name")),
            state=_str(data.get("state")),
            region=_str(data.get("region")),
            instance_id=_str(data.get("instance_id") or data.get("version")),
            private_ip=_str(data.get("private_ip")),
            image=image if isinstance(image, str) else "",
            config=frozen_config,
            metadata=metadata if isinstance(metadata, Mapping) else _EMPTY,
            events=tuple(parsed),
            created_at=_from_rfc3339(data.get("created_at")),
            updated_at=_from_rfc3339(data.get("updated_at")),
            nonce=_opt_str(data.get("nonce")),
            host_status=_str(data.get("host_status")) or "ok",
            raw=raw,
        )

    @property
    def is_running(self) -> bool:
        """True when the Machine is ``started``."""
        return self.state == MachineState.STARTED

    @property
    def is_transient(self) -> bool:
        """True while the Machine is between persistent states (starting, stopping, ...)."""
        return self.state in _TRANSIENT

    @property
    def is_suspended(self) -> bool:
        """True when the Machine is ``suspended``: asleep, resumed by a start."""
        return self.state == MachineState.SUSPENDED

    @property
    def is_startable(self) -> bool:
        """True when a start would boot or resume it (created, stopped, suspended)."""
        return self.state in _STARTABLE

    @property
    def is_gone(self) -> bool:
        """True for ``destroying``/``destroyed`` Machines."""
        return self.state in _GONE

    @property
    def last_exit_event(self) -> MachineEvent | None:
        """The newest ``exit`` event, if any."""
        return next((event for event in self.events if event.type == "exit"), None)

    @property
    def last_exit_code(self) -> int | None:
        """Exit code of the main process's newest exit, or ``None`` if it never exited."""
        event = self.last_exit_event
        return event.exit_code if event is not None else None

    def config_copy(self) -> dict[str, Any]:
        """A mutable deep copy of ``config``, for GET-modify-update."""
        copy = thaw(self.config)
        assert isinstance(copy, dict)
        return copy


@dataclass(frozen=True)
class Lease:
    """A Machine lease; pass ``nonce`` to mutating calls while you hold it."""

    nonce: str
    expires_at: datetime | None = None
    owner: str = ""
    description: str = ""
    version: str = ""

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> Lease:
        """Accepts the ``{"status": "success", "data": {...}}`` envelope or the flat form."""
        inner = data.get("data")
        body: Mapping[str, Any] = inner if isinstance(inner, Mapping) else data
        nonce = body.get("nonce")
        if not isinstance(nonce, str) or not nonce:
            raise ValueError("lease without a 'nonce'")
        expires = body.get("expires_at")
        return cls(
            nonce=nonce,
            expires_at=(
                datetime.fromtimestamp(expires, UTC)
                if isinstance(expires, int | float) and not isinstance(expires, bool)
                else _from_rfc3339(expires)
            ),
            owner=_str(body.get("owner")),
            description=_str(body.get("description")),
            version=_str(body.get("version")),
        )


@dataclass(frozen=True)
class StartResult:
    """Outcome of :meth:`MachinesClient.start`."""

    previous_state: str | None = None
    """State before the start, when Fly reported it."""
    migrated: bool = False
    new_host: str = ""
    already_started: bool = False
    """True when the Machine was already started (or starting); the call was a no-op."""

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> StartResult:
        previous = _opt_str(data.get("previous_state"))
        return cls(
            previous_state=previous,
            migrated=bool(data.get("migrated", False)),
            new_host=_str(data.get("new_host")),
            already_started=previous in (MachineState.STARTED, MachineState.STARTING),
        )


def freeze(value: Any) -> Any:
    """Deep-freeze JSON: dicts -> read-only mappings, lists -> tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({str(key): freeze(item) for key, item in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(item) for item in value)
    return value


def thaw(value: Any) -> Any:
    """Undo :func:`freeze` (also accepts plain JSON): mappings -> dicts, sequences -> lists."""
    if isinstance(value, Mapping):
        return {str(key): thaw(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes | bytearray):
        return [thaw(item) for item in value]
    return value


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _from_millis(value: Any) -> datetime | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value / 1000.0, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    return None


def _from_rfc3339(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _event_sort_key(event: MachineEvent) -> float:
    return event.timestamp.timestamp() if event.timestamp is not None else float("-inf")
