"""A local emulator of the Fly Machines REST API whose Machines are real local processes.

Imports nothing from Django. Use it in-process or over a socket::

    emu = Emulator(token="T", workdir=tmp_path)                 # a WSGI app
    client = httpx.Client(transport=httpx.WSGITransport(app=emu), base_url="http://fly",
                          headers={"Authorization": "Bearer T"})
    emu.shutdown()

    with EmulatorServer(token="T", workdir=tmp_path) as srv:     # srv.url, srv.emulator
        ctl = EmulatorControl(srv.url, "T")

    python -m django_flyworkers.emulator --port 4280 --token T [--workdir DIR] [--log-dir DIR]
        [--host 127.0.0.1] [--no-rate-limits] [--boot-delay SECONDS]

Fly's documented behaviour is reproduced (routes under ``/v1/apps/{app}/machines``, JSON shapes,
errors as ``{"error": "<code>: <message>"}``, create is asynchronous, wait long-polls, leases,
per-action rate limits). Where Fly documents nothing, the emulator chooses as follows.

Processes
    The command is ``config.init.exec``, else ``init.entrypoint + init.cmd``, else the same from
    ``config.processes[0]``. A config without a command is a 400 at create/update (the image's
    CMD cannot be read locally); ``config.image`` is required, as on Fly, but only echoed and
    turned into ``image_ref``. ``python``/``python3`` as argv[0] run the emulator's own
    interpreter. A command that cannot be executed exits with 127 (not found) or 126.
    Processes run in ``workdir`` with ``os.environ`` + the ``env`` overlay (standing in for app
    secrets), then the FLY_* platform variables (``FLY_PRIVATE_IP`` is a per-Machine
    127.0.x.y address), then ``config.env`` and ``processes[0].env``.
    Output goes to ``<log_dir>/<machine id>.log`` (default ``workdir/.emulator/logs``), with a
    banner line per start and exit.
    Each process starts in its own session. A stop signal goes to the main process only, as
    Fly's init does (an RQ work-horse is not interrupted; pass ``signal_group=True`` to signal
    the group); the SIGKILL after the timeout, a forced destroy and the kill control endpoint
    hit the whole group. When the main process exits, the rest of its group is SIGKILLed, as
    when a VM stops. Killed processes report exit code 128 + signal (137 for SIGKILL) and
    ``signal`` in the exit event.

States
    create -> ``created`` (in the response) -> ``starting`` -> ``started`` after ``boot_delay``;
    ``skip_launch`` stays ``created``. Start while the create is still booting, or while
    ``replacing``/``starting``/``restarting``/``suspending``/``destroying``/``destroyed`` ->
    412 ``unable to start machine from current state: '<state>'``; start while ``stopping`` ->
    412 ``machine still active, refusing to start``.
    Start on a ``started`` Machine -> 200 ``{"previous_state": "started", ...}`` (no-op); stop
    on ``stopped``/``created`` -> 200 ``{"ok": true}`` (no-op); stop while ``stopping`` is a
    no-op too. ``strict_start_stop=True`` turns both no-ops into 412s.
    Stop: ``stopping``, the signal (body, else ``stop_config.signal``, else SIGINT), SIGKILL
    after the timeout (body, else ``stop_config.timeout``, else 5 s; ``"0s"`` means default;
    numbers below 1e6 are seconds, larger ones nanoseconds), then ``stopped`` with an exit
    event ``requested_stop: true``. Stopping a Machine that is booting or waiting for a policy
    restart stops it at once.
    Process exit while ``started``: exit 0 with policy ``no``/``on-failure`` -> ``stopped``;
    otherwise the restart policy applies (``no``; ``on-failure``, the default, restarts up to
    ``max_retries`` (default 10) times within 5 minutes; ``always``). During restarts the
    Machine stays ``started`` (each exit is an ``exit`` event with ``restarting: true`` and a
    growing ``restart_count``) and relaunches after a backoff of 0.1 s doubling to 1 s. Once
    ``stopped`` by any exit or stop, ``auto_destroy`` destroys it (also after on-failure gives
    up; never while ``always`` keeps restarting).
    Suspend: ``suspending`` -> ``suspended``, the process group is SIGSTOPped; start resumes it
    with SIGCONT after ``boot_delay``; stop on a suspended Machine kills it. Billing counts
    only time in ``started``.
    Update replaces the whole config under a new ``instance_id`` (= ``version``) and records an
    ``update`` event: a started (or booting) Machine goes ``replacing``, its process is stopped
    as by stop, then it boots the new config; any other Machine goes ``replacing`` ->
    ``stopped``; ``skip_launch`` -> ``created``. Update while ``replacing`` -> 409 ``aborted:
    machine is replacing: concurrent update in progress``; ``current_version`` mismatch -> 409;
    ``name``/``region`` changes -> 400.
    Destroy: an active Machine (starting/started/stopping/replacing/restarting/suspending)
    without ``?force=true``/``?kill=true`` -> 412 ``failed_precondition: machine still active,
    refusing to destroy``; else ``destroying`` (group SIGKILLed) -> ``destroyed``, visible to
    GET for ``destroyed_ttl`` (2 s) and then 404; destroy of a ``destroyed`` one -> 404. Lists
    hide destroyed Machines unless ``include_deleted``.
    Duplicate ``name`` within an app -> 409 ``{"error": "already_exists: ...", "status":
    "name_taken"}`` (names of destroyed Machines are free again).

Wait
    ``state`` may repeat or be comma-separated: started (default), stopped, suspended,
    destroyed, failed, settled (any non-transient state). ``timeout`` 1-60 s (default 60) else
    400 ``invalid_argument: invalid WaitMachineRequest.Timeout: value must be inside range
    [1s, 1m0s]``; ``instance_id``/``version`` is required for ``stopped`` (400), as the docs
    say. An old version reads as ``replaced``, which satisfies ``stopped`` and ``settled`` at
    once; for ``started`` it waits out the timeout. Timeout -> 408 ``deadline_exceeded: machine
    failed to reach desired state, <want>, currently <state>``. A destroyed Machine answers
    404 unless waited on for ``destroyed``/``settled``. 200 body: ``{"ok": true, "state",
    "version", "event_id"}``. ``from_event_id`` is accepted and ignored.

Leases
    Lease endpoints use the ``{"status", "data"}`` envelope; errors there are ``{"status":
    "error", "message", "code"}``. Owner is always ``emulator@tokens.fly.io``; default ttl 30 s.
    Any second acquire without the current nonce -> 409. Update, start, stop, suspend, restart,
    signal, cordon, metadata writes and destroy on a leased Machine without the right
    ``fly-machine-lease-nonce`` -> 409 ``aborted: machine ID <id> lease currently held by
    <owner>, expires at <RFC3339>``. Release without the nonce -> 400; no lease -> 404.

Rate limits and faults (action names)
    ``list create get update start stop suspend wait destroy lease restart signal cordon
    metadata events versions app``. Token buckets per (action, Machine) - per (action, app) for
    list/create/app - refill 1/s, burst 3; get 5/s, burst 10. 429 ``{"error":
    "resource_exhausted: rate limit exceeded"}`` without Retry-After. Every call counts in
    stats ``calls``, 429s also in ``rate_limited``. An injected fault answers before the call
    takes effect (``after: true``: after it did), with ``{"error": "<code>: <message>"}`` where
    the code follows the status (500 internal, 503 unavailable, 412 failed_precondition, ...).

Control endpoints (same bearer token)
    ``POST /_emulator/reset``; ``GET /_emulator/stats``; ``GET|POST|DELETE /_emulator/faults``
    (``{"action", "status": 500, "count": 1, "message": null, "after": false}``);
    ``POST /_emulator/latency`` (``{"action", "seconds"}``, 0 removes);
    ``POST /_emulator/rate_limits`` (``{"enabled": bool}``);
    ``POST /_emulator/machines/{id}/kill`` (SIGKILL the group: a crash, ``requested_stop:
    false``, exit code 137, then the restart policy).

Also served: restart, signal, cordon/uncordon, events, versions, metadata, ``GET/POST /v1/apps``
(apps exist on first use). Not served (404): exec, ps, memory, volumes, org endpoints.
Unknown routes answer ``404 page not found`` as plain text; missing or wrong token -> 401
``{"error": "unauthorized"}`` (``Bearer T``, ``FlyV1 T`` and ``Bearer FlyV1 T`` are accepted).
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
