"""Handlers of the control endpoints (``/_emulator/...``) that tests use to drive the emulator.

They need the same Bearer token as the Machines API; `control.EmulatorControl` is their client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import JSON, bad_request
from .model import Machine
from .wsgi import Request, Response, Route, route

if TYPE_CHECKING:
    from .app import Emulator


def stats(emu: Emulator) -> JSON:
    """Per-Machine state, billing and exits, call and 429 counters, blocked waits."""
    with emu.lock:
        now = emu.fleet.clock()
        machines = {m.id: machine_stats(emu, m, now) for m in emu.fleet.machines()}
        return {
            "machines": machines,
            "total_billed_seconds": sum(m["billed_seconds"] for m in machines.values()),
            "calls": dict(emu.calls),
            "rate_limited": dict(emu.rate_limited),
            "rate_limits_enabled": emu.limiter.enabled,
            "rate_limit_speed": emu.limiter.speed,
            "live_processes": len(emu.runner.live_runs()),
            "waiters": sum(emu.waiters.values()),
            "workdir": str(emu.workdir),
            "log_dir": str(emu.log_dir),
            **emu.faults.snapshot(),
        }


def machine_stats(emu: Emulator, m: Machine, now: float) -> JSON:
    return {
        "app": m.app,
        "name": m.name,
        "state": m.state,
        "instance_id": m.instance_id,
        "billed_seconds": m.billed_seconds(now),
        "starts": m.starts,
        "suspends": m.suspends,
        "resumes": m.resumes,
        "exit_codes": list(m.exit_codes),
        "restart_count": m.restart_count,
        "pid": emu.runner.pid(m.run_id) if m.run_id is not None else None,
        "waiters": emu.waiters.get(m.id, 0),
        "log": str(emu.log_path(m.id)),
        "local_api_socket": emu.local_api.path(m.id),
        "config": m.config,
    }


def reset(emu: Emulator, req: Request) -> Response:
    emu.reset()
    return Response(200, {"ok": True})


def get_stats(emu: Emulator, req: Request) -> Response:
    return Response(200, stats(emu))


def get_faults(emu: Emulator, req: Request) -> Response:
    with emu.lock:
        return Response(200, emu.faults.snapshot())


def add_fault(emu: Emulator, req: Request) -> Response:
    body = req.json()
    with emu.lock:
        emu.faults.add(body)
        return Response(200, {"ok": True, **emu.faults.snapshot()})


def clear_faults(emu: Emulator, req: Request) -> Response:
    with emu.lock:
        emu.faults.clear()
    return Response(200, {"ok": True})


def set_latency(emu: Emulator, req: Request) -> Response:
    body = req.json()
    with emu.lock:
        emu.faults.set_latency(body)
        return Response(200, {"ok": True, **emu.faults.snapshot()})


def set_rate_limits(emu: Emulator, req: Request) -> Response:
    body = req.json()
    enabled, speed = body.get("enabled"), body.get("speed", 1.0)
    if not isinstance(enabled, bool):
        raise bad_request('body must be {"enabled": true} or {"enabled": false}')
    if not isinstance(speed, int | float) or isinstance(speed, bool) or speed <= 0:
        raise bad_request("speed must be a positive number (1 = Fly's refill rates)")
    with emu.lock:
        emu.limiter.enabled = enabled
        emu.limiter.speed = float(speed)
        emu.limiter.reset()
    return Response(200, {"ok": True, "enabled": enabled, "speed": float(speed)})


def kill(emu: Emulator, req: Request) -> Response:
    def kill() -> int | None:
        run_id = emu.fleet.kill(req.params["id"])
        return emu.runner.pid(run_id)

    pid = emu.locked(kill)
    return Response(200, {"ok": True, "machine_id": req.params["id"], "pgid": pid})


ROUTES: list[Route] = [
    route("POST", r"/_emulator/reset", "", reset),
    route("GET", r"/_emulator/stats", "", get_stats),
    route("GET", r"/_emulator/faults", "", get_faults),
    route("POST", r"/_emulator/faults", "", add_fault),
    route("DELETE", r"/_emulator/faults", "", clear_faults),
    route("POST", r"/_emulator/latency", "", set_latency),
    route("POST", r"/_emulator/rate_limits", "", set_rate_limits),
    route("POST", r"/_emulator/machines/(?P<id>[^/]+)/kill", "", kill),
]
