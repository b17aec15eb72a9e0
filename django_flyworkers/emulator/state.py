"""The fleet: every Machines API operation as a pure state change.

`Fleet` adds the API's verbs to `lifecycle.Lifecycle`, which holds the timers, effects and
process bookkeeping. Nothing here does I/O; see `lifecycle` for how the caller drives it.
That keeps the whole lifecycle testable with a fake clock and no processes at all.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping

from . import leases
from .config import suspend_refusal, validate_config
from .errors import JSON, ApiError, bad_request, not_found, precondition, wrong_state
from .ids import new_ulid
from .lifecycle import Lifecycle
from .model import ACTIVE_STATES, SETTLED_STATES, App, Lease, Machine, Signal

DEFAULT_REGION = "iad"
DEFAULT_ORG = "personal"


class Fleet(Lifecycle):
    """Every Machine of every app: the API operations (see `Lifecycle` for the arguments)."""

    # -- apps ---------------------------------------------------------------------------------

    def create_app(self, name: str, org_slug: str, network: str = "") -> App:
        """Register an app; 422 ``name_taken`` if it already exists."""
        if name in self._apps:
            raise ApiError(
                422,
                "already_exists",
                f"app name '{name}' is already taken",
                extra={"status": "name_taken"},
            )
        app = App(
            id=f"{self._rng.getrandbits(64):016x}",
            name=name,
            org_slug=org_slug or DEFAULT_ORG,
            created_at=self.clock(),
            network=network or "default",
        )
        self._apps[name] = app
        return app

    def app(self, name: str) -> App:
        """The app, or a not-yet-registered one: apps exist on first use."""
        return self._apps.get(name) or App(name, name, DEFAULT_ORG, self.clock())

    def list_apps(self, org_slug: str) -> list[App]:
        """Apps created in `org_slug` or holding Machines, by name."""
        return sorted(
            (a for a in self._apps.values() if a.org_slug == org_slug), key=lambda a: a.name
        )

    def delete_app(self, name: str, *, force: bool) -> None:
        """Destroy the app's Machines and forget it; active Machines need ``force``."""
        if name not in self._apps:
            raise not_found("app")
        machines = [m for m in self.list_machines(name) if m.state != "destroying"]
        if not force and any(m.state in ACTIVE_STATES or m.booting for m in machines):
            raise precondition(
                f"app '{name}' has machines that are still active: stop them first, "
                "or pass ?force=true"
            )
        for m in machines:
            self._begin_destroy(m)
        del self._apps[name]

    def _ensure_app(self, name: str) -> None:
        if name not in self._apps:
            self._apps[name] = self.app(name)

    # -- leases -------------------------------------------------------------------------------

    def _check_lease(self, m: Machine, nonce: str | None) -> None:
        leases.check(m, self.clock(), nonce)

    def acquire_lease(
        self, app: str, machine_id: str, *, ttl: int, description: str, nonce: str | None
    ) -> Lease:
        """Take a lease, or refresh it when `nonce` matches the current one."""
        m = self.get(app, machine_id)
        return leases.acquire(
            m, self.clock(), self._rng, ttl=ttl, description=description, nonce=nonce
        )

    def get_lease(self, app: str, machine_id: str) -> Lease:
        return leases.current(self.get(app, machine_id), self.clock())

    def release_lease(self, app: str, machine_id: str, nonce: str | None) -> None:
        leases.release(self.get(app, machine_id), self.clock(), nonce)

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
        m = Machine(
            id=self._new_id(),
            app=app,
            name=name,
            region=region,
            private_ip=self._new_ip(),
            config=config,
            instance_id=new_ulid(now, self._rng),
            created_at=now,
            updated_at=now,
            cordoned=bool(body.get("skip_service_registration")),
        )
        m.versions.append((m.instance_id, config))
        self._ensure_app(app)
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
        m.config = config
        m.instance_id = new_ulid(self.clock(), self._rng)
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
        else:
            # A suspended Machine's snapshot is discarded: its session is killed.
            self._request_exit(m, plan, old_signal, old_timeout)
        return m, self._lease_from_body(m, body)

    # -- start / stop / suspend / restart / signal ---------------------------------------------

    def start(self, app: str, machine_id: str, nonce: str | None) -> str:
        """Boot a created or stopped Machine, or resume a suspended one. Returns the old state.

        Start also interrupts a suspend in progress: Fly resumes the paused VM "as if the
        suspend never happened" (community.fly.io, "Machines can now start from the
        suspending state").
        """
        m = self.get(app, machine_id)
        self._check_lease(m, nonce)
        previous = m.state
        if m.state == "started" and not self.strict_start_stop:
            return previous
        if m.state == "stopping":
            raise precondition("machine still active, refusing to start")
        if m.state not in ("created", "stopped", "suspending", "suspended", "failed") or m.booting:
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
        """Ask a Machine to stop: signal now, SIGKILL the session after the timeout.

        A suspended Machine is killed at once: Fly discards its snapshot.
        """
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
        else:
            self._set_state(m, "stopping")
            self._request_exit(m, "stop", signum or default_signal, timeout or default_timeout)

    def suspend(self, app: str, machine_id: str, nonce: str | None) -> None:
        """Freeze the Machine's whole session (SIGSTOP); the next start resumes it (SIGCONT).

        Only a started Machine can be suspended (412 otherwise; a no-op while suspending or
        suspended), and only one within Fly's limits (`config.suspend_refusal`).
        """
        m = self.get(app, machine_id)
        self._check_lease(m, nonce)
        if m.state in ("suspending", "suspended"):
            return
        if m.state != "started":
            raise wrong_state("suspend", m.state)
        refusal = suspend_refusal(m.config)
        if refusal:
            raise precondition(refusal)
        self._cancel_timer(m)
        self._event(m, "suspend", "suspending", "user")
        self._set_state(m, "suspending")
        m.suspends += 1
        if m.run_id is not None:
            self._effects.append(Signal(m.run_id, signal.SIGSTOP, group=True))
            m.paused = True
        self._schedule(m, "suspended", self.suspend_delay)

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

    def running(self, app: str, machine_id: str) -> int:
        """The run id of a started Machine (for ``ps``), else 412."""
        m = self.get(app, machine_id)
        if m.state != "started" or m.run_id is None:
            raise precondition(f"machine {m.id} is not running (state '{m.state}')")
        return m.run_id

    def kill(self, machine_id: str) -> int:
        """SIGKILL a Machine's whole session, as a crash would (control endpoint)."""
        m = self.by_id(machine_id)
        if m.run_id is None:
            raise precondition(f"machine {m.id} has no running process (state '{m.state}')")
        self._effects.append(Signal(m.run_id, signal.SIGKILL, group=True))
        return m.run_id

    # -- destroy ------------------------------------------------------------------------------

    def destroy(self, app: str, machine_id: str, *, force: bool, nonce: str | None) -> None:
        """Destroy a Machine; a running one needs ``force`` (``?force=true`` / ``?kill=true``).

        A stopped or suspended Machine needs no force, as flyctl's ``machine destroy`` says.
        """
        m = self.get(app, machine_id)
        if m.state in ("destroying", "destroyed"):
            if m.state == "destroyed":
                raise not_found()
            return
        self._check_lease(m, nonce)
        if m.state in ACTIVE_STATES and not force:
            raise precondition(
                "machine still active, refusing to "
                "destroy (stop it first, or pass ?force=true or ?kill=true)"
            )
        self._begin_destroy(m)

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
            raise precondition(
                f"machine_version {machine_version} is not the current version {m.instance_id}"
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
