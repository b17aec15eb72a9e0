"""A local emulator of the Fly Machines REST API whose Machines are real local processes.

Imports nothing from Django (stdlib + httpx). POSIX only. Use it in-process or over a socket::

    emu = Emulator(token="T", workdir=tmp_path)                 # a WSGI app
    client = httpx.Client(transport=httpx.WSGITransport(app=emu), base_url="http://fly",
                          headers={"Authorization": "Bearer T"})
    emu.shutdown()                                              # kills every process group

    with EmulatorServer(token="T", workdir=tmp_path) as srv:     # srv.url, srv.emulator
        ctl = EmulatorControl(srv.url, "T")

    python -m django_flyworkers.emulator --port 4280 --token T [--workdir DIR] [--log-dir DIR]
        [--host 127.0.0.1] [--allow-remote] [--no-rate-limits] [--boot-delay SECONDS] [-v]

It binds loopback only unless ``--allow-remote`` (``allow_remote=True``): it runs the command
of any Machine a client with the token creates.

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
    FLY_IMAGE_REF, FLY_MACHINE_VERSION, FLY_PRIVATE_IP (a per-Machine 127.0.x.y address),
    FLY_VM_MEMORY_MB and FLYWORKERS_LOCAL_API_SOCKET (below), then ``config.env`` and
    ``processes[0].env``. Output goes to ``<log_dir>/<machine id>.log`` (default
    ``workdir/.emulator/logs``) with a banner line per start and exit.
    Each process starts in its own session. A stop signal goes to the main process only, as
    Fly's init does, so an RQ work-horse is not interrupted (``signal_group=True`` signals the
    session instead). The SIGKILL after the stop timeout, a forced destroy and the kill
    control endpoint hit the whole session (work-horses in groups of their own included), and
    when the main process exits the rest of its session is SIGKILLed, as when a VM stops.
    Killed processes report exit code 128 + signal (137 for SIGKILL) and ``signal`` in the
    exit event.
    ``shutdown()`` (also at interpreter exit, for emulators never shut down) kills and reaps
    every session, suspended ones included; use ``leftover_pids()`` to check, since orphaned
    grandchildren may linger as zombies where PID 1 does not reap. If the emulator itself is
    SIGKILLed, its Machine processes survive. Requests after shutdown get 503.

States
    create answers ``created``, then ``starting``, then ``started`` after ``boot_delay``;
    ``skip_launch`` stays ``created``. Start while a create is still booting, or while
    starting, replacing, restarting, destroying or destroyed: 412 ``unable to start
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
    Suspend (started only, else 412 ``unable to suspend machine from current state``; no-op
    while suspending or suspended): a ``suspend``/``suspending``/``user`` event, the whole
    session is SIGSTOPped, then after ``suspend_delay`` ``suspended`` with a
    ``suspend``/``suspended``/``flyd`` event (Fly's event names for suspend are not
    documented; these follow its stop events). A config over Fly's suspend limits (memory
    above 2048 MB, ``init.swap_size_mb``, a GPU, a ``schedule``) gets 412 ``failed_precondition:
    machine cannot be suspended: ...`` (the emulator's wording; Fly's is not public). Start on
    a suspended Machine, or one still suspending (Fly's interruptible suspend), resumes the
    same processes with SIGCONT after ``boot_delay``, without re-running the command (stats
    count ``resumes``, not ``starts``). Stop, update or destroy (no force needed) of a
    suspended Machine SIGKILLs its session, as Fly discards the snapshot.
    Billing counts only time in ``started`` (including the backoff between policy restarts):
    it stops while suspending or suspended and starts again on resume.
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

Local API (Fly's ``/.fly/api``)
    Each Machine's process gets ``FLYWORKERS_LOCAL_API_SOCKET``, the path of a Unix socket
    serving the same routes with no token, like ``/.fly/api`` on Fly (``curl --unix-socket
    $FLYWORKERS_LOCAL_API_SOCKET -X POST http://flaps/v1/apps/$FLY_APP_NAME/machines/
    $FLY_MACHINE_ID/suspend``). It acts on its own Machine only (and reads its app's details);
    anything else is 403 ``permission_denied``, control endpoints 404. Rate limits and faults
    apply as on the network API.

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
    ``list create get update start stop suspend wait destroy lease restart signal ps cordon
    metadata events versions app``. Token buckets per (action, Machine), per (action, app) for
    list/create/app: refill 1/s, burst 3; get 5/s, burst 10 (``rate_limit_speed`` multiplies
    the refill rates for tests; 1 is Fly's). 429 ``{"error":
    "resource_exhausted: rate limit exceeded"}``, no Retry-After. Stats count every call in
    ``calls`` and 429s in ``rate_limited``. An injected fault answers before the call takes
    effect (``after: true``: after it did) with ``{"error": "<code>: <message>"}``, the code
    following the status (500 internal, 503 unavailable, 412 failed_precondition, 429 the
    rate-limit body, ...); a message starting with ``<code>:`` is used as is.

Control endpoints (same token)
    ``POST /_emulator/reset`` -> ``{"ok": true}``; ``GET /_emulator/stats`` -> ``{"machines":
    {id: {app, name, state, instance_id, billed_seconds, starts, suspends, resumes,
    exit_codes, restart_count, pid, waiters, log, local_api_socket, config}},
    "total_billed_seconds", "calls", "rate_limited", "rate_limits_enabled", "rate_limit_speed",
    "live_processes", "waiters" (long-polling waits now blocked), "workdir", "log_dir",
    "faults", "latency"}``;
    ``GET|POST|DELETE /_emulator/faults`` (POST ``{"action", "status": 500, "count": 1,
    "message": null, "after": false}``); ``POST /_emulator/latency`` ``{"action", "seconds",
    "after": false}`` (0 removes; ``after``: the call takes effect at once, its answer is late);
    ``POST /_emulator/rate_limits`` ``{"enabled": bool, "speed": 1.0}``;
    ``POST /_emulator/machines/{id}/kill`` -> ``{"ok": true, "machine_id", "pgid"}``: SIGKILL
    of the group, handled as a crash (exit code 137, ``requested_stop: false``, restart policy).

Also served: restart, signal, cordon/uncordon, events, versions, metadata, ``GET .../ps``
(the processes of a started Machine, fly-go's ProcessStat; 412 otherwise), and apps:
``GET /v1/apps/{app}`` answers for any name (apps exist on first use); ``POST /v1/apps``
(201, 422 ``name_taken`` for a known app), ``GET /v1/apps?org_slug=`` (``{"total_apps",
"apps": [{id, name, machine_count, network}]}``; apps created there or holding Machines; the
org of the latter is ``personal``), ``DELETE /v1/apps/{app}[?force=true]`` (202; destroys its
Machines; active ones need force, else 412; unknown app 404). Not served (404): exec,
memory, volumes, org endpoints. Unknown routes: ``404 page not found`` as plain text, as
Fly; a known path with another method: 405 with ``Allow``. A missing or wrong token: 401
``{"error": "unauthorized"}`` (``Bearer T``, ``FlyV1 T`` and ``Bearer FlyV1 T`` work).
"""

from .app import Emulator
from .control import EmulatorControl, EmulatorControlError
from .errors import ApiError
from .local_api import LOCAL_API_ENV
from .server import EmulatorServer, serve
from .state import Fleet

__all__ = [
    "LOCAL_API_ENV",
    "ApiError",
    "Emulator",
    "EmulatorControl",
    "EmulatorControlError",
    "EmulatorServer",
    "Fleet",
    "serve",
]
