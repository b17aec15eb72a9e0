"""What the emulator keeps: Machines, their events and leases, apps, and process effects."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import JSON

WAIT_STATES = ("started", "stopped", "suspended", "destroyed", "failed", "settled")
ALL_STATES = frozenset(
    {
        "created",
        "starting",
        "started",
        "stopping",
        "stopped",
        "suspending",
        "suspended",
        "replacing",
        "restarting",
        "destroying",
        "destroyed",
        "failed",
    }
)
ACTIVE_STATES = frozenset(
    {"starting", "started", "stopping", "restarting", "replacing", "suspending"}
)
"""States in which a Machine is (about to be) running; destroying one of these needs force."""
SETTLED_STATES = frozenset({"started", "stopped", "suspended", "failed", "destroyed", "replaced"})


# ---------------------------------------------------------------------------------------------
# Effects: what the caller must do to local processes.


@dataclass(frozen=True)
class Launch:
    """Start the process of a Machine run (the caller adds its own base environment)."""

    machine_id: str
    run_id: int
    argv: tuple[str, ...]
    env: Mapping[str, str]


@dataclass(frozen=True)
class Signal:
    """Send a signal to a run's main process, or to its whole session."""

    run_id: int
    signum: int
    group: bool


@dataclass(frozen=True)
class Discard:
    """A Machine is destroyed: release whatever the caller holds for it."""

    machine_id: str


Effect = Launch | Signal | Discard


# ---------------------------------------------------------------------------------------------
# Data.


@dataclass
class Event:
    id: str
    type: str
    status: str
    source: str
    timestamp: int
    """Unix milliseconds, as Fly reports them."""
    request: JSON | None = None

    def to_json(self) -> JSON:
        data: JSON = {
            "id": self.id,
            "type": self.type,
            "status": self.status,
            "source": self.source,
            "timestamp": self.timestamp,
        }
        if self.request is not None:
            data["request"] = self.request
        return data


@dataclass
class Lease:
    nonce: str
    owner: str
    description: str
    expires_at: float
    version: str

    def to_json(self) -> JSON:
        return {
            "nonce": self.nonce,
            "expires_at": int(self.expires_at),
            "owner": self.owner,
            "description": self.description,
            "version": self.version,
        }


@dataclass
class App:
    """An app that was created or holds Machines (GET answers for any name)."""

    id: str
    name: str
    org_slug: str
    created_at: float
    network: str = "default"


@dataclass
class Machine:
    """One emulated Machine. Public fields mirror the API; the rest is lifecycle bookkeeping."""

    id: str
    app: str
    name: str
    region: str
    private_ip: str
    config: JSON
    instance_id: str
    created_at: float
    updated_at: float
    state: str = "created"
    cordoned: bool = False
    events: list[Event] = field(default_factory=list)
    """Oldest first; rendered newest first."""
    versions: list[tuple[str, JSON]] = field(default_factory=list)
    lease: Lease | None = None

    booting: bool = False
    """Created without skip_launch: boots on its own; start is refused until it has."""
    run_id: int | None = None
    """The local process of the current boot, while it has not been reaped."""
    paused: bool = False
    """The process session is SIGSTOPped (suspending or suspended); a boot resumes it."""
    exit_plan: str | None = None
    """What a requested exit leads to: stop, boot, destroy, park_created, park_stopped."""
    restart_count: int = 0
    restart_times: list[float] = field(default_factory=list)
    billed: float = 0.0
    started_since: float | None = None
    starts: int = 0
    """Cold boots: launches of the Machine's command."""
    suspends: int = 0
    resumes: int = 0
    exit_codes: list[int] = field(default_factory=list)
    timer_gen: int = 0
    gone: bool = False
    """Destroyed and past the visibility window: 404 from now on (kept for stats)."""

    def billed_seconds(self, now: float) -> float:
        """Seconds spent ``started``; suspended time, like stopped time, is not billed."""
        running = now - self.started_since if self.started_since is not None else 0.0
        return self.billed + running

    def live_lease(self, now: float) -> Lease | None:
        if self.lease is not None and self.lease.expires_at <= now:
            self.lease = None
        return self.lease
