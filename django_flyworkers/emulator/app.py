"""The emulator as a WSGI application: auth, routing, faults and limits, process effects.

`Emulator` owns a `Fleet` (state), a `ProcessRunner` (processes), each Machine's local API
socket and one driver thread that fires the fleet's timers. All state changes happen under
one `threading.Condition` (``lock``); every change notifies it, so long-polling waits wake at
once instead of polling. The routes' handlers are in `machines_api` and `control_api`.
"""

from __future__ import annotations

import atexit
import hmac
import logging
import os
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from . import control_api, machines_api
from .errors import ApiError
from .faults import APP_SCOPED, RATE_LIMITED, FaultPlan, RateLimiter
from .local_api import LOCAL_API_ENV, LocalApi, WSGIApp
from .model import Discard, Launch
from .runner import ProcessRunner, group_members
from .state import Fleet
from .wsgi import TEXT, Request, Response, Route, StartResponse, parse, send
from .zygote import DEFAULT_PRELOAD

logger = logging.getLogger("django_flyworkers.emulator")

ROUTES: list[Route] = [*machines_api.ROUTES, *control_api.ROUTES]


class Emulator:
    """A local Fly Machines API: a WSGI app whose Machines are real local processes.

    Usage::

        emu = Emulator(token="T", workdir=tmp_path)
        client = httpx.Client(transport=httpx.WSGITransport(app=emu), base_url="http://fly")
        ...
        emu.shutdown()  # kills every process it started

    Args:
        token: the API token clients must send (``Bearer T`` or ``FlyV1 T``).
        workdir: working directory of every Machine process.
        rate_limits: enforce Fly's per-action token buckets (429 when exceeded).
        boot_delay: seconds each boot (or resume) spends in ``starting``.
        env: overlay on ``os.environ`` for Machine processes (stands in for app secrets).
        log_dir: where ``<machine id>.log`` files go (default ``workdir/.emulator/logs``).
        destroyed_ttl: seconds a destroyed Machine stays visible before GET returns 404.
        suspend_delay: seconds a suspend spends in ``suspending``.
        signal_group: deliver stop signals to the whole process session, not just the main
            process (Fly signals the main process; SIGKILL always hits the whole session).
        strict_start_stop: answer 412 to start-when-started and stop-when-stopped.
        rate_limit_clock: the rate limiter's clock (a test can freeze or step it).
        rate_limit_speed: multiplies Fly's refill rates (1, the default, is Fly's).
        preload: start ``python <script>`` Machines by forking a zygote that imported these
            modules once (True: `zygote.DEFAULT_PRELOAD`), instead of a new interpreter each.
            A boot then costs a fraction of the CPU; leave it off to measure real boots.
    """

    def __init__(
        self,
        token: str,
        workdir: Path | str = ".",
        rate_limits: bool = True,
        boot_delay: float = 0.0,
        env: Mapping[str, str] | None = None,
        *,
        log_dir: Path | str | None = None,
        destroyed_ttl: float = 2.0,
        suspend_delay: float = 0.0,
        signal_group: bool = False,
        strict_start_stop: bool = False,
        rate_limit_clock: Callable[[], float] = time.monotonic,
        rate_limit_speed: float = 1.0,
        preload: bool | Iterable[str] = False,
    ) -> None:
        if not token:
            raise ValueError("the emulator needs a non-empty API token")
        self.token = token
        self.workdir = Path(workdir).resolve()
        if not self.workdir.is_dir():
            raise ValueError(f"the emulator's workdir {self.workdir} is not a directory")
        self.log_dir = Path(log_dir).resolve() if log_dir else self.workdir / ".emulator" / "logs"
        self.lock = threading.Condition(threading.RLock())
        """Guards all state; notified on every change (long-polling waits wait on it)."""
        self.closed = False
        self.fleet = Fleet(
            boot_delay=boot_delay,
            suspend_delay=suspend_delay,
            destroyed_ttl=destroyed_ttl,
            signal_group=signal_group,
            strict_start_stop=strict_start_stop,
        )
        self.limiter = RateLimiter(
            enabled=rate_limits, clock=rate_limit_clock, speed=rate_limit_speed
        )
        self.faults = FaultPlan()
        self.calls: Counter[str] = Counter()
        self.rate_limited: Counter[str] = Counter()
        self.waiters: Counter[str] = Counter()
        """Long-polling waits now blocked, per Machine id."""
        self.runner = ProcessRunner(
            workdir=self.workdir,
            log_dir=self.log_dir,
            base_env={**os.environ, **(env or {})},
            on_exit=self._on_exit,
            preload=DEFAULT_PRELOAD if preload is True else (preload or ()),
        )
        self.local_api = LocalApi(self._local_app)
        self._driver = threading.Thread(target=self._drive, name="emulator-driver", daemon=True)
        self._driver.start()
        _UNSTOPPED.add(self)

    # -- lifecycle ----------------------------------------------------------------------------

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the driver thread and kill (and reap) every process ever started."""
        with self.lock:
            self.closed = True
            self.lock.notify_all()
        _UNSTOPPED.discard(self)
        if self._driver is not threading.current_thread():
            self._driver.join(timeout)
        self.runner.shutdown(timeout)
        self.local_api.shutdown()

    def __enter__(self) -> Emulator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def all_pids(self) -> list[int]:
        """Process group id (= main pid) of every Machine process ever started."""
        return self.runner.all_pgids()

    def leftover_pids(self) -> list[int]:
        """Live (non-zombie) processes still in any session the emulator started.

        Empty after `shutdown()`; use it rather than ``os.killpg(pgid, 0)``, which also
        succeeds for orphaned zombies when PID 1 does not reap them (as in some containers).
        Suspended (stopped) processes count as live.
        """
        return group_members(self.all_pids())

    def log_path(self, machine_id: str) -> Path:
        return self.runner.log_path(machine_id)

    def reset(self) -> None:
        """Kill every process, forget every Machine, clear faults, latency and counters."""
        with self.lock:
            runs = self.runner.live_runs()
            forgotten = [m.id for m in self.fleet.machines()]
            self.fleet.reset()
            self.faults.clear()
            self.limiter.reset()
            self.calls.clear()
            self.rate_limited.clear()
            self.lock.notify_all()
        # Outside the lock: reaper threads take it to report the exits (which are then ignored).
        self.runner.kill(runs)
        for machine_id in forgotten:  # not close_all(): a Machine created meanwhile keeps its own
            self.local_api.close(machine_id)

    def stats(self) -> dict[str, Any]:
        """See `control_api.stats`."""
        return control_api.stats(self)

    def locked(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` under the lock, then execute the effects it queued and wake waiters."""
        with self.lock:
            try:
                return fn()
            finally:
                self._flush()

    def _drive(self) -> None:
        with self.lock:
            while not self.closed:
                self.fleet.advance()
                self._flush()
                deadline = self.fleet.next_deadline()
                timeout = None if deadline is None else max(0.0, deadline - self.fleet.clock())
                self.lock.wait(timeout)

    def _flush(self) -> None:
        """Execute the fleet's queued effects and wake every waiter (caller holds the lock)."""
        for effect in self.fleet.drain():
            if self.closed:
                break
            if isinstance(effect, Launch):
                socket_path = self.local_api.open(effect.machine_id)
                # The Machine's config env comes last, as documented: it may override this.
                env = {LOCAL_API_ENV: socket_path, **effect.env}
                self.runner.launch(effect.machine_id, effect.run_id, effect.argv, env)
            elif isinstance(effect, Discard):
                self.local_api.close(effect.machine_id)
            else:
                self.runner.signal(effect.run_id, effect.signum, group=effect.group)
        self.lock.notify_all()

    def _on_exit(self, run_id: int, returncode: int) -> None:
        with self.lock:
            if not self.closed:
                self.fleet.process_exited(run_id, returncode)
                self._flush()

    # -- WSGI ---------------------------------------------------------------------------------

    def __call__(
        self, environ: Mapping[str, Any], start_response: StartResponse
    ) -> Iterable[bytes]:
        return self._serve(parse(environ), start_response)

    def _local_app(self, machine_id: str) -> WSGIApp:
        """The WSGI app behind one Machine's local API socket: no token, its own routes."""

        def app(environ: Mapping[str, Any], start_response: StartResponse) -> Iterable[bytes]:
            return self._serve(parse(environ, local_machine=machine_id), start_response)

        return app

    def _serve(self, request: Request, start_response: StartResponse) -> Iterable[bytes]:
        try:
            response = self._dispatch(request)
        except ApiError as exc:
            response = Response(exc.status, exc.body())
        except Exception as exc:  # a bug in the emulator must still answer like an API
            logger.exception("emulator error")
            response = Response(500, {"error": f"internal: emulator error: {exc!r}"})
        return send(response, start_response)

    def _dispatch(self, request: Request) -> Response:
        found: Route | None = None
        allowed = []
        for candidate in ROUTES:
            match = candidate.pattern.fullmatch(request.path)
            if match:
                allowed.append(candidate.method)
                if candidate.method == request.method:
                    found = candidate
                    request.params = {k: v for k, v in match.groupdict().items() if v is not None}
                    break
        if found is None or (request.local_machine and not found.action):
            # Fly's 404 is Go's http.NotFound; a known path with another method is a 405, as
            # Go's routers answer (Fly's exact 405 is not documented).
            if not allowed or request.local_machine:
                return Response(404, "404 page not found", TEXT)
            allow = [("Allow", ", ".join(sorted(set(allowed))))]
            return Response(405, "405 method not allowed", TEXT, allow)
        if request.local_machine:
            self._check_local(found, request)
        elif not self._authorized(request.headers.get("authorization", "")):
            return Response(401, {"error": "unauthorized"})
        if self.closed:
            raise ApiError(503, "unavailable", "the emulator has been shut down")
        if not found.action:
            return found.handler(self, request)
        return self._call(found, request)

    def _authorized(self, header: str) -> bool:
        # "Bearer T", "FlyV1 T" or "Bearer FlyV1 T"; fly-go comma-joins several tokens.
        for part in header.split(","):
            words = part.split()
            if not words or words[0] not in ("Bearer", "FlyV1"):
                continue
            if len(words) == 3 and words[:2] == ["Bearer", "FlyV1"]:
                words = words[1:]
            if len(words) == 2 and hmac.compare_digest(words[1].encode(), self.token.encode()):
                return True
        return False

    def _check_local(self, found: Route, request: Request) -> None:
        """A Machine's local API acts on that Machine only (and reads its app's details)."""
        machine_id = request.local_machine
        with self.lock:
            app = self.fleet.by_id(machine_id).app if machine_id else None
        params = request.params
        if params.get("app") == app and (
            params.get("id") == machine_id or (found.action == "app" and request.method == "GET")
        ):
            return
        raise ApiError(
            403,
            "permission_denied",
            f"the local API of machine {machine_id} acts on that machine only",
        )

    def _call(self, found: Route, request: Request) -> Response:
        action, params = found.action, request.params
        scope = params.get("app", "") if action in APP_SCOPED else params.get("id", "")
        with self.lock:
            self.calls[action] += 1
            delay = self.faults.latency.get(action, 0.0)
        if delay:
            time.sleep(delay)
        with self.lock:
            if not self.limiter.allow(action, scope):
                self.rate_limited[action] += 1
                raise RATE_LIMITED
            error = self.faults.take(action, after=False)
            if error is not None:
                raise error
        response = found.handler(self, request)
        with self.lock:
            error = self.faults.take(action, after=True)
            late = self.faults.latency_after.get(action, 0.0)
        if late:
            time.sleep(late)
        if error is not None:
            raise error
        return response


_UNSTOPPED: weakref.WeakSet[Emulator] = weakref.WeakSet()


@atexit.register
def _shutdown_forgotten() -> None:
    # Machine processes live in their own sessions, so nothing else would stop them when the
    # interpreter exits without Emulator.shutdown() (a test that forgot, an uncaught error).
    for emulator in list(_UNSTOPPED):
        emulator.shutdown(timeout=2.0)


__all__ = ["ROUTES", "Emulator"]
