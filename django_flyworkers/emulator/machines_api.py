"""Handlers of the Machines API routes (``/v1/...``): parse the request, call the fleet, render.

Each handler takes the `Emulator` and a `Request`. State is read and changed under
``emu.lock``; ``emu.locked(fn)`` also executes the effects the change queued.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .config import parse_duration, parse_signal
from .errors import JSON, ApiError, bad_request
from .model import ALL_STATES, WAIT_STATES
from .render import render_app, render_app_summary, render_machine
from .wsgi import Request, Response, Route, int_arg, route, wait_timeout

if TYPE_CHECKING:
    from .app import Emulator

MAX_EVENTS = 50


# -- apps ---------------------------------------------------------------------------------------


def create_app(emu: Emulator, req: Request) -> Response:
    body = req.json()
    name = body.get("app_name")
    if not isinstance(name, str) or not name:
        raise bad_request("app_name is required")
    org, network = body.get("org_slug") or "", body.get("network") or ""
    if not isinstance(org, str) or not isinstance(network, str):
        raise bad_request("org_slug and network must be strings")
    with emu.lock:
        app = emu.fleet.create_app(name, org, network)
    return Response(201, {"id": app.id, "created_at": int(app.created_at * 1000)})


def get_app(emu: Emulator, req: Request) -> Response:
    with emu.lock:
        return Response(200, render_app(emu.fleet.app(req.params["app"])))


def list_apps(emu: Emulator, req: Request) -> Response:
    org = req.arg("org_slug")
    if not org:
        raise bad_request("org_slug is required, e.g. /v1/apps?org_slug=personal")
    with emu.lock:
        apps = [
            render_app_summary(app, len(emu.fleet.list_machines(app.name)))
            for app in emu.fleet.list_apps(org)
        ]
    return Response(200, {"total_apps": len(apps), "apps": apps})


def delete_app(emu: Emulator, req: Request) -> Response:
    force = req.flag("force")
    emu.locked(lambda: emu.fleet.delete_app(req.params["app"], force=force))
    return Response(202)


# -- machines -----------------------------------------------------------------------------------


def list_machines(emu: Emulator, req: Request) -> Response:
    states = {s for v in req.query.get("state", []) for s in v.split(",") if s}
    # fly-go's List(ctx, app, state) appends "?<state>" verbatim.
    states |= {k for k, v in req.query.items() if v == [""] and k in ALL_STATES}
    metadata = {k[9:]: v[-1] for k, v in req.query.items() if k.startswith("metadata.")}
    region = req.arg("region")
    with emu.lock:
        machines = [
            m
            for m in emu.fleet.list_machines(
                req.params["app"], include_deleted=req.flag("include_deleted")
            )
            if (not states or m.state in states)
            and (not region or m.region == region)
            and all((m.config.get("metadata") or {}).get(k) == v for k, v in metadata.items())
        ]
        now = emu.fleet.clock()
        body = [
            render_machine(
                m, now, summary=req.flag("summary"), include_lease=req.flag("include_leases")
            )
            for m in machines
        ]
    return Response(200, body)


def create(emu: Emulator, req: Request) -> Response:
    body = req.json()

    def create() -> JSON:
        machine, nonce = emu.fleet.create(req.params["app"], body)
        return render_machine(machine, emu.fleet.clock(), nonce=nonce)

    return Response(200, emu.locked(create))


def get(emu: Emulator, req: Request) -> Response:
    with emu.lock:
        machine = emu.fleet.get(req.params["app"], req.params["id"])
        body = render_machine(machine, emu.fleet.clock(), include_lease=req.flag("include_leases"))
    return Response(200, body)


def update(emu: Emulator, req: Request) -> Response:
    body = req.json()

    def update() -> JSON:
        machine, nonce = emu.fleet.update(req.params["app"], req.params["id"], body, req.nonce)
        return render_machine(machine, emu.fleet.clock(), nonce=nonce)

    return Response(200, emu.locked(update))


def destroy(emu: Emulator, req: Request) -> Response:
    force = req.flag("force") or req.flag("kill")
    app, machine_id = req.params["app"], req.params["id"]
    emu.locked(lambda: emu.fleet.destroy(app, machine_id, force=force, nonce=req.nonce))
    return Response(200, {"ok": True})


def start(emu: Emulator, req: Request) -> Response:
    app, machine_id = req.params["app"], req.params["id"]
    previous = emu.locked(lambda: emu.fleet.start(app, machine_id, req.nonce))
    return Response(200, {"previous_state": previous, "migrated": False, "new_host": ""})


def stop(emu: Emulator, req: Request) -> Response:
    body = req.json()  # fly-go sends {"id", "signal", "timeout"} in the body
    return _stop_or_restart(emu, req, emu.fleet.stop, body.get("signal"), body.get("timeout"))


def restart(emu: Emulator, req: Request) -> Response:
    # fly-go sends ?signal=&timeout= in the query string
    return _stop_or_restart(emu, req, emu.fleet.restart, req.arg("signal"), req.arg("timeout"))


def _stop_or_restart(
    emu: Emulator,
    req: Request,
    action: Callable[..., None],
    signal_value: object,
    timeout_value: object,
) -> Response:
    signum = parse_signal(signal_value)
    timeout = parse_duration(timeout_value, "timeout")
    app, machine_id = req.params["app"], req.params["id"]
    emu.locked(lambda: action(app, machine_id, signum=signum, timeout=timeout, nonce=req.nonce))
    return Response(200, {"ok": True})


def suspend(emu: Emulator, req: Request) -> Response:
    app, machine_id = req.params["app"], req.params["id"]
    emu.locked(lambda: emu.fleet.suspend(app, machine_id, req.nonce))
    return Response(200, {"ok": True})


def send_signal(emu: Emulator, req: Request) -> Response:
    signum = parse_signal(req.json().get("signal"))
    if signum is None:
        raise bad_request('signal is required, e.g. {"signal": "SIGTERM"}')
    app, machine_id = req.params["app"], req.params["id"]
    emu.locked(lambda: emu.fleet.send_signal(app, machine_id, signum, req.nonce))
    return Response(200, {"ok": True})


def ps(emu: Emulator, req: Request) -> Response:
    """``GET .../ps``: the processes of a started Machine (fly-go's ``[]ProcessStat``)."""
    with emu.lock:
        run_id = emu.fleet.running(req.params["app"], req.params["id"])
    return Response(200, emu.runner.processes(run_id))


def wait(emu: Emulator, req: Request) -> Response:
    want = frozenset(s for v in req.query.get("state", ["started"]) for s in v.split(",") if s)
    unknown = want - set(WAIT_STATES)
    if unknown or not want:
        raise bad_request(
            f"invalid WaitMachineRequest.State: {', '.join(sorted(unknown))!r} "
            f"is not one of {', '.join(WAIT_STATES)}"
        )
    timeout = wait_timeout(req.arg("timeout"))
    version = req.arg("instance_id") or req.arg("version")
    if "stopped" in want and not version:
        raise bad_request("instance_id (or version) is required when waiting for the stopped state")
    app, machine_id = req.params["app"], req.params["id"]
    deadline = time.monotonic() + timeout
    with emu.lock:
        emu.waiters[machine_id] += 1
        try:
            while True:
                reached, current = emu.fleet.wait_status(app, machine_id, want, version)
                if reached:
                    machine = emu.fleet.get(app, machine_id)
                    body = {
                        "ok": True,
                        "state": current,
                        "version": version or machine.instance_id,
                        "event_id": machine.events[-1].id,
                    }
                    return Response(200, body)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ApiError(
                        408,
                        "deadline_exceeded",
                        "machine failed to reach desired state, "
                        f"{','.join(sorted(want))}, currently {current}",
                    )
                if emu.closed:
                    raise ApiError(503, "unavailable", "the emulator is shutting down")
                emu.lock.wait(remaining)
        finally:
            emu.waiters[machine_id] -= 1
            if not emu.waiters[machine_id]:
                del emu.waiters[machine_id]


# -- leases, cordon, events, versions, metadata -------------------------------------------------


def acquire_lease(emu: Emulator, req: Request) -> Response:
    body = req.json()
    ttl = body.get("ttl", req.arg("ttl"))
    try:
        ttl = int(ttl) if ttl not in (None, "") else 30
    except (TypeError, ValueError):
        raise ApiError(400, "invalid", f"invalid lease ttl {ttl!r}", lease=True) from None
    description = str(body.get("description") or "")
    app, machine_id = req.params["app"], req.params["id"]
    with emu.lock:
        lease = emu.fleet.acquire_lease(
            app, machine_id, ttl=ttl, description=description, nonce=req.nonce
        )
        return Response(201, {"status": "success", "data": lease.to_json()})


def get_lease(emu: Emulator, req: Request) -> Response:
    with emu.lock:
        lease = emu.fleet.get_lease(req.params["app"], req.params["id"])
        return Response(200, {"status": "success", "data": lease.to_json()})


def release_lease(emu: Emulator, req: Request) -> Response:
    with emu.lock:
        emu.fleet.release_lease(req.params["app"], req.params["id"], req.nonce)
    return Response(200, {"status": "success", "data": {"ok": True}})


def cordon(emu: Emulator, req: Request) -> Response:
    on = req.params["cordon"] == "cordon"
    with emu.lock:
        emu.fleet.cordon(req.params["app"], req.params["id"], on, req.nonce)
    return Response(200, {"ok": True})


def events(emu: Emulator, req: Request) -> Response:
    limit = int_arg(req.arg("limit"), 20, "limit")
    with emu.lock:
        machine = emu.fleet.get(req.params["app"], req.params["id"])
        found = [e.to_json() for e in reversed(machine.events)]
    return Response(200, found[: max(1, min(limit, MAX_EVENTS))])


def versions(emu: Emulator, req: Request) -> Response:
    with emu.lock:
        machine = emu.fleet.get(req.params["app"], req.params["id"])
        body = [{"version": v, "user_config": c} for v, c in reversed(machine.versions)]
    return Response(200, body)


def get_metadata(emu: Emulator, req: Request) -> Response:
    with emu.lock:
        machine = emu.fleet.get(req.params["app"], req.params["id"])
        return Response(200, dict(machine.config.get("metadata") or {}))


def get_metadata_key(emu: Emulator, req: Request) -> Response:
    with emu.lock:
        machine = emu.fleet.get(req.params["app"], req.params["id"])
        value = (machine.config.get("metadata") or {}).get(req.params["key"])
    if value is None:
        raise ApiError(404, "not_found", f"metadata key {req.params['key']!r} not found")
    return Response(200, {"value": value})


def set_metadata_key(emu: Emulator, req: Request) -> Response:
    value = req.json().get("value") if req.method == "POST" else None
    if req.method == "POST" and not isinstance(value, str):
        raise bad_request('metadata value must be a string: {"value": "..."}')
    with emu.lock:
        emu.fleet.set_metadata(
            req.params["app"],
            req.params["id"],
            {req.params["key"]: value},
            replace=False,
            nonce=req.nonce,
        )
    return Response(204)


def put_metadata(emu: Emulator, req: Request) -> Response:
    body = req.json()
    metadata = body.get("metadata")
    if not isinstance(metadata, dict) or not all(
        v is None or isinstance(v, str) for v in metadata.values()
    ):
        raise bad_request('body must be {"metadata": {"key": "value", ...}}')
    with emu.lock:
        emu.fleet.set_metadata(
            req.params["app"],
            req.params["id"],
            metadata,
            replace=req.method == "PUT",
            nonce=req.nonce,
            machine_version=body.get("machine_version"),
        )
    return Response(204)


_APP = r"/v1/apps/(?P<app>[^/]+)"
_M = _APP + r"/machines/(?P<id>[^/]+)"
ROUTES: list[Route] = [
    route("POST", r"/v1/apps", "app", create_app),
    route("GET", r"/v1/apps", "app", list_apps),
    route("GET", _APP, "app", get_app),
    route("DELETE", _APP, "app", delete_app),
    route("GET", _APP + "/machines", "list", list_machines),
    route("POST", _APP + "/machines", "create", create),
    route("GET", _M, "get", get),
    route("POST", _M, "update", update),
    route("DELETE", _M, "destroy", destroy),
    route("POST", _M + "/start", "start", start),
    route("POST", _M + "/stop", "stop", stop),
    route("POST", _M + "/suspend", "suspend", suspend),
    route("POST", _M + "/restart", "restart", restart),
    route("POST", _M + "/signal", "signal", send_signal),
    route("GET", _M + "/ps", "ps", ps),
    route("GET", _M + "/wait", "wait", wait),
    route("POST", _M + "/lease", "lease", acquire_lease),
    route("GET", _M + "/lease", "lease", get_lease),
    route("DELETE", _M + "/lease", "lease", release_lease),
    route("POST", _M + "/(?P<cordon>cordon|uncordon)", "cordon", cordon),
    route("GET", _M + "/events", "events", events),
    route("GET", _M + "/versions", "versions", versions),
    route("GET", _M + "/metadata", "metadata", get_metadata),
    route("PUT", _M + "/metadata", "metadata", put_metadata),
    route("PATCH", _M + "/metadata", "metadata", put_metadata),
    route("GET", _M + "/metadata/(?P<key>[^/]+)", "metadata", get_metadata_key),
    route("POST", _M + "/metadata/(?P<key>[^/]+)", "metadata", set_metadata_key),
    route("DELETE", _M + "/metadata/(?P<key>[^/]+)", "metadata", set_metadata_key),
]
"""(method, path, action for faults/limits/stats, handler) of every Machines API route."""
