"""A local emulator of the Fly Machines REST API whose Machines are real local processes.

Imports nothing from Django (stdlib + httpx). POSIX only. Use it in-process or over a socket::

    emu = Emulator(token="T", workdir=tmp_path)                 # a WSGI app
    client = httpx.Client(transport=httpx.WSGITransport(app=emu), base_url="http://fly",
                          headers={"Authorization": "Bearer T"})
    emu.shutdown()                                              # kills every process group

    with EmulatorServer(token="T", workdir=tmp_path) as srv:     # srv.url, srv.emulator
        ctl = EmulatorControl(srv.url, "T")

    python -m django_flyworkers.emulator --port 4280 --token T [--workdir DIR] [--log-dir DIR]
        [--host 127.0.0.1] [--no-rate-limits] [--boot-delay SECONDS] [-v]

Fly's documented behaviour is reproduced (routes under ``/v1/apps/{app}/machines``, JSON shapes,
errors as ``{"error": "<code>: <message>"}``, asynchronous create, long-poll wait, leases,
per-action rate limits). Where Fly documents nothing, the emulator chooses as follows.

Processes
    The command is ``config.init.exec``, else ``init.entrypoint + init.cmd``, else the same from
    ``config.processes[0]``. A config without one is a 400 at create/update (the image's CMD
    cannot be read locally). ``config.image`` is required, as on Fly, but only echoed and turned
    into ``image_ref``. ``python``/``python3`` as argv[0] run the emulator's own interpreter. A
    command that cannot be executed exits with 127 (not found) or 126.
    Processes run in ``workdir``; their environment is ``os.environ`` + the ``env`` overlay
    (standing in for app secrets), then FLY_APP_NAME, FLY_MACHINE_ID, FLY_ALLOC_ID, FLY_REGION,
    FLY_IMAGE_REF, FLY_MACHINE_VERSION, FLY_PRIVATE_IP (a per-Machine 127.0.x.y address) and
    FLY_VM_MEMORY_MB, then ``config.env`` and ``processes[0].env``. Output goes to
    ``<log_dir>/<machine id>.log`` (default ``workdir/.emulator/logs``) with a banner line per
    start and exit.
    Each process starts in its own session. A stop signal goes to the main process only, as
    Fly's init does, so an RQ work-horse is not interrupted (``signal_group=True`` signals the
    group instead). The SIGKILL after the stop timeout, a forced destroy and the kill control
    endpoint hit the whole group, and when the main process exits the rest of its group is
    SIGKILLed, as when a VM stops. Killed processes report exit code 128 + signal (137 for
    SIGKILL) and ``signal`` in the exit event.
    ``shutdown()`` (also at interpreter exit, for emulators never shut down) kills and reaps
    every group; use ``leftover_pids()`` to check, since orphaned grandchildren may linger as
    zombies where PID 1 does not reap. If the emulator itself is SIGKILLed, its Machine
    processes survive. Requests after shutdown get 503.

States
    create answers ``created``, then ``starting``, then ``started`` after ``boot_delay``;
    ``skip_launch`` stays ``created``. Start while a create is still booting, or while
    starting, replacing, restarting, suspending, destroying or destroyed: 412 ``unable to start
    machine from current state: '<state>'``; start while ``stopping``: 412 ``machine still
    active, refusing to start``. Start on a started Machine: 200 ``{"previous_state":
    "started", "migrated": false, "new_host": ""}``, a no-op; stop on a stopped or created one,
    or while stopping: 200 ``{"ok": true}``, a no-op (``strict_start_stop=True`` makes both
    no-ops 412s). Stop while replacing, restarting, destroying or destroyed: 412.
    Stop: ``stopping``, the signal (body, else ``stop_config.signal``, else SIGINT; names or
    numbers), SIGKILL after the timeout (body, else ``stop_config.timeout``, else 5 s; ``"0s"``
    means the default; numbers below 1e6 are seconds, larger ones nanoseconds), then
    ``stopped`` with an exit event ``requested_stop: true``. Stopping a Machine that is booting
    or waiting for a policy restart stops it at once.
    Process exit while started: restart policy ``no`` stops; ``on-failure`` (also when unset)
    restarts non-zero exits up to ``max_retries`` (default 10) times within 5 minutes;
    ``always`` restarts every exit. While restarting the Machine stays ``started``; each exit is
    an ``exit`` event with ``restarting`` and a growing ``restart_count``; the relaunch comes
    after 0.1 s, doubling up to 1 s. Once ``stopped`` (by any exit or stop), ``auto_destroy``
    destroys it, also after on-failure gives up, never while ``always`` keeps restarting.
    Suspend (started only, else 412; suspended: no-op): ``suspending``, then ``suspended``; the
    group is SIGSTOPped. Start resumes it with SIGCONT after ``boot_delay``; stop kills it.
    Billing counts only time in ``started`` (including the backoff between policy restarts).
    Update replaces the whole config under a new ``instance_id`` (= ``version``) with an
    ``update`` event. A started or booting Machine goes ``replacing``, its process is stopped as
    by stop (old ``stop_config``), then it boots the new config. Any other Machine goes
    ``replacing``, then ``stopped``; with ``skip_launch`` it ends ``created``. Update while
    replacing: 409 ``aborted: machine is replacing: concurrent update in progress``; while
    stopping, restarting, suspending or destroying: 412; ``current_version`` mismatch: 409;
    changed ``name``/``region``: 400.
    Destroy: an active Machine (starting, started, stopping, replacing, restarting, suspending)
    without ``?force=true`` or ``?kill=true``: 412 ``failed_precondition: machine still active,
    refusing to destroy ...``. Otherwise ``destroying`` (group SIGKILLed), then ``destroyed``,
    visible to GET for ``destroyed_ttl`` (2 s), then 404. Destroy while destroying: no-op;
    of a destroyed Machine: 404. Lists hide destroyed Machines unless ``include_deleted``.
    A duplicate ``name`` within an app: 409 ``{"error": "already_exists: ...", "status":
    "name_taken"}``; names of destroyed Machines are free again.

Wait
    ``state`` may repeat or be comma-separated: started (default), stopped, suspended,
    destroyed, failed, settled (any non-transient state). ``timeout`` 1-60 s (default 60), else
    400 ``invalid_argument: invalid WaitMachineRequest.Timeout: value must be inside range
    [1s, 1m0s]``. ``instance_id`` (or ``version``) is required for ``stopped`` (400), as the
    docs say. An old version reads as ``replaced``, which satisfies ``stopped`` and ``settled``
    at once and never ``started`` (the wait runs out). Timeout: 408 ``deadline_exceeded:
    machine failed to reach desired state, <want>, currently <state>``. A destroyed Machine is
    404 unless waited on for ``destroyed``/``settled``. 200: ``{"ok": true, "state", "version",
    "event_id"}``. ``from_event_id`` is accepted and ignored.

Leases
    ``{"status": "success", "data": {nonce, expires_at, owner, description, version}}`` (201 on
    acquire and refresh); errors there are ``{"status": "error", "message", "code"}``. The owner
    is always ``emulator@tokens.fly.io``; ttl from the body or ``?ttl=``, default 30 s. Any
    acquire without the current nonce while held: 409. Update, start, stop, suspend, restart,
    signal, cordon, metadata writes and destroy of a leased Machine without the right
    ``fly-machine-lease-nonce``: 409 ``aborted: machine ID <id> lease currently held by
    <owner>, expires at <RFC3339>``. Release without the right nonce: 400; no lease: 404.

Rate limits, faults, latency; action names
    ``list create get update start stop suspend wait destroy lease restart signal cordon
    metadata events versions app``. Token buckets per (action, Machine), per (action, app) for
    list/create/app: refill 1/s, burst 3; get 5/s, burst 10. 429 ``{"error":
    "resource_exhausted: rate limit exceeded"}``, no Retry-After. Stats count every call in
    ``calls`` and 429s in ``rate_limited``. An injected fault answers before the call takes
    effect (``after: true``: after it did) with ``{"error": "<code>: <message>"}``, the code
    following the status (500 internal, 503 unavailable, 412 failed_precondition, 429 the
    rate-limit body, ...); a message starting with ``<code>:`` is used as is.

Control endpoints (same token)
    ``POST /_emulator/reset`` -> ``{"ok": true}``; ``GET /_emulator/stats`` -> ``{"machines":
    {id: {app, name, state, instance_id, billed_seconds, starts, exit_codes, restart_count,
    pid, log, config}}, "total_billed_seconds", "calls", "rate_limited", "rate_limits_enabled",
    "live_processes", "workdir", "log_dir", "faults", "latency"}``;
    ``GET|POST|DELETE /_emulator/faults`` (POST ``{"action", "status": 500, "count": 1,
    "message": null, "after": false}``); ``POST /_emulator/latency`` ``{"action", "seconds"}``
    (0 removes); ``POST /_emulator/rate_limits`` ``{"enabled": bool}``;
    ``POST /_emulator/machines/{id}/kill`` -> ``{"ok": true, "machine_id", "pgid"}``: SIGKILL
    of the group, handled as a crash (exit code 137, ``requested_stop: false``, restart policy).

Also served: restart, signal, cordon/uncordon, events, versions, metadata, ``GET /v1/apps/{app}``
and ``POST /v1/apps`` (apps exist on first use). Not served (404): exec, ps, memory, volumes,
org endpoints. Unknown routes: ``404 page not found`` as plain text. A missing or wrong token:
401 ``{"error": "unauthorized"}`` (``Bearer T``, ``FlyV1 T`` and ``Bearer FlyV1 T`` work).
"""

from .app import Emulator
from .control import EmulatorControl, EmulatorControlError
from .server import EmulatorServer, serve
from .state import ApiError, Fleet

__all__ = [
    "ApiError",
    "Emulator",
    "EmulatorControl",
    "EmulatorControlError",
    "EmulatorServer",
    "Fleet",
    "serve",
]
