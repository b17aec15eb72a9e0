"""The emulator as a WSGI application: auth, routing, Fly's JSON shapes, control endpoints.

`Emulator` owns a `Fleet` (state), a `ProcessRunner` (processes) and one driver thread that
fires the fleet's timers. All state changes happen under one `threading.Condition`; every
change notifies it, so long-polling waits wake at once instead of polling.
"""

from __future__ import annotations

import atexit
import hmac
import json
import logging
import os
import re
import threading
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from hashlib import sha256
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from .faults import ACTIONS, APP_SCOPED, RATE_LIMITED, FaultPlan, RateLimiter
from .runner import ProcessRunner, group_members
from .state import (
    JSON,
    WAIT_STATES,
    ApiError,
    Fleet,
    Launch,
    Machine,
    bad_request,
    parse_duration,
    parse_signal,
    rfc3339,
)

logger = logging.getLogger("django_flyworkers.emulator")

EMBEDDED_EVENTS = 20
MAX_EVENTS = 50
WAIT_RANGE_ERROR = "invalid WaitMachineRequest.Timeout: value must be inside range [1s, 1m0s]"

StartResponse = Callable[..., Any]


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    raw_body: bytes
    params: dict[str, str] = field(default_factory=dict)

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def flag(self, name: str) -> bool:
        value = self.arg(name)
        return value is not None and value.lower() in ("", "1", "true", "yes", "t")

    @property
    def nonce(self) -> str | None:
        return self.headers.get("fly-machine-lease-nonce") or None

    def json(self) -> JSON:
        if not self.raw_body.strip():
            return {}
        try:
            body = json.loads(self.raw_body)
        except ValueError as exc:
            raise bad_request(f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise bad_request("request body must be a JSON object")
        return body


@dataclass
class Response:
    status: int
    body: Any = None
    content_type: str = "application/json"


Handler = Callable[[Request], Response]

# (method, path pattern, action for faults/limits/stats, handler name)
_M = r"/v1/apps/(?P<app>[^/]+)/machines/(?P<id>[^/]+)"
ROUTES: list[tuple[str, re.Pattern[str], str, str]] = [
    (method, re.compile(pattern + "/?"), action, handler)
    for method, pattern, action, handler in [
        ("POST", r"/v1/apps", "app", "create_app"),
        ("GET", r"/v1/apps/(?P<app>[^/]+)", "app", "get_app"),
        ("GET", r"/v1/apps/(?P<app>[^/]+)/machines", "list", "list_machines"),
        ("POST", r"/v1/apps/(?P<app>[^/]+)/machines", "create", "create"),
        ("GET", _M, "get", "get"),
        ("POST", _M, "update", "update"),
        ("DELETE", _M, "destroy", "destroy"),
        ("POST", _M + "/start", "start", "start"),
        ("POST", _M + "/stop", "stop", "stop"),
        ("POST", _M + "/suspend", "suspend", "suspend"),
        ("POST", _M + "/restart", "restart", "restart"),
        ("POST", _M + "/signal", "signal", "signal"),
        ("GET", _M + "/wait", "wait", "wait"),
        ("POST", _M + "/lease", "lease", "acquire_lease"),
        ("GET", _M + "/lease", "lease", "get_lease"),
        ("DELETE", _M + "/lease", "lease", "release_lease"),
        ("POST", _M + "/(?P<cordon>cordon|uncordon)", "cordon", "cordon"),
        ("GET", _M + "/events", "events", "events"),
        ("GET", _M + "/versions", "versions", "versions"),
        ("GET", _M + "/metadata", "metadata", "get_metadata"),
        ("PUT", _M + "/metadata", "metadata", "put_metadata"),
        ("PATCH", _M + "/metadata", "metadata", "put_metadata"),
        ("GET", _M + "/metadata/(?P<key>[^/]+)", "metadata", "get_metadata_key"),
        ("POST", _M + "/metadata/(?P<key>[^/]+)", "metadata", "set_metadata_key"),
        ("DELETE", _M + "/metadata/(?P<key>[^/]+)", "metadata", "set_metadata_key"),
        ("POST", r"/_emulator/reset", "", "ctl_reset"),
        ("GET", r"/_emulator/stats", "", "ctl_stats"),
        ("GET", r"/_emulator/faults", "", "ctl_get_faults"),
        ("POST", r"/_emulator/faults", "", "ctl_add_fault"),
        ("DELETE", r"/_emulator/faults", "", "ctl_clear_faults"),
        ("POST", r"/_emulator/latency", "", "ctl_latency"),
        ("POST", r"/_emulator/rate_limits", "", "ctl_rate_limits"),
        ("POST", r"/_emulator/machines/(?P<id>[^/]+)/kill", "", "ctl_kill"),
    ]
]


class Emulator:
    """A local Fly Machines API: a WSGI app whose Machines are real local processes.

    Usage::

        emu = Emulator(token="T", workdir=tmp_path)
        client = httpx.Client(transport=httpx.WSGITransport(app=emu), base_url="http://fly")
        ...
        emu.shutdown()  # kills every process group it started

    Args:
        token: the API token clients must send (``Bearer T`` or ``FlyV1 T``).
        workdir: working directory of every Machine process.
        rate_limits: enforce Fly's per-action token buckets (429 when exceeded).
        boot_delay: seconds each boot spends in ``starting``.
        env: overlay on ``os.environ`` for Machine processes (stands in for app secrets).
        log_dir: where ``<machine id>.log`` files go (default ``workdir/.emulator/logs``).
        destroyed_ttl: seconds a destroyed Machine stays visible before GET returns 404.
        signal_group: deliver stop signals to the whole process group, not just the main
            process (Fly signals the main process; SIGKILL always hits the whole group).
        strict_start_stop: answer 412 to start-when-started and stop-when-stopped.
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
        signal_group: bool = False,
        strict_start_stop: bool = False,
    ) -> None:
        if not token:
            raise ValueError("the emulator needs a non-empty API token")
        self.token = token
        self.workdir = Path(workdir).resolve()
        if not self.workdir.is_dir():
            raise ValueError(f"the emulator's workdir {self.workdir} is not a directory")
        self.log_dir = Path(log_dir).resolve() if log_dir else self.workdir / ".emulator" / "logs"
        self._cond = threading.Condition(threading.RLock())
        self._closed = False
        self.fleet = Fleet(
            boot_delay=boot_delay,
            destroyed_ttl=destroyed_ttl,
            signal_group=signal_group,
            strict_start_stop=strict_start_stop,
        )
        self.limiter = RateLimiter(enabled=rate_limits)
        self.faults = FaultPlan()
        self.calls: Counter[str] = Counter()
        self.rate_limited: Counter[str] = Counter()
        self.runner = ProcessRunner(
            workdir=self.workdir,
            log_dir=self.log_dir,
            base_env={**os.environ, **(env or {})},
            on_exit=self._on_exit,
        )
        self._handlers: dict[str, Handler] = {
            name: getattr(self, f"_h_{name}") for *_, name in ROUTES
        }
        self._driver = threading.Thread(target=self._drive, name="emulator-driver", daemon=True)
        self._driver.start()
        _UNSTOPPED.add(self)

    # -- lifecycle ----------------------------------------------------------------------------

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the driver thread and kill (and reap) every process group ever started."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        _UNSTOPPED.discard(self)
        if self._driver is not threading.current_thread():
            self._driver.join(timeout)
        self.runner.shutdown(timeout)

    def __enter__(self) -> Emulator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def all_pids(self) -> list[int]:
        """Process group id (= main pid) of every Machine process ever started."""
        return self.runner.all_pgids()

    def leftover_pids(self) -> list[int]:
        """Live (non-zombie) processes still in any group the emulator started.

        Empty after `shutdown()`; use it rather than ``os.killpg(pgid, 0)``, which also
        succeeds for orphaned zombies when PID 1 does not reap them (as in some containers).
        """
        return group_members(self.all_pids())

    def log_path(self, machine_id: str) -> Path:
        return self.runner.log_path(machine_id)

    def _drive(self) -> None:
        with self._cond:
            while not self._closed:
                self.fleet.advance()
                self._flush()
                deadline = self.fleet.next_deadline()
                timeout = None if deadline is None else max(0.0, deadline - self.fleet.clock())
                self._cond.wait(timeout)

    def _flush(self) -> None:
        """Execute the fleet's queued effects and wake every waiter (caller holds the lock)."""
        for effect in self.fleet.drain():
            if self._closed:
                break
            if isinstance(effect, Launch):
                self.runner.launch(effect.machine_id, effect.run_id, effect.argv, effect.env)
            else:
                self.runner.signal(effect.run_id, effect.signum, group=effect.group)
        self._cond.notify_all()

    def _on_exit(self, run_id: int, returncode: int) -> None:
        with self._cond:
            if not self._closed:
                self.fleet.process_exited(run_id, returncode)
                self._flush()

    # -- WSGI ---------------------------------------------------------------------------------

    def __call__(
        self, environ: Mapping[str, Any], start_response: StartResponse
    ) -> Iterable[bytes]:
        try:
            response = self._dispatch(_request(environ))
        except ApiError as exc:
            response = Response(exc.status, exc.body())
        except Exception as exc:  # a bug in the emulator must still answer like an API
            logger.exception("emulator error")
            response = Response(500, {"error": f"internal: emulator error: {exc!r}"})
        if response.content_type == "application/json":
            payload = b"" if response.body is None else json.dumps(response.body).encode()
        else:
            payload = str(response.body).encode()
        reason = HTTPStatus(response.status).phrase
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(payload))),
            ("fly-request-id", uuid.uuid4().hex),
        ]
        start_response(f"{response.status} {reason}", headers)
        return [payload]

    def _dispatch(self, request: Request) -> Response:
        route = None
        allowed = False
        for method, pattern, action, name in ROUTES:
            match = pattern.fullmatch(request.path)
            if match:
                allowed = True
                if method == request.method:
                    route = (action, name, match.groupdict())
                    break
        if route is None:
            if allowed:
                return Response(405, "405 method not allowed", "text/plain; charset=utf-8")
            return Response(404, "404 page not found", "text/plain; charset=utf-8")
        if not self._authorized(request.headers.get("authorization", "")):
            return Response(401, {"error": "unauthorized"})
        if self._closed:
            raise ApiError(503, "unavailable", "the emulator has been shut down")
        action, name, params = route
        request.params = {k: v for k, v in params.items() if v is not None}
        if not action:
            return self._handlers[name](request)
        return self._call(action, self._handlers[name], request)

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

    def _call(self, action: str, handler: Handler, request: Request) -> Response:
        params = request.params
        scope = params.get("app", "") if action in APP_SCOPED else params.get("id", "")
        with self._cond:
            self.calls[action] += 1
            delay = self.faults.latency.get(action, 0.0)
        if delay:
            time.sleep(delay)
        with self._cond:
            if not self.limiter.allow(action, scope):
                self.rate_limited[action] += 1
                raise RATE_LIMITED
            error = self.faults.take(action, after=False)
            if error is not None:
                raise error
        response = handler(request)
        with self._cond:
            error = self.faults.take(action, after=True)
        if error is not None:
            raise error
        return response

    def _locked(self, fn: Callable[[], Any]) -> Any:
        with self._cond:
            try:
                return fn()
            finally:
                self._flush()

    # -- Machines API -------------------------------------------------------------------------

    def _h_create_app(self, req: Request) -> Response:
        name = req.json().get("app_name")
        if not isinstance(name, str) or not name:
            raise bad_request("app_name is required")
        return Response(201, {"id": name, "created_at": int(time.time() * 1000)})

    def _h_get_app(self, req: Request) -> Response:
        app = req.params["app"]
        return Response(
            200,
            {
                "id": app,
                "name": app,
                "status": "deployed",
                "organization": {"name": "Emulator", "slug": "personal"},
            },
        )

    def _h_list_machines(self, req: Request) -> Response:
        states = {s for v in req.query.get("state", []) for s in v.split(",") if s}
        # fly-go's List(ctx, app, state) appends "?<state>" verbatim.
        states |= {k for k, v in req.query.items() if v == [""] and k in _ALL_STATES}
        metadata = {k[9:]: v[-1] for k, v in req.query.items() if k.startswith("metadata.")}
        region = req.arg("region")
        with self._cond:
            machines = [
                m
                for m in self.fleet.list_machines(
                    req.params["app"], include_deleted=req.flag("include_deleted")
                )
                if (not states or m.state in states)
                and (not region or m.region == region)
                and all((m.config.get("metadata") or {}).get(k) == v for k, v in metadata.items())
            ]
            now = self.fleet.clock()
            body = [
                render_machine(
                    m, now, summary=req.flag("summary"), include_lease=req.flag("include_leases")
                )
                for m in machines
            ]
        return Response(200, body)

    def _h_create(self, req: Request) -> Response:
        body = req.json()

        def create() -> JSON:
            machine, nonce = self.fleet.create(req.params["app"], body)
            return render_machine(machine, self.fleet.clock(), nonce=nonce)

        return Response(200, self._locked(create))

    def _h_get(self, req: Request) -> Response:
        with self._cond:
            machine = self.fleet.get(req.params["app"], req.params["id"])
            body = render_machine(
                machine, self.fleet.clock(), include_lease=req.flag("include_leases")
            )
        return Response(200, body)

    def _h_update(self, req: Request) -> Response:
        body = req.json()

        def update() -> JSON:
            machine, nonce = self.fleet.update(req.params["app"], req.params["id"], body, req.nonce)
            return render_machine(machine, self.fleet.clock(), nonce=nonce)

        return Response(200, self._locked(update))

    def _h_destroy(self, req: Request) -> Response:
        force = req.flag("force") or req.flag("kill")
        self._locked(
            lambda: self.fleet.destroy(
                req.params["app"], req.params["id"], force=force, nonce=req.nonce
            )
        )
        return Response(200, {"ok": True})

    def _h_start(self, req: Request) -> Response:
        previous = self._locked(
            lambda: self.fleet.start(req.params["app"], req.params["id"], req.nonce)
        )
        return Response(200, {"previous_state": previous, "migrated": False, "new_host": ""})

    def _h_stop(self, req: Request) -> Response:
        body = req.json()
        signum = parse_signal(body.get("signal"))
        timeout = parse_duration(body.get("timeout"), "timeout")
        self._locked(
            lambda: self.fleet.stop(
                req.params["app"], req.params["id"], signum=signum, timeout=timeout, nonce=req.nonce
            )
        )
        return Response(200, {"ok": True})

    def _h_suspend(self, req: Request) -> Response:
        self._locked(lambda: self.fleet.suspend(req.params["app"], req.params["id"], req.nonce))
        return Response(200, {"ok": True})

    def _h_restart(self, req: Request) -> Response:
        signum = parse_signal(req.arg("signal"))
        timeout = parse_duration(req.arg("timeout"), "timeout")
        self._locked(
            lambda: self.fleet.restart(
                req.params["app"], req.params["id"], signum=signum, timeout=timeout, nonce=req.nonce
            )
        )
        return Response(200, {"ok": True})

    def _h_signal(self, req: Request) -> Response:
        signum = parse_signal(req.json().get("signal"))
        if signum is None:
            raise bad_request('signal is required, e.g. {"signal": "SIGTERM"}')
        self._locked(
            lambda: self.fleet.send_signal(req.params["app"], req.params["id"], signum, req.nonce)
        )
        return Response(200, {"ok": True})

    def _h_wait(self, req: Request) -> Response:
        want = frozenset(s for v in req.query.get("state", ["started"]) for s in v.split(",") if s)
        unknown = want - set(WAIT_STATES)
        if unknown or not want:
            raise bad_request(
                f"invalid WaitMachineRequest.State: {', '.join(sorted(unknown))!r} "
                f"is not one of {', '.join(WAIT_STATES)}"
            )
        timeout = _wait_timeout(req.arg("timeout"))
        version = req.arg("instance_id") or req.arg("version")
        if "stopped" in want and not version:
            raise bad_request(
                "instance_id (or version) is required when waiting for the stopped state"
            )
        label = ",".join(sorted(want))
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                reached, current = self.fleet.wait_status(
                    req.params["app"], req.params["id"], want, version
                )
                if reached:
                    machine = self.fleet.get(req.params["app"], req.params["id"])
                    return Response(
                        200,
                        {
                            "ok": True,
                            "state": current,
                            "version": version or machine.instance_id,
                            "event_id": machine.events[-1].id,
                        },
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ApiError(
                        408,
                        "deadline_exceeded",
                        f"machine failed to reach desired state, {label}, currently {current}",
                    )
                if self._closed:
                    raise ApiError(503, "unavailable", "the emulator is shutting down")
                self._cond.wait(remaining)

    def _h_acquire_lease(self, req: Request) -> Response:
        body = req.json()
        ttl = body.get("ttl", req.arg("ttl"))
        try:
            ttl = int(ttl) if ttl not in (None, "") else 30
        except (TypeError, ValueError):
            raise ApiError(400, "invalid", f"invalid lease ttl {ttl!r}", lease=True) from None
        description = body.get("description") or ""
        with self._cond:
            lease = self.fleet.acquire_lease(
                req.params["app"],
                req.params["id"],
                ttl=ttl,
                description=str(description),
                nonce=req.nonce,
            )
            return Response(201, {"status": "success", "data": lease.to_json()})

    def _h_get_lease(self, req: Request) -> Response:
        with self._cond:
            lease = self.fleet.get_lease(req.params["app"], req.params["id"])
            return Response(200, {"status": "success", "data": lease.to_json()})

    def _h_release_lease(self, req: Request) -> Response:
        with self._cond:
            self.fleet.release_lease(req.params["app"], req.params["id"], req.nonce)
        return Response(200, {"status": "success", "data": {"ok": True}})

    def _h_cordon(self, req: Request) -> Response:
        on = req.params["cordon"] == "cordon"
        with self._cond:
            self.fleet.cordon(req.params["app"], req.params["id"], on, req.nonce)
        return Response(200, {"ok": True})

    def _h_events(self, req: Request) -> Response:
        limit = _int_arg(req.arg("limit"), 20, "limit")
        with self._cond:
            machine = self.fleet.get(req.params["app"], req.params["id"])
            events = [e.to_json() for e in reversed(machine.events)]
        return Response(200, events[: max(1, min(limit, MAX_EVENTS))])

    def _h_versions(self, req: Request) -> Response:
        with self._cond:
            machine = self.fleet.get(req.params["app"], req.params["id"])
            body = [{"version": v, "user_config": c} for v, c in reversed(machine.versions)]
        return Response(200, body)

    def _h_get_metadata(self, req: Request) -> Response:
        with self._cond:
            machine = self.fleet.get(req.params["app"], req.params["id"])
            return Response(200, dict(machine.config.get("metadata") or {}))

    def _h_get_metadata_key(self, req: Request) -> Response:
        with self._cond:
            machine = self.fleet.get(req.params["app"], req.params["id"])
            value = (machine.config.get("metadata") or {}).get(req.params["key"])
        if value is None:
            raise ApiError(404, "not_found", f"metadata key {req.params['key']!r} not found")
        return Response(200, {"value": value})

    def _h_set_metadata_key(self, req: Request) -> Response:
        value = req.json().get("value") if req.method == "POST" else None
        if req.method == "POST" and not isinstance(value, str):
            raise bad_request('metadata value must be a string: {"value": "..."}')
        with self._cond:
            self.fleet.set_metadata(
                req.params["app"],
                req.params["id"],
                {req.params["key"]: value},
                replace=False,
                nonce=req.nonce,
            )
        return Response(204)

    def _h_put_metadata(self, req: Request) -> Response:
        body = req.json()
        metadata = body.get("metadata")
        if not isinstance(metadata, dict) or not all(
            v is None or isinstance(v, str) for v in metadata.values()
        ):
            raise bad_request('body must be {"metadata": {"key": "value", ...}}')
        version = body.get("machine_version")
        with self._cond:
            self.fleet.set_metadata(
                req.params["app"],
                req.params["id"],
                metadata,
                replace=req.method == "PUT",
                nonce=req.nonce,
                machine_version=version,
            )
        return Response(204)

    # -- control endpoints (/_emulator/...) ----------------------------------------------------

    def reset(self) -> None:
        """Kill every process, forget every Machine, clear faults, latency and counters."""
        with self._cond:
            runs = self.runner.live_runs()
            self.fleet.reset()
            self.faults.clear()
            self.limiter.reset()
            self.calls.clear()
            self.rate_limited.clear()
            self._cond.notify_all()
        # Outside the lock: reaper threads take it to report the exits (which are then ignored).
        self.runner.kill(runs)

    def stats(self) -> JSON:
        """Per-Machine state, billing and exits, plus call and 429 counters."""
        with self._cond:
            now = self.fleet.clock()
            machines = {m.id: self._machine_stats(m, now) for m in self.fleet.machines()}
            return {
                "machines": machines,
                "total_billed_seconds": sum(m["billed_seconds"] for m in machines.values()),
                "calls": dict(self.calls),
                "rate_limited": dict(self.rate_limited),
                "rate_limits_enabled": self.limiter.enabled,
                "live_processes": len(self.runner.live_runs()),
                "workdir": str(self.workdir),
                "log_dir": str(self.log_dir),
                **self.faults.snapshot(),
            }

    def _machine_stats(self, m: Machine, now: float) -> JSON:
        return {
            "app": m.app,
            "name": m.name,
            "state": m.state,
            "instance_id": m.instance_id,
            "billed_seconds": m.billed_seconds(now),
            "starts": m.starts,
            "exit_codes": list(m.exit_codes),
            "restart_count": m.restart_count,
            "pid": self.runner.pid(m.run_id) if m.run_id is not None else None,
            "log": str(self.log_path(m.id)),
            "config": m.config,
        }

    def _h_ctl_reset(self, req: Request) -> Response:
        self.reset()
        return Response(200, {"ok": True})

    def _h_ctl_stats(self, req: Request) -> Response:
        return Response(200, self.stats())

    def _h_ctl_get_faults(self, req: Request) -> Response:
        with self._cond:
            return Response(200, self.faults.snapshot())

    def _h_ctl_add_fault(self, req: Request) -> Response:
        body = req.json()
        with self._cond:
            self.faults.add(body)
            return Response(200, {"ok": True, **self.faults.snapshot()})

    def _h_ctl_clear_faults(self, req: Request) -> Response:
        with self._cond:
            self.faults.clear()
        return Response(200, {"ok": True})

    def _h_ctl_latency(self, req: Request) -> Response:
        body = req.json()
        with self._cond:
            self.faults.set_latency(body)
            return Response(200, {"ok": True, **self.faults.snapshot()})

    def _h_ctl_rate_limits(self, req: Request) -> Response:
        enabled = req.json().get("enabled")
        if not isinstance(enabled, bool):
            raise bad_request('body must be {"enabled": true} or {"enabled": false}')
        with self._cond:
            self.limiter.enabled = enabled
            self.limiter.reset()
        return Response(200, {"ok": True, "enabled": enabled})

    def _h_ctl_kill(self, req: Request) -> Response:
        def kill() -> int | None:
            run_id = self.fleet.kill(req.params["id"])
            return self.runner.pid(run_id)

        pid = self._locked(kill)
        return Response(200, {"ok": True, "machine_id": req.params["id"], "pgid": pid})


_UNSTOPPED: weakref.WeakSet[Emulator] = weakref.WeakSet()


@atexit.register
def _shutdown_forgotten() -> None:
    # Machine processes live in their own sessions, so nothing else would stop them when the
    # interpreter exits without Emulator.shutdown() (a test that forgot, an uncaught error).
    for emulator in list(_UNSTOPPED):
        emulator.shutdown(timeout=2.0)


_ALL_STATES = frozenset(
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


def render_machine(
    m: Machine,
    now: float,
    *,
    summary: bool = False,
    include_lease: bool = False,
    nonce: str | None = None,
) -> JSON:
    """A Machine in the API's JSON shape (events newest first, at most 20 embedded)."""
    data: JSON = {
        "id": m.id,
        "name": m.name,
        "state": m.state,
        "region": m.region,
        "instance_id": m.instance_id,
        "version": m.instance_id,
        "private_ip": m.private_ip,
        "image_ref": image_ref(m.config["image"]),
        "created_at": rfc3339(m.created_at),
        "updated_at": rfc3339(m.updated_at),
        "cordoned": m.cordoned,
    }
    if not summary:
        data["config"] = m.config
        data["events"] = [e.to_json() for e in reversed(m.events[-EMBEDDED_EVENTS:])]
        data["checks"] = []
        data["host_status"] = "ok"
    if nonce:
        data["nonce"] = nonce
    lease = m.live_lease(now)
    if include_lease and lease is not None:
        data["lease"] = {
            "description": lease.description,
            "owner": lease.owner,
            "expires_at": int(lease.expires_at),
        }
    return data


def image_ref(image: str) -> JSON:
    """Split ``registry/repository:tag@digest`` the way Fly reports ``image_ref``."""
    ref, _, digest = image.partition("@")
    name, tag = ref, "latest"
    if ":" in ref.rsplit("/", 1)[-1]:
        name, tag = ref.rsplit(":", 1)
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, rest
    else:
        registry, repository = "registry-1.docker.io", name if "/" in name else f"library/{name}"
    return {
        "registry": registry,
        "repository": repository,
        "tag": tag,
        "digest": digest or f"sha256:{sha256(image.encode()).hexdigest()}",
        "labels": {},
    }


def _request(environ: Mapping[str, Any]) -> Request:
    headers = {
        k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")
    }
    if environ.get("CONTENT_TYPE"):
        headers["content-type"] = environ["CONTENT_TYPE"]
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    body = environ["wsgi.input"].read(length) if length > 0 else b""
    # WSGI hands the path over as latin-1 decoded bytes.
    path = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8", "replace")
    return Request(
        method=environ.get("REQUEST_METHOD", "GET").upper(),
        path=path,
        query=parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True),
        headers=headers,
        raw_body=body,
    )


def _wait_timeout(value: str | None) -> float:
    if value is None or value == "":
        return 60.0
    try:
        seconds = float(value)
    except ValueError:
        parsed = parse_duration(value, "timeout")
        seconds = parsed or 0.0
    if not 1 <= seconds <= 60:
        raise bad_request(WAIT_RANGE_ERROR)
    return seconds


def _int_arg(value: str | None, default: int, name: str) -> int:
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise bad_request(f"{name} must be an integer") from None


__all__ = ["ACTIONS", "Emulator", "image_ref", "render_machine"]
