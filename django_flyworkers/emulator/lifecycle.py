"""The machinery under the fleet: timers, effects, billing, boots, exits and restarts.

`Lifecycle` does no I/O and starts no threads. Every method is called under the caller's lock
and reads time from an injected clock. Process work is asked for by queueing effects
(`Launch`, `Signal`, `Discard`) that the caller drains with `drain()` and executes.
Time-driven transitions (boot delay, stop timeout, suspend, visibility of destroyed Machines)
are timers: the caller sleeps until `next_deadline()` and then calls `advance()`. Process
exits come back through `process_exited()`. The API operations live in `state.Fleet`.
"""

from __future__ import annotations

import heapq
import itertools
import random
import signal
import time
from collections.abc import Callable, Iterator

from .config import RESTART_POLICIES, machine_env, memory_mb, resolve_command, stop_settings
from .errors import JSON, not_found
from .ids import machine_name, new_ulid
from .model import App, Discard, Effect, Event, Launch, Machine, Signal

DEFAULT_STOP_TIMEOUT = 5.0
"""Seconds between the stop signal and SIGKILL when neither the call nor stop_config says."""
DEFAULT_MAX_RETRIES = 10
RESTART_WINDOW = 300.0
"""on-failure counts restarts inside this sliding window (Fly: 10 restarts in 5 minutes)."""
KEPT_EVENTS = 200

Timer = tuple[float, int, str, str, int]
"""(due, sequence, machine id, kind, generation)."""


class Lifecycle:
    """Every Machine's state, timers and process runs; the base of `state.Fleet`.

    Args:
        clock: returns Unix seconds; inject a fake one to drive timers in tests.
        boot_delay: seconds spent in ``starting`` before a Machine is ``started``.
        suspend_delay: seconds spent in ``suspending`` before a Machine is ``suspended``.
        destroyed_ttl: seconds a destroyed Machine stays visible to GET before 404.
        signal_group: send stop signals to the whole process session instead of the main
            process only (Fly signals the main process; SIGKILL always hits the session).
        strict_start_stop: 412 on start of a started / stop of a stopped Machine instead of
            the default 200 no-op.
        restart_backoff: (first, max) seconds before a policy restart; doubles each time.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        boot_delay: float = 0.0,
        suspend_delay: float = 0.0,
        destroyed_ttl: float = 2.0,
        signal_group: bool = False,
        strict_start_stop: bool = False,
        restart_backoff: tuple[float, float] = (0.1, 1.0),
        rng: random.Random | None = None,
    ) -> None:
        self.clock = clock
        self.boot_delay = boot_delay
        self.suspend_delay = suspend_delay
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
        """Forget every Machine, app, timer and pending effect (processes are the caller's)."""
        self._machines: dict[str, Machine] = {}
        self._apps: dict[str, App] = {}
        self._runs: dict[int, str] = {}
        self._timers: list[Timer] = []
        self._effects: list[Effect] = []

    # -- effects and timers -------------------------------------------------------------------

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

    def _stale(self, entry: Timer) -> bool:
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
        request = {"exit_event": exit_event, "restart_count": m.restart_count}
        self._event(m, "exit", "stopped", "flyd", request)
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

    def _fire(self, m: Machine, kind: str) -> None:
        if kind == "launch":
            m.booting = False
            self._begin_boot(m)
        elif kind == "boot":
            self._boot(m)
        elif kind == "restart":
            self._launch(m)
            self._event(m, "start", "started", "flyd")
        elif kind == "kill" and m.run_id is not None:
            self._effects.append(Signal(m.run_id, signal.SIGKILL, group=True))
        elif kind == "suspended":
            self._set_state(m, "suspended")
            self._event(m, "suspend", "suspended", "flyd")
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

    # -- boot, stop, destroy ------------------------------------------------------------------

    def _begin_boot(self, m: Machine) -> None:
        self._set_state(m, "starting")
        self._schedule(m, "boot", self.boot_delay)

    def _boot(self, m: Machine) -> None:
        """End of ``starting``: resume a frozen session, or launch the command."""
        if m.run_id is not None and m.paused:
            # A resume: the same processes carry on where they were frozen.
            self._effects.append(Signal(m.run_id, signal.SIGCONT, group=True))
            m.paused = False
            m.resumes += 1
        elif m.run_id is None:
            self._launch(m)
        self._set_state(m, "started")
        self._event(m, "start", "started", "flyd")

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
        env.update(machine_env(m.config))
        self._effects.append(Launch(m.id, run_id, tuple(resolve_command(m.config)), env))

    def _stop_settings(self, config: JSON) -> tuple[int, float]:
        signum, timeout = stop_settings(config)
        return signum, timeout or DEFAULT_STOP_TIMEOUT

    def _request_exit(self, m: Machine, plan: str, signum: int, timeout: float) -> None:
        assert m.run_id is not None
        m.exit_plan = plan
        if signum == signal.SIGKILL or m.paused:
            # A frozen session cannot handle a stop signal (Fly discards a snapshot): kill it.
            self._effects.append(Signal(m.run_id, signal.SIGKILL, group=True))
            self._cancel_timer(m)
        else:
            self._effects.append(Signal(m.run_id, signum, group=self.signal_group))
            self._schedule(m, "kill", timeout)

    def _settle_stopped(self, m: Machine) -> None:
        self._set_state(m, "stopped")
        if m.config.get("auto_destroy"):
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
        self._effects.append(Discard(m.id))
        self._schedule(m, "forget", self.destroyed_ttl)

    # -- identifiers --------------------------------------------------------------------------

    def _new_id(self) -> str:
        while True:
            machine_id = f"{self._rng.getrandbits(56):014x}"
            if machine_id not in self._machines:
                return machine_id

    def _new_name(self, app: str) -> str:
        taken = {m.name for m in self.list_machines(app)}
        while True:
            name = machine_name(self._rng)
            if name not in taken:
                return name

    def _new_ip(self) -> str:
        n = next(self._ips)
        return f"127.0.{1 + n // 254}.{1 + n % 254}"


def _exit_status(returncode: int) -> tuple[int, int]:
    """(exit_code, signal) from a Popen return code; killed processes report 128 + signal."""
    if returncode < 0:
        return 128 - returncode, -returncode
    return returncode, -1
