"""Pure state machine of the emulator: machines, events, versions, leases and timers.

Nothing here does I/O or starts threads. Every method is called under the caller's lock, reads
time from an injected clock, and asks for process work by queueing `Launch` and `Signal`
effects that the caller drains with `Fleet.drain()` and executes. Time-driven transitions
(boot delay, stop timeout, visibility of destroyed machines) are timers: the caller sleeps until
`next_deadline()` and then calls `advance()`. Process exits come back via `process_exited()`.
That keeps the whole lifecycle testable with a fake clock and no processes at all.
"""

from __future__ import annotations

import heapq
import itertools
import json
import random
import re
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

JSON = dict[str, Any]

DEFAULT_REGION = "iad"
DEFAULT_MEMORY_MB = 256
DEFAULT_STOP_TIMEOUT = 5.0
"""Seconds between the stop signal and SIGKILL when neither the call nor stop_config says."""
DEFAULT_MAX_RETRIES = 10
RESTART_WINDOW = 300.0
"""on-failure counts restarts inside this sliding window (Fly: 10 restarts in 5 minutes)."""
DEFAULT_LEASE_TTL = 30
LEASE_OWNER = "emulator@tokens.fly.io"
KEPT_EVENTS = 200

WAIT_STATES = ("started", "stopped", "suspended", "destroyed", "failed", "settled")
RESTART_POLICIES = {
    "": "on-failure",
    "on-failure": "on-failure",
    "on-fail": "on-failure",
    "no": "no",
    "always": "always",
}
# States in which a Machine is (about to be) running; destroying one of these needs force.
ACTIVE_STATES = frozenset(
    {"starting", "started", "stopping", "restarting", "replacing", "suspending"}
)
SETTLED_STATES = frozenset({"started", "stopped", "suspended", "failed", "destroyed", "replaced"})


class ApiError(Exception):
    """An error response in Fly's shape: HTTP status, gRPC-style code and message.

    Rendered as ``{"error": "<code>: <message>"}``, or for lease endpoints as
    ``{"status": "error", "message": ..., "code": ...}``.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        lease: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.lease = lease
        self.extra = dict(extra or {})

    def body(self) -> JSON:
        if self.lease:
            return {"status": "error", "message": self.message, "code": self.code}
        text = f"{self.code}: {self.message}" if self.code else self.message
        return {"error": text, **self.extra}


def bad_request(message: str) -> ApiError:
    return ApiError(400, "invalid_argument", message)


def not_found(what: str = "machine") -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


def wrong_state(verb: str, state: str) -> ApiError:
    return ApiError(
        412, "failed_precondition", f"unable to {verb} machine from current state: '{state}'"
    )


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
    """Send a signal to a run's main process, or to its whole process group."""

    run_id: int
    signum: int
    group: bool


Effect = Launch | Signal


# ---------------------------------------------------------------------------------------------
# Data model.


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
    """The process group is SIGSTOPped (suspended); the next boot resumes it."""
    exit_plan: str | None = None
    """What a requested exit leads to: stop, boot, destroy, park_created, park_stopped."""
    restart_count: int = 0
    restart_times: list[float] = field(default_factory=list)
    billed: float = 0.0
    started_since: float | None = None
    starts: int = 0
    exit_codes: list[int] = field(default_factory=list)
    timer_gen: int = 0
    gone: bool = False
    """Destroyed and past the visibility window: 404 from now on (kept for stats)."""

    def billed_seconds(self, now: float) -> float:
        running = now - self.started_since if self.started_since is not None else 0.0
        return self.billed + running

    def live_lease(self, now: float) -> Lease | None:
        if self.lease is not None and self.lease.expires_at <= now:
            self.lease = None
        return self.lease


# ---------------------------------------------------------------------------------------------
# Input parsing shared by create/update/stop/wait.

_DURATION_PART = re.compile(r"(\d*\.?\d+)(ns|us|µs|ms|s|m|h)")
_DURATION = re.compile(r"(?:\d*\.?\d+(?:ns|us|µs|ms|s|m|h))+")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object, what: str) -> float | None:
    """Seconds from a Go duration ("10s", "1m30s"), a numeric string (seconds) or a number.

    Numbers follow fly-go (nanoseconds), except that values below 1e6 are taken as seconds:
    nobody means a sub-millisecond timeout, and `"timeout": 10` then does what it says.
    None, "", 0 and "0s" return None, meaning "use the default" (fly-go sends "0s" when unset).
    """
    if value is None or value == "":
        return None
    seconds: float
    if isinstance(value, bool):
        raise bad_request(f'invalid {what} {value!r}: use a duration such as "10s"')
    if isinstance(value, int | float):
        seconds = value / 1e9 if value >= 1_000_000 else float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            if not _DURATION.fullmatch(text):
                raise bad_request(
                    f'invalid {what} "{value}": use a Go duration such as "10s" or "1m30s"'
                ) from None
            seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(text))
    else:
        raise bad_request(f'invalid {what} {value!r}: use a duration such as "10s"')
    if seconds < 0:
        raise bad_request(f"invalid {what} {value!r}: must not be negative")
    return seconds or None


def parse_signal(value: object) -> int | None:
    """A signal number from a name ("SIGTERM", "term") or a number (fly-go's Kill sends 9)."""
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value)
    elif isinstance(value, str):
        name = value.strip().upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        try:
            return int(signal.Signals[name])
        except KeyError:
            raise bad_request(
                f'invalid signal "{value}": use a name such as "SIGTERM" or a number'
            ) from None
    else:
        raise bad_request(f'invalid signal {value!r}: use a name such as "SIGTERM" or a number')
    try:
        return int(signal.Signals(number))
    except ValueError:
        raise bad_request(f"invalid signal {value!r}: unknown signal number") from None


def _str_list(value: object, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad_request(f'{where} must be a list of strings, e.g. ["python", "-m", "app"]')
    return list(value)


def _command_of(spec: JSON, where: str) -> list[str]:
    exec_ = _str_list(spec.get("exec"), f"{where}.exec")
    if exec_:
        return exec_
    return _str_list(spec.get("entrypoint"), f"{where}.entrypoint") + _str_list(
        spec.get("cmd"), f"{where}.cmd"
    )


def resolve_command(config: JSON) -> list[str]:
    """The argv a Machine runs: init.exec, else init.entrypoint + init.cmd, else processes[0]."""
    init = config.get("init") or {}
    if not isinstance(init, dict):
        raise bad_request("config.init must be an object")
    argv = _command_of(init, "config.init")
    processes = config.get("processes") or []
    if not argv and isinstance(processes, list) and processes and isinstance(processes[0], dict):
        argv = _command_of(processes[0], "config.processes[0]")
    if not argv:
        raise bad_request(
            "config has no command to run: the emulator cannot read the image's ENTRYPOINT/CMD, "
            "so set config.init.exec, config.init.cmd or config.processes[0].cmd "
            '(for example ["python", "-m", "myapp.worker"])'
        )
    return argv


def memory_mb(config: JSON) -> int:
    guest = config.get("guest") or {}
    if isinstance(guest, dict) and isinstance(guest.get("memory_mb"), int):
        return int(guest["memory_mb"])
    size = config.get("size")
    match = (
        re.fullmatch(r"(shared-cpu|performance)-(\d+)x", size) if isinstance(size, str) else None
    )
    if match:
        per_cpu = DEFAULT_MEMORY_MB if match.group(1) == "shared-cpu" else 2048
        return per_cpu * int(match.group(2))
    return DEFAULT_MEMORY_MB


def _string_map(value: object, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"{where} must be an object of strings")
    for key, item in value.items():
        if not isinstance(item, str):
            raise bad_request(f"{where}.{key} must be a string, got {type(item).__name__}")
    return dict(value)


def validate_config(config: object) -> JSON:
    """Check the parts of a config the emulator acts on; return a JSON-clean deep copy."""
    if not isinstance(config, dict):
        raise bad_request("config is required and must be an object")
    image = config.get("image")
    if not isinstance(image, str) or not image.strip():
        raise bad_request(
            "config.image is required (any image reference; the emulator runs "
            "config.init / config.processes locally)"
        )
    _string_map(config.get("env"), "config.env")
    _string_map(config.get("metadata"), "config.metadata")
    restart = config.get("restart") or {}
    if not isinstance(restart, dict) or restart.get("policy", "") not in RESTART_POLICIES:
        raise bad_request('config.restart.policy must be one of "no", "always", "on-failure"')
    retries = restart.get("max_retries")
    if retries is not None and (not isinstance(retries, int) or retries < 0):
        raise bad_request("config.restart.max_retries must be a non-negative integer")
    stop_config = config.get("stop_config") or {}
    if not isinstance(stop_config, dict):
        raise bad_request("config.stop_config must be an object")
    parse_signal(stop_config.get("signal"))
    parse_duration(stop_config.get("timeout"), "config.stop_config.timeout")
    resolve_command(config)
    try:
        copied: JSON = json.loads(json.dumps(config))
    except (TypeError, ValueError) as exc:
        raise bad_request(f"config is not valid JSON: {exc}") from None
    return copied


# ---------------------------------------------------------------------------------------------
# Identifiers.

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ADJECTIVES = ("aged", "bold", "calm", "dark", "eager", "green", "icy", "late", "misty", "quiet")
_NOUNS = ("breeze", "cloud", "dawn", "field", "frost", "lake", "moon", "rain", "river", "wind")


def new_ulid(now: float, rng: random.Random) -> str:
    """A 26-character ULID: 48 bits of milliseconds, 80 random bits, Crockford base32."""
    value = (int(now * 1000) << 80) | rng.getrandbits(80)
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -5, -5))


def rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def go_time(timestamp: float) -> str:
    """Go's default time format, as used in the lease-conflict message."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S +0000 UTC")


def _exit_status(returncode: int) -> tuple[int, int]:
    """(exit_code, signal) from a Popen return code; killed processes report 128 + signal."""
    if returncode < 0:
        return 128 - returncode, -returncode
    return returncode, -1


# ---------------------------------------------------------------------------------------------
# The fleet.


class Fleet:
    """Every Machine of every app, their lifecycle, leases and timers.

    Args:
        clock: returns Unix seconds; inject a fake one to drive timers in tests.
        boot_delay: seconds spent in ``starting`` before a Machine is ``started``.
        destroyed_ttl: seconds a destroyed Machine stays visible to GET before 404.
        signal_group: send stop signals to the whole process group instead of the main
            process only (Fly signals the main process; SIGKILL always hits the group).
        strict_start_stop: 412 on start of a started / stop of a stopped Machine instead of
            the default 200 no-op.
        restart_backoff: (first, max) seconds before a policy restart; doubles each time.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        boot_delay: float = 0.0,
        destroyed_ttl: float = 2.0,
        signal_group: bool = False,
        strict_start_stop: bool = False,
        restart_backoff: tuple[float, float] = (0.1, 1.0),
        rng: random.Random | None = None,
    ) -> None:
        self.clock = clock
        self.boot_delay = boot_delay
        self.destroyed_ttl = destroyed_ttl
        self.signal_group = signal_group
        self.strict_start_stop = strict_start_stop
        self.restart_backoff = restart_backoff
        self._rng = rng or random.Random()
        self._run_ids = itertools.count(1)
        self._ips = itertools.count()
        self._seq = itertools.count()
        self.reset()

    def reset(self) -> None:
        """Forget every Machine, timer and pending effect (processes are the caller's job)."""
        self._machines: dict[str, Machine] = {}
        self._runs: dict[int, str] = {}
        self._timers: list[tuple[float, int, str, str, int]] = []
        self._effects: list[Effect] = []

    # -- plumbing -----------------------------------------------------------------------------

    def drain(self) -> list[Effect]:
        """Hand the queued effects to the caller, oldest first."""
        effects, self._effects = self._effects, []
        return effects

    def next_deadline(self) -> float | None:
        while self._timers and self._stale(self._timers[0]):
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    def advance(self) -> None:
        """Fire every timer that is due."""
        now = self.clock()
        while self._timers and self._timers[0][0] <= now:
            entry = heapq.heappop(self._timers)
            if not self._stale(entry):
                self._fire(self._machines[entry[2]], entry[3])

    def _stale(self, entry: tuple[float, int, str, str, int]) -> bool:
        machine = self._machines.get(entry[2])
        return machine is None or machine.timer_gen != entry[4]

    def _schedule(self, m: Machine, kind: str, delay: float) -> None:
        # One pending timer per Machine: scheduling a new one invalidates the previous one.
        m.timer_gen += 1
        heapq.heappush(
            self._timers, (self.clock() + delay, next(self._seq), m.id, kind, m.timer_gen)
        )

    def _cancel_timer(self, m: Machine) -> None:
        m.timer_gen += 1

    def _set_state(self, m: Machine, state: str) -> None:
        now = self.clock()
        if m.state == "started" and state != "started" and m.started_since is not None:
            m.billed += now - m.started_since
            m.started_since = None
        if state == "started" and m.started_since is None:
            m.started_since = now
        m.state = state
        m.updated_at = now

    def _event(
        self, m: Machine, type_: str, status: str, source: str, request: JSON | None = None
    ) -> None:
        now = self.clock()
        m.events.append(
            Event(new_ulid(now, self._rng), type_, status, source, int(now * 1000), request)
        )
        del m.events[:-KEPT_EVENTS]

    # -- lookups ------------------------------------------------------------------------------

    def machines(self) -> Iterator[Machine]:
        """Every Machine ever created since the last reset, gone ones included."""
        return iter(list(self._machines.values()))

    def get(self, app: str, machine_id: str) -> Machine:
        m = self._machines.get(machine_id)
        if m is None or m.app != app or m.gone:
            raise not_found()
        return m

    def by_id(self, machine_id: str) -> Machine:
        m = self._machines.get(machine_id)
        if m is None:
            raise not_found()
        return m

    def list_machines(self, app: str, *, include_deleted: bool = False) -> list[Machine]:
        found = [m for m in self._machines.values() if m.app == app]
        if not include_deleted:
            found = [m for m in found if m.state != "destroyed"]
        return sorted(found, key=lambda m: (m.created_at, m.id))

    # -- leases -------------------------------------------------------------------------------

    def _check_lease(self, m: Machine, nonce: str | None) -> None:
        lease = m.live_lease(self.clock())
        if lease is not None and nonce != lease.nonce:
            raise ApiError(
                409,
                "aborted",
                f"machine ID {m.id} lease currently held by "
                f"{lease.owner}, expires at {rfc3339(lease.expires_at)}",
            )

    def acquire_lease(
        self, app: str, machine_id: str, *, ttl: int, description: str, nonce: str | None
    ) -> Lease:
        """Take a lease, or refresh it when `nonce` matches the current one."""
        m = self.get(app, machine_id)
        now = self.clock()
        if ttl <= 0:
            raise ApiError(400, "invalid", f"invalid lease ttl {ttl}: must be positive", lease=True)
        lease = m.live_lease(now)
        if lease is not None and nonce != lease.nonce:
            raise ApiError(
                409,
                "invalid",
                f"machine ID {m.id} lease currently held by "
                f"{lease.owner}, expires at {go_time(lease.expires_at)}",
                lease=True,
            )
        if lease is not None:
            lease.expires_at = now + ttl
            if description:
                lease.description = description
            return lease
        m.lease = Lease(
            nonce=f"{self._rng.getrandbits(48):012x}",
            owner=LEASE_OWNER,
            description=description,
            expires_at=now + ttl,
            version=new_ulid(now, self._rng),
        )
        return m.lease

    def get_lease(self, app: str, machine_id: str) -> Lease:
        m = self.get(app, machine_id)
        lease = m.live_lease(self.clock())
        if lease is None:
            raise ApiError(404, "not_found", f"machine ID {m.id} lease not found", lease=True)
        return lease

    def release_lease(self, app: str, machine_id: str, nonce: str | None) -> None:
        m = self.get(app, machine_id)
        lease = m.live_lease(self.clock())
        if lease is None:
            raise ApiError(404, "not_found", f"machine ID {m.id} lease not found", lease=True)
        if not nonce:
            raise ApiError(
                400,
                "invalid",
                "releasing a lease requires the fly-machine-lease-nonce header",
                lease=True,
            )
        if nonce != lease.nonce:
            raise ApiError(
                400, "invalid", f"machine ID {m.id} lease nonce does not match", lease=True
            )
        m.lease = None

    # -- create / update ----------------------------------------------------------------------

    def create(self, app: str, body: JSON) -> tuple[Machine, str | None]:
        """Create a Machine; it boots in the background unless ``skip_launch``.

        Returns the Machine and, when ``lease_ttl`` was given, the new lease nonce.
        """
        config = validate_config(body.get("config"))
        name = body.get("name") or self._new_name(app)
        if not isinstance(name, str):
            raise bad_request("name must be a string")
        if any(m.name == name for m in self.list_machines(app)):
            raise ApiError(
                409,
                "already_exists",
                f"a machine named '{name}' already exists in app '{app}'",
                extra={"status": "name_taken"},
            )
        region = body.get("region") or DEFAULT_REGION
        if not isinstance(region, str):
            raise bad_request("region must be a string")
        now = self.clock()
        n = next(self._ips)
        m = Machine(
            id=self._new_id(),
            app=app,
            name=name,
            region=region,
            private_ip=f"127.0.{1 + n // 254}.{1 + n % 254}",
            config=config,
            instance_id=new_ulid(now, self._rng),
            created_at=now,
            updated_at=now,
            cordoned=bool(body.get("skip_service_registration")),
        )
        m.versions.append((m.instance_id, config))
        self._machines[m.id] = m
        self._event(m, "launch", "created", "user")
        nonce = self._lease_from_body(m, body)
        if not body.get("skip_launch"):
            m.booting = True
            self._schedule(m, "launch", 0.0)
        return m, nonce

    def _lease_from_body(self, m: Machine, body: JSON) -> str | None:
        ttl = body.get("lease_ttl")
        if not ttl:
            return None
        if not isinstance(ttl, int) or isinstance(ttl, bool):
            raise bad_request("lease_ttl must be an integer number of seconds")
        return self.acquire_lease(m.app, m.id, ttl=ttl, description="", nonce=None).nonce

    def update(
        self, app: str, machine_id: str, body: JSON, nonce: str | None
    ) -> tuple[Machine, str | None]:
        """Replace the whole config under a new version; a running Machine reboots into it."""
        m = self.get(app, machine_id)
        self._check_lease(m, nonce)
        config = validate_config(body.get("config"))
        for key in ("name", "region"):
            if body.get(key) and body[key] != getattr(m, key):
                raise bad_request(
                    f"{key} is immutable: machine {m.id} has {key} '{getattr(m, key)}'"
                )
        expected = body.get("current_version")
        if expected and expected != m.instance_id:
            raise ApiError(
                409,
                "aborted",
                f"machine {m.id} is at version {m.instance_id}, not current_version {expected}",
            )
        if m.state == "replacing":
            raise ApiError(409, "aborted", "machine is replacing: concurrent update in progress")
        if m.state in ("stopping", "restarting", "suspending", "destroying", "destroyed"):
            raise wrong_state("update", m.state)
        was_running = m.state in ("started", "starting") or m.booting
        old_signal, old_timeout = self._stop_settings(m.config)
        now = self.clock()
        m.config = config
        m.instance_id = new_ulid(now, self._rng)
        m.versions.append((m.instance_id, config))
        m.restart_count, m.restart_times = 0, []
        m.booting = False
        self._event(m, "update", "replacing", "user")
        skip = bool(body.get("skip_launch"))
        plan = "park_created" if skip else ("boot" if was_running else "park_stopped")
        self._set_state(m, "replacing")
        if m.run_id is None:
            m.exit_plan = plan
            self._schedule(m, "replaced", 0.0)
        elif m.paused:
            self._request_exit(m, plan, signal.SIGKILL, 0.0)
        else:
            self._request_exit(m, plan, old_signal, old_timeout)
        return m, self._lease_from_body(m, body)

    # -- start / stop / suspend / restart / signal ---------------------------------------------

    def start(self, app: str, machine_id: str, nonce: str | None) -> str:
        """Boot a created, stopped or suspended Machine. Returns the previous state."""
        m = self.get(app, machine_id)
        self._check_lease(m, nonce)
        previous = m.state
        if m.state == "started" and not self.strict_start_stop:
            return previous
        if m.state == "stopping":
            raise ApiError(412, "failed_precondition", "machine still active, refusing to start")
        if m.state not in ("created", "stopped", "suspended", "failed") or m.booting:
            raise wrong_state("start", m.state)
        m.restart_count, m.restart_times = 0, []
        self._begin_boot(m)
        return previous

    def stop(
        self,
        app: str,
        machine_id: str,
        *,
        signum: int | None,
        timeout: float | None,
        nonce: str | None,
    ) -> None:
        """Ask a Machine to stop: signal now, SIGKILL the group after the timeout."""
        m = self.get(app, machine_id)
        self._check_lease(m, nonce)
        if m.state in ("stopped", "created", "failed") and not m.booting:
            if self.strict_start_stop:
                raise wrong_state("stop", m.state)
            return
        if m.state == "stopping":
            return
        if m.state in ("replacing", "restarting", "destroying", "destroyed"):
            raise wrong_state("stop", m.state)
        default_signal, default_timeout = self._stop_settings(m.config)
        self._event(m, "stop", "stopping", "user")
        m.booting = False
        if m.run_id is None:
            # Booting, or between policy restarts: nothing runs, so it is stopped at once.
            self._cancel_timer(m)
            self._settle_stopped(m)
        elif m.paused:
            self._set_state(m, "stopping")
            self._request_exit(m, "stop", signal.SIGKILL, 0.0)
        else:
            self._set_state(m, "stopping")
            self._request_exit(m, "stop", signum or default_signal, timeout or default_timeout)

    def suspend(self, app: str, machine_id: str, nonce: str | None) -> None:
        """Freeze the process group (SIGSTOP); the next start resumes it (SIGCONT)."""
        m = self.get(app, machine_id)
        self._check_lease(m, nonce)
        if m.state == "suspended":
            return
        if m.state != "started":
            raise wrong_state("suspend", m.state)
        self._cancel_timer(m)
        if m.run_id is not None:
            self._effects.append(Signal(m.run_id, signal.SIGSTOP, group=True))
            m.paused = True
        self._set_state(m, "suspending")
        self._schedule(m, "suspended", 0.0)

    def restart(
        self,
        app: str,
        machine_id: str,
        *,
        signum: int | None,
        timeout: float | None,
        nonce: str | None,
    ) -> None:
        """Stop the process (as stop does) and boot it again with the same version."""
        m = self.get(app, machine_id)
        self._check_lease(m, nonce)
        if m.state != "started":
            raise wrong_state("restart", m.state)
        default_signal, default_timeout = self._stop_settings(m.config)
        self._event(m, "restart", "restarting", "user")
        self._set_state(m, "restarting")
        if m.run_id is None:
            self._begin_boot(m)
        else:
            self._request_exit(m, "boot", signum or default_signal, timeout or default_timeout)

    def send_signal(self, app: str, machine_id: str, signum: int, nonce: str | None) -> None:
        """Send a signal to the main process of a started Machine."""
        m = self.get(app, machine_id)
        self._check_lease(m, nonce)
        if m.state != "started" or m.run_id is None or m.paused:
            raise wrong_state("signal", m.state)
        self._effects.append(Signal(m.run_id, signum, group=self.signal_group))

    def kill(self, machine_id: str) -> int:
        """SIGKILL a Machine's whole process group, as a crash would (control endpoint)."""
        m = self.by_id(machine_id)
        if m.run_id is None:
            raise ApiError(
                412,
                "failed_precondition",
                f"machine {m.id} has no running process (state '{m.state}')",
            )
        self._effects.append(Signal(m.run_id, signal.SIGKILL, group=True))
        return m.run_id

    def _stop_settings(self, config: JSON) -> tuple[int, float]:
        stop_config = config.get("stop_config") or {}
        signum = parse_signal(stop_config.get("signal")) or signal.SIGINT
        timeout = parse_duration(stop_config.get("timeout"), "stop_config.timeout")
        return signum, timeout or DEFAULT_STOP_TIMEOUT

    def _request_exit(self, m: Machine, plan: str, signum: int, timeout: float) -> None:
        assert m.run_id is not None
        m.exit_plan = plan
        if signum == signal.SIGKILL:
            self._effects.append(Signal(m.run_id, signal.SIGKILL, group=True))
            self._cancel_timer(m)
        else:
            self._effects.append(Signal(m.run_id, signum, group=self.signal_group))
            self._schedule(m, "kill", timeout)

    # -- destroy ------------------------------------------------------------------------------

    def destroy(self, app: str, machine_id: str, *, force: bool, nonce: str | None) -> None:
        """Destroy a Machine; a running one needs ``force`` (``?force=true`` / ``?kill=true``)."""
        m = self.get(app, machine_id)
        if m.state in ("destroying", "destroyed"):
            if m.state == "destroyed":
                raise not_found()
            return
        self._check_lease(m, nonce)
        if m.state in ACTIVE_STATES and not force:
            raise ApiError(
                412,
                "failed_precondition",
                "machine still active, refusing to "
                "destroy (stop it first, or pass ?force=true or ?kill=true)",
            )
        self._begin_destroy(m)

    def _begin_destroy(self, m: Machine) -> None:
        m.booting = False
        self._set_state(m, "destroying")
        if m.run_id is not None:
            self._request_exit(m, "destroy", signal.SIGKILL, 0.0)
        else:
            self._schedule(m, "destroyed", 0.0)

    def _finish_destroy(self, m: Machine) -> None:
        m.lease = None
        self._set_state(m, "destroyed")
        self._event(m, "destroy", "destroyed", "user")
        self._schedule(m, "forget", self.destroyed_ttl)

    # -- cordon / metadata --------------------------------------------------------------------

    def cordon(self, app: str, machine_id: str, on: bool, nonce: str | None) -> None:
        m = self.get(app, machine_id)
        self._check_lease(m, nonce)
        m.cordoned = on
        m.updated_at = self.clock()

    def set_metadata(
        self,
        app: str,
        machine_id: str,
        changes: Mapping[str, str | None],
        *,
        replace: bool,
        nonce: str | None,
        machine_version: str | None = None,
    ) -> None:
        """Write metadata without a new version (empty or None values remove keys)."""
        m = self.get(app, machine_id)
        self._check_lease(m, nonce)
        if machine_version and machine_version != m.instance_id:
            raise ApiError(
                412,
                "failed_precondition",
                f"machine_version {machine_version} is not the current version {m.instance_id}",
            )
        metadata = {} if replace else dict(m.config.get("metadata") or {})
        for key, value in changes.items():
            if value:
                metadata[key] = value
            else:
                metadata.pop(key, None)
        m.config["metadata"] = metadata
        m.updated_at = self.clock()

    # -- wait ---------------------------------------------------------------------------------

    def wait_status(
        self, app: str, machine_id: str, want: frozenset[str], version: str | None
    ) -> tuple[bool, str]:
        """(reached, current) for a wait on `want` states, seen from `version` if given.

        An old version reads as ``replaced``, which satisfies ``stopped`` and ``settled``.
        A destroyed Machine that is not waited on for ``destroyed``/``settled`` is a 404.
        """
        m = self.get(app, machine_id)
        if version and all(v != version for v, _ in m.versions):
            raise bad_request(f"machine {m.id} has no version {version!r}")
        current = m.state
        if version and version != m.instance_id and current not in ("destroying", "destroyed"):
            current = "replaced"
        for state in want:
            if state == current:
                return True, current
            if state == "stopped" and current == "replaced":
                return True, current
            if state == "settled" and (
                current in SETTLED_STATES or (current == "created" and not m.booting)
            ):
                return True, current
        if current == "destroyed":
            raise not_found()
        return False, current

    # -- process and timer callbacks ----------------------------------------------------------

    def process_exited(self, run_id: int, returncode: int) -> None:
        """Record that a run's main process exited and apply its consequences."""
        m = self._machines.get(self._runs.pop(run_id, ""))
        if m is None or m.run_id != run_id:
            return
        now = self.clock()
        m.run_id, m.paused = None, False
        exit_code, signum = _exit_status(returncode)
        m.exit_codes.append(exit_code)
        plan, m.exit_plan = m.exit_plan, None
        self._cancel_timer(m)
        restarting = plan is None and m.state == "started" and self._should_restart(m, exit_code)
        if restarting:
            m.restart_count += 1
            m.restart_times.append(now)
        exit_event = {
            "exit_code": exit_code,
            "exited_at": int(now * 1000),
            "guest_exit_code": exit_code,
            "guest_signal": signum,
            "oom_killed": False,
            "requested_stop": plan is not None,
            "restarting": restarting,
            "signal": signum,
        }
        self._event(
            m,
            "exit",
            "stopped",
            "flyd",
            {"exit_event": exit_event, "restart_count": m.restart_count},
        )
        if restarting:
            first, cap = self.restart_backoff
            self._schedule(m, "restart", min(first * 2 ** (m.restart_count - 1), cap))
        elif plan == "boot":
            self._begin_boot(m)
        elif plan == "destroy":
            self._finish_destroy(m)
        elif plan in ("park_created", "park_stopped"):
            self._set_state(m, "created" if plan == "park_created" else "stopped")
        else:
            self._settle_stopped(m)

    def _should_restart(self, m: Machine, exit_code: int) -> bool:
        restart = m.config.get("restart") or {}
        policy = RESTART_POLICIES[restart.get("policy", "")]
        if policy != "on-failure":
            return policy == "always"
        if exit_code == 0:
            return False
        now = self.clock()
        m.restart_times = [t for t in m.restart_times if now - t < RESTART_WINDOW]
        limit = restart.get("max_retries")
        return len(m.restart_times) < (DEFAULT_MAX_RETRIES if limit is None else limit)

    def _settle_stopped(self, m: Machine) -> None:
        self._set_state(m, "stopped")
        if m.config.get("auto_destroy"):
            self._begin_destroy(m)

    def _begin_boot(self, m: Machine) -> None:
        self._set_state(m, "starting")
        self._schedule(m, "boot", self.boot_delay)

    def _launch(self, m: Machine) -> None:
        run_id = next(self._run_ids)
        self._runs[run_id] = m.id
        m.run_id = run_id
        m.starts += 1
        env = {
            "FLY_APP_NAME": m.app,
            "FLY_MACHINE_ID": m.id,
            "FLY_ALLOC_ID": m.id,
            "FLY_REGION": m.region,
            "FLY_IMAGE_REF": m.config["image"],
            "FLY_MACHINE_VERSION": m.instance_id,
            "FLY_PRIVATE_IP": m.private_ip,
            "FLY_VM_MEMORY_MB": str(memory_mb(m.config)),
        }
        env.update(m.config.get("env") or {})
        processes = m.config.get("processes") or []
        if processes and isinstance(processes[0], dict):
            env.update(_string_map(processes[0].get("env"), "config.processes[0].env"))
        self._effects.append(Launch(m.id, run_id, tuple(resolve_command(m.config)), env))

    def _fire(self, m: Machine, kind: str) -> None:
        if kind == "launch":
            m.booting = False
            self._begin_boot(m)
        elif kind == "boot":
            if m.run_id is not None and m.paused:
                self._effects.append(Signal(m.run_id, signal.SIGCONT, group=True))
                m.paused = False
            elif m.run_id is None:
                self._launch(m)
            self._set_state(m, "started")
            self._event(m, "start", "started", "flyd")
        elif kind == "restart":
            self._launch(m)
            self._event(m, "start", "started", "flyd")
        elif kind == "kill" and m.run_id is not None:
            self._effects.append(Signal(m.run_id, signal.SIGKILL, group=True))
        elif kind == "suspended":
            self._set_state(m, "suspended")
            self._event(m, "suspend", "suspended", "user")
        elif kind == "replaced":
            plan, m.exit_plan = m.exit_plan, None
            if plan == "boot":
                self._begin_boot(m)
            else:
                self._set_state(m, "created" if plan == "park_created" else "stopped")
        elif kind == "destroyed":
            self._finish_destroy(m)
        elif kind == "forget":
            m.gone = True

    # -- identifiers --------------------------------------------------------------------------

    def _new_id(self) -> str:
        while True:
            machine_id = f"{self._rng.getrandbits(56):014x}"
            if machine_id not in self._machines:
                return machine_id

    def _new_name(self, app: str) -> str:
        taken = {m.name for m in self.list_machines(app)}
        while True:
            name = (
                f"{self._rng.choice(_ADJECTIVES)}-{self._rng.choice(_NOUNS)}-"
                f"{self._rng.randrange(1000, 10000)}"
            )
            if name not in taken:
                return name
