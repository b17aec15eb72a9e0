"""Synchronous client for the Fly.io Machines REST API, over httpx.

One method per endpoint this project needs. Every method returns frozen dataclasses from
:mod:`.models` or raises a :class:`~.errors.MachinesAPIError` subclass; transient failures are
retried per :class:`~.retry.RetryPolicy` before they reach the caller. The plumbing (one
attempt, retries, decoding, redaction of the token) lives in :mod:`._transport`; what Fly's
messages mean is decided by the predicates in :mod:`.errors`.

Usage::

    with MachinesClient("https://api.machines.dev", token, "my-app") as client:
        machine = client.create({"image": image, "init": {"cmd": ["python", "worker.py"]}})
        client.wait(machine.id, "started", instance_id=machine.instance_id, timeout=120)

    # Inside a Fly Machine, acting on itself without a token (None when there is no socket):
    local = MachinesClient.local(os.environ["FLY_APP_NAME"])

Tests pass ``transport=httpx.WSGITransport(app=Emulator(...))`` or ``httpx.MockTransport``.
"""

from __future__ import annotations

import builtins
import logging
import math
import secrets
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from ._transport import (
    DEFAULT_USER_AGENT,
    NONCE_HEADER,
    Session,
    authorization_header,
    is_ambiguous,
    should_retry,
    tls_verify,
)
from .errors import (
    Conflict,
    LeaseHeld,
    MachineNotFound,
    MachinesAPIError,
    PreconditionFailed,
    RateLimited,
    TransportError,
    WaitTimeout,
    current_state,
    is_already_started,
    is_already_stopped,
    is_already_suspended,
    is_name_taken,
    is_still_active,
)
from .local import DEFAULT_BASE_URL, LOCAL_API_URL, local_api_socket
from .models import Lease, Machine, StartResult, thaw
from .redaction import Redactor
from .retry import Backoff, RetryPolicy

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_USER_AGENT",
    "NONCE_HEADER",
    "MachinesClient",
    "authorization_header",
]

logger = logging.getLogger("django_flyworkers.machines")

# Fly rejects wait timeouts outside [1 s, 60 s]; longer waits are a loop of 60 s calls.
_WAIT_MIN, _WAIT_MAX = 1, 60
# The HTTP read timeout of a long-poll must outlive the poll itself.
_WAIT_READ_MARGIN = 10.0


class MachinesClient:
    """Client for one Fly app's Machines.

    Args:
        base_url: API root, e.g. ``https://api.machines.dev`` or an emulator URL;
            ``/v1`` is appended unless already there.
        token: Fly API token (``FlyV1 ...``, a bare macaroon, or an OAuth token). It is sent
            only in the ``Authorization`` header and never shown in reprs, logs or errors:
            every piece of it is redacted from what a server sends back (see
            :class:`~.redaction.Redactor`).
        app_name: the Fly app whose Machines are managed.
        transport: httpx transport (``WSGITransport``, ``MockTransport``); the client owns
            it and closes it in :meth:`close`.
        timeout: seconds for connect/read/write of ordinary calls (waits extend the read
            timeout past their long-poll).
        retry: backoff policy; ``RetryPolicy()`` by default, ``RetryPolicy.never()`` to
            disable retries.
        user_agent: ``User-Agent`` header.

    :meth:`local` builds a client on the Machine's own ``/.fly/api`` socket instead, which
    needs no token. The client is thread-safe (it shares one ``httpx.Client``).
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        app_name: str,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        user_agent: str = DEFAULT_USER_AGENT,
    ) -> None:
        if not token or not token.strip():
            raise ValueError("MachinesClient needs an API token")
        if any(char in token for char in "\r\n\x00"):
            # Never echo the token: it may be a real secret pasted with a newline.
            raise ValueError("the API token contains a line break or NUL character")
        self._setup(
            base_url,
            token.strip(),
            app_name,
            transport=transport,
            timeout=timeout,
            retry=retry if retry is not None else RetryPolicy(),
            user_agent=user_agent,
        )

    @classmethod
    def local(
        cls,
        app_name: str,
        socket_path: str | None = None,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        user_agent: str = DEFAULT_USER_AGENT,
    ) -> MachinesClient | None:
        """A client on the Machine's local API socket, or ``None`` when there is none.

        ``socket_path`` defaults to :func:`~.local.local_api_socket`:
        ``$FLYWORKERS_LOCAL_API_SOCKET`` (the emulator's), else ``/.fly/api``, either only
        if this process can open it. Requests go to ``http://flaps/v1/...`` over the socket,
        without an ``Authorization`` header: Fly's init adds the Machine's own credential,
        which only covers the Machine itself (use it for :meth:`suspend` of your own
        Machine). See :mod:`.local` for which path is reliable, with sources.

        Retries are off unless ``retry`` is given: a suspend freezes the caller, and a retry
        sent after the resume would freeze it again. Fall back to the token client when the
        socket refuses (:class:`Unauthorized`, :class:`MachineNotFound` for an action outside
        its subset) or cannot be reached (a :class:`TransportError` with ``ambiguous=False``:
        nothing was sent).
        """
        path = socket_path if socket_path is not None else local_api_socket()
        if path is None:
            return None
        client = cls.__new__(cls)
        client._setup(
            LOCAL_API_URL,
            None,
            app_name,
            transport=httpx.HTTPTransport(uds=path),
            timeout=timeout,
            retry=retry if retry is not None else RetryPolicy.never(),
            user_agent=user_agent,
        )
        client._socket = path
        return client

    def _setup(
        self,
        base_url: str,
        token: str | None,
        app_name: str,
        *,
        transport: httpx.BaseTransport | None,
        timeout: float,
        retry: RetryPolicy,
        user_agent: str,
    ) -> None:
        if not app_name:
            raise ValueError("MachinesClient needs an app name")
        root = base_url.rstrip("/")
        if not root.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        self._base_url = root
        self._app_name = app_name
        self._timeout = timeout
        self._retry = retry
        self._socket: str | None = None
        headers = {"Accept": "application/json", "User-Agent": user_agent}
        if token is not None:
            headers["Authorization"] = authorization_header(token)
        http = httpx.Client(
            base_url=root if root.endswith("/v1") else root + "/v1",
            transport=transport,
            verify=tls_verify(root),
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            headers=headers,
            follow_redirects=False,
        )
        self._session = Session(http, retry, Redactor(token))

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Close the HTTP connection pool (and the transport)."""
        self._session.close()

    def __enter__(self) -> MachinesClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f", socket={self._socket!r}" if self._socket else ""
        return f"MachinesClient(base_url={self._base_url!r}, app={self._app_name!r}{where})"

    @property
    def base_url(self) -> str:
        """The API root this client was given (without ``/v1``)."""
        return self._base_url

    @property
    def app_name(self) -> str:
        """The Fly app this client manages."""
        return self._app_name

    @property
    def retry_policy(self) -> RetryPolicy:
        """The backoff policy in use."""
        return self._retry

    @property
    def socket_path(self) -> str | None:
        """The Unix socket of a :meth:`local` client, else ``None``."""
        return self._socket

    @property
    def redact(self) -> Redactor:
        """Removes this client's token from text (``client.redact(text)``)."""
        return self._session.redact

    # -- machines ----------------------------------------------------------------------

    def list(
        self,
        *,
        metadata: Mapping[str, str] | None = None,
        region: str | None = None,
        state: str | Sequence[str] | None = None,
        include_deleted: bool = False,
    ) -> list[Machine]:
        """List the app's Machines.

        Filters are sent to the API (``metadata.<key>=<value>`` ANDed, ``region``,
        comma-joined ``state``) and re-applied client-side, so an API that ignores one of
        them still yields the right answer.
        """
        return self._list(metadata, region, state, include_deleted, None)

    def create(
        self,
        config: Mapping[str, Any],
        *,
        name: str | None = None,
        region: str | None = None,
        skip_launch: bool = False,
        lease_ttl: int | None = None,
    ) -> Machine:
        """Create (and, unless ``skip_launch``, boot) a Machine; returns it in ``created``.

        Creation is asynchronous: follow with ``wait(m.id, "started", instance_id=...)``.

        A create is never blindly repeated. When an attempt fails ambiguously (read timeout,
        reset after sending, 5xx, 408) the Machine may exist, so the client first lists
        Machines and matches ``name``: a match is returned, otherwise the create is retried.
        Without ``name`` one is generated (``flyworkers-<12 hex>``) so the check is always
        possible. A Machine found that way has no ``nonce`` even with ``lease_ttl``: the
        lease then has to expire before the Machine can be mutated.
        """
        name = name or f"flyworkers-{secrets.token_hex(6)}"
        body: dict[str, Any] = {"name": name, "config": thaw(config)}
        if region:
            body["region"] = region
        if skip_launch:
            body["skip_launch"] = True
        if lease_ttl is not None:
            body["lease_ttl"] = lease_ttl
        meta = config.get("metadata")
        meta_filter = (
            {k: v for k, v in meta.items() if isinstance(v, str)}
            if isinstance(meta, Mapping)
            else None
        )
        path = self._path()
        backoff = self._retry.start()
        was_ambiguous = False
        while True:
            try:
                return self._machine(self._session.send("POST", path, json_body=body))
            except MachinesAPIError as err:
                if is_ambiguous(err) or (was_ambiguous and is_name_taken(err)):
                    was_ambiguous = True
                    found = self._find_created(name, meta_filter, backoff, err)
                    if found is not None:
                        return found
                retryable = isinstance(err, RateLimited | TransportError) or is_ambiguous(err)
                self._session.backoff_or_raise(err, retryable, backoff, "POST", path)

    def get(self, machine_id: str) -> Machine:
        """Fetch one Machine; raises :class:`MachineNotFound` if it does not exist."""
        return self._machine(self._session.call("GET", self._path(machine_id), idempotent=True))

    def update(
        self,
        machine_id: str,
        config: Mapping[str, Any],
        *,
        skip_launch: bool = False,
        current_version: str | None = None,
        nonce: str | None = None,
    ) -> Machine:
        """Replace the Machine's whole config (there are no partial updates).

        Returns the Machine with a new ``instance_id``. A started Machine reboots with the
        new config; a stopped one stays stopped. ``current_version`` makes the update fail
        with :class:`Conflict` if the Machine changed since you read it. Updates are retried
        only on failures that prove Fly did not act (429, connection refused).
        """
        body: dict[str, Any] = {"config": thaw(config)}
        if skip_launch:
            body["skip_launch"] = True
        if current_version:
            body["current_version"] = current_version
        response = self._session.call(
            "POST", self._path(machine_id), json_body=body, nonce=nonce, idempotent=False
        )
        return self._machine(response)

    def start(self, machine_id: str, *, nonce: str | None = None) -> StartResult:
        """Start a created, stopped or suspended Machine (a suspended one resumes).

        Retries the transient 412s of a start that follows a stop, an update or a suspend
        too closely (:func:`~.errors.is_still_active`). Starting an already started (or
        starting) Machine succeeds with ``already_started=True``, whether Fly answers 200 or
        412.
        """
        try:
            response = self._session.call(
                "POST",
                self._path(machine_id, "start"),
                nonce=nonce,
                idempotent=True,
                retry_if=is_still_active,
            )
        except PreconditionFailed as err:
            if not is_already_started(err):
                raise
            state = current_state(err) or "started"
            logger.debug("start machine=%s: already %s", machine_id, state)
            return StartResult(previous_state=state, already_started=True)
        return StartResult.from_api(self._session.action_body(response))

    def stop(
        self,
        machine_id: str,
        *,
        signal: str | None = None,
        timeout: float | None = None,
        nonce: str | None = None,
    ) -> None:
        """Ask the Machine to stop; returns before it is ``stopped`` (use :meth:`wait`).

        ``signal`` (``"SIGTERM"``, ``"TERM"``) defaults to the Machine's ``stop_config`` or
        SIGINT; ``timeout`` is how long Fly waits before SIGKILL, sent as a Go duration
        (``"10s"``). ``timeout=0`` reads as "use the default" (fly-go always sends ``"0s"``),
        so for an immediate kill pass ``signal="SIGKILL"``. Stopping a Machine that is
        already stopped (200 no-op or a 412 naming the state) succeeds.
        """
        body: dict[str, Any] = {}
        if signal:
            name = signal.strip().upper()
            body["signal"] = name if name.startswith("SIG") else f"SIG{name}"
        if timeout is not None:
            body["timeout"] = _go_duration(timeout)
        try:
            response = self._session.call(
                "POST",
                self._path(machine_id, "stop"),
                json_body=body or None,
                nonce=nonce,
                idempotent=True,
            )
        except PreconditionFailed as err:
            if not is_already_stopped(err):
                raise
            logger.debug("stop machine=%s: already stopped", machine_id)
            return
        self._session.action_body(response)

    def suspend(self, machine_id: str, *, nonce: str | None = None) -> None:
        """Snapshot and suspend a started Machine; returns before it is ``suspended``.

        Follow with ``wait(machine_id, "suspended")``; a later :meth:`start` resumes it.
        Retried like :meth:`stop` (429, 5xx, timeouts: suspending twice is harmless).
        Suspending a Machine that is already suspended or suspending (200 no-op or a 412
        naming the state) succeeds; a 412 for any other state raises
        :class:`PreconditionFailed`, and Fly's refusals of ineligible Machines (memory,
        swap, schedule, GPU) raise as they come, never retried.
        """
        try:
            response = self._session.call(
                "POST", self._path(machine_id, "suspend"), nonce=nonce, idempotent=True
            )
        except PreconditionFailed as err:
            if not is_already_suspended(err):
                raise
            logger.debug("suspend machine=%s: already %s", machine_id, current_state(err))
            return
        self._session.action_body(response)

    def wait(
        self,
        machine_id: str,
        state: str | Sequence[str] = "started",
        *,
        instance_id: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        """Block until the Machine reaches ``state`` (or one of several states).

        Fly caps one wait at 60 s, so this loops: each call asks for
        ``clamp(ceil(remaining), 1, 60)`` seconds, a 408 means "not yet", and
        :class:`WaitTimeout` is raised once ``timeout`` seconds have passed (a call may
        overrun the deadline by under a second because Fly's minimum is 1 s). Waiting for
        ``destroyed`` treats 404 as success. Fly requires ``instance_id`` to wait for
        ``stopped``; when it is not given the client fetches the current one first.
        Rate limits and transient errors are retried within the same deadline.
        """
        states = _state_list(state)
        if not states:
            raise ValueError("wait() needs at least one state")
        if instance_id is None and "stopped" in states:
            instance_id = self.get(machine_id).instance_id or None
        path = self._path(machine_id, "wait")
        deadline = self._retry.clock() + timeout
        backoff = self._retry.start(budget=timeout)
        last: MachinesAPIError | None = None
        while True:
            if deadline - self._retry.clock() <= 0 and last is not None:
                raise _wait_timeout(machine_id, states, timeout, last) from last
            try:
                self._long_poll(path, states, instance_id, deadline)
                return
            except WaitTimeout as err:
                last = err
            except MachineNotFound:
                if "destroyed" in states:
                    return
                raise
            except MachinesAPIError as err:
                if not should_retry(err, idempotent=True):
                    raise
                # Transient trouble (429, 5xx, timeouts) counts against the wait's deadline;
                # once it has passed, the loop raises WaitTimeout naming the last error.
                last = err
                delay = backoff.next_delay()
                if delay is not None:
                    self._session.pause(err, backoff, delay, "GET", path)

    def _long_poll(
        self, path: str, states: Sequence[str], instance_id: str | None, deadline: float
    ) -> None:
        """One ``GET .../wait`` of at most 60 s; returns on 200, raises what Fly answered."""
        clock = self._retry.clock
        poll = max(_WAIT_MIN, min(_WAIT_MAX, math.ceil(deadline - clock())))
        params = [("state", s) for s in states] + [("timeout", str(poll))]
        if instance_id:
            params.append(("instance_id", instance_id))
        sent_at = clock()
        try:
            self._session.send(
                "GET",
                path,
                params=params,
                timeout=httpx.Timeout(self._timeout, read=poll + _WAIT_READ_MARGIN),
            )
        except WaitTimeout:
            # A 408 long before the poll ran out (a proxy, a fault) must not spin.
            if clock() - sent_at < poll / 2:
                self._retry.sleep(min(self._retry.delay(0), max(0.0, deadline - clock())))
            raise

    def destroy(self, machine_id: str, *, force: bool = False, nonce: str | None = None) -> None:
        """Destroy the Machine; ``force`` kills it first if it is running.

        Sends ``?force=true&kill=true`` when forcing (Fly's docs use ``force``, fly-go
        ``kill``). A 404 after a retried attempt counts as success: the earlier attempt won.
        """
        params = [("force", "true"), ("kill", "true")] if force else None
        backoff = self._retry.start()
        try:
            self._session.call(
                "DELETE",
                self._path(machine_id),
                params=params,
                nonce=nonce,
                idempotent=True,
                backoff=backoff,
            )
        except MachineNotFound:
            if backoff.attempts > 1:
                logger.debug("destroy machine=%s: gone after a retried attempt", machine_id)
                return
            raise

    # -- leases ------------------------------------------------------------------------

    def acquire_lease(
        self,
        machine_id: str,
        *,
        ttl: int = 30,
        description: str = "",
        nonce: str | None = None,
    ) -> Lease:
        """Take the Machine's lease for ``ttl`` seconds (pass ``nonce`` to refresh yours).

        Raises :class:`LeaseHeld` when someone else holds it. Send the returned nonce with
        every mutating call while you hold the lease, and release it in a ``finally``.
        """
        try:
            response = self._session.call(
                "POST",
                self._path(machine_id, "lease"),
                params=[("ttl", str(ttl))],
                json_body={"ttl": ttl, "description": description},
                nonce=nonce,
                idempotent=False,
            )
        except Conflict as err:
            if isinstance(err, LeaseHeld):
                raise
            # Every 409 from the lease endpoint means "held", whatever the wording.
            held = LeaseHeld(
                err.status, err.code, err.message, err.request_id, err.method, err.path
            )
            held.attempts = err.attempts
            raise held from None
        data = self._session.json(response)
        if not isinstance(data, Mapping) or data.get("status") == "error":
            raise self._session.invalid(response, "lease response without a lease")
        try:
            return Lease.from_api(data)
        except ValueError as exc:
            raise self._session.invalid(response, str(exc)) from None

    def release_lease(self, machine_id: str, nonce: str) -> None:
        """Release a lease. A lease (or Machine) that is already gone counts as released."""
        try:
            self._session.call(
                "DELETE",
                self._path(machine_id, "lease"),
                nonce=nonce,
                idempotent=True,
            )
        except MachineNotFound as err:
            logger.debug("release lease machine=%s: already gone (%s)", machine_id, err.message)

    # -- plumbing ----------------------------------------------------------------------

    def _path(self, machine_id: str | None = None, action: str | None = None) -> str:
        path = f"/apps/{quote(self._app_name, safe='')}/machines"
        if machine_id is not None:
            if not machine_id or not isinstance(machine_id, str):
                # An empty id would silently turn GET /machines/{id} into a list call.
                raise ValueError("machine_id must be a non-empty string")
            path += "/" + quote(machine_id, safe="")
        if action:
            path += "/" + action
        return path

    def _list(
        self,
        metadata: Mapping[str, str] | None,
        region: str | None,
        state: str | Sequence[str] | None,
        include_deleted: bool,
        backoff: Backoff | None,
    ) -> builtins.list[Machine]:
        # `builtins.`: the `list` method shadows the type inside the class body.
        params: list[tuple[str, str]] = [(f"metadata.{k}", v) for k, v in (metadata or {}).items()]
        if region:
            params.append(("region", region))
        states = _state_list(state) if state is not None else []
        if states:
            params.append(("state", ",".join(states)))
        if include_deleted:
            params.append(("include_deleted", "true"))
        response = self._session.call(
            "GET", self._path(), params=params or None, idempotent=True, backoff=backoff
        )
        data = self._session.json(response)
        if not isinstance(data, list):
            raise self._session.invalid(response, "expected a JSON array of Machines")
        try:
            machines = [Machine.from_api(item) for item in data if isinstance(item, Mapping)]
        except ValueError as exc:
            raise self._session.invalid(response, str(exc)) from None
        return [
            m
            for m in machines
            if all(m.metadata.get(k) == v for k, v in (metadata or {}).items())
            and (not region or m.region == region)
            and (not states or m.state in states)
        ]

    def _find_created(
        self,
        name: str,
        metadata: Mapping[str, str] | None,
        backoff: Backoff,
        original: MachinesAPIError,
    ) -> Machine | None:
        """After an ambiguous create: the Machine named ``name``, if the create landed."""
        try:
            machines = self._list(metadata, None, None, False, backoff)
        except MachinesAPIError as check_error:
            logger.warning(
                "create name=%s failed ambiguously and the check by name failed too (%s); "
                "not retrying",
                name,
                check_error,
            )
            raise original from check_error
        for machine in machines:
            if machine.name == name:
                logger.warning(
                    "create name=%s failed ambiguously (%s) but the Machine exists (id=%s); "
                    "not creating another",
                    name,
                    original,
                    machine.id,
                )
                return machine
        return None

    def _machine(self, response: httpx.Response) -> Machine:
        data = self._session.json(response)
        if not isinstance(data, Mapping):
            raise self._session.invalid(response, "expected a Machine object")
        try:
            return Machine.from_api(data)
        except ValueError as exc:
            raise self._session.invalid(response, str(exc)) from None


def _wait_timeout(
    machine_id: str, states: Sequence[str], timeout: float, last: MachinesAPIError
) -> WaitTimeout:
    return WaitTimeout(
        408,
        "deadline_exceeded",
        f"machine {machine_id} did not reach {'|'.join(states)} within {timeout:g}s "
        f"(last: {last.message})",
        last.request_id,
        "GET",
        last.path,
    )


def _state_list(state: str | Sequence[str]) -> list[str]:
    items = [state] if isinstance(state, str) else list(state)
    return [s.strip() for item in items for s in str(item).split(",") if s.strip()]


def _go_duration(seconds: float) -> str:
    """Seconds as a Go duration string (``"10s"``, ``"1500ms"``), the form Fly parses."""
    if seconds < 0 or math.isnan(seconds):
        raise ValueError("timeout must be a non-negative number of seconds")
    millis = round(seconds * 1000)
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"
