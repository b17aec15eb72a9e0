"""Synchronous client for the Fly.io Machines REST API, over httpx.

One method per endpoint this project needs. Every method returns frozen dataclasses from
:mod:`.models` or raises a :class:`~.errors.MachinesAPIError` subclass; transient failures are
retried per :class:`~.retry.RetryPolicy` before they reach the caller.

Usage::

    with MachinesClient("https://api.machines.dev", token, "my-app") as client:
        machine = client.create({"image": image, "init": {"cmd": ["python", "worker.py"]}})
        client.wait(machine.id, "started", instance_id=machine.instance_id, timeout=120)

Tests pass ``transport=httpx.WSGITransport(app=Emulator(...))`` or ``httpx.MockTransport``.
"""

from __future__ import annotations

import builtins
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata as importlib_metadata
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from .errors import (
    Conflict,
    LeaseHeld,
    MachineNotFound,
    MachinesAPIError,
    PreconditionFailed,
    RateLimited,
    TransportError,
    WaitTimeout,
    error_from_response,
)
from .models import Lease, Machine, StartResult, thaw
from .retry import Backoff, RetryPolicy

__all__ = ["DEFAULT_BASE_URL", "MachinesClient"]

logger = logging.getLogger("django_flyworkers.machines")

DEFAULT_BASE_URL = "https://api.machines.dev"
NONCE_HEADER = "fly-machine-lease-nonce"

# fly-go sends macaroons (fm1r_/fm1a_/fm2_) with the FlyV1 scheme, everything else as Bearer.
_MACAROON_PREFIXES = ("fm1r_", "fm1a_", "fm2_")
# Fly rejects wait timeouts outside [1 s, 60 s]; longer waits are a loop of 60 s calls.
_WAIT_MIN, _WAIT_MAX = 1, 60
# The HTTP read timeout of a long-poll must outlive the poll itself.
_WAIT_READ_MARGIN = 10.0
# Statuses that are safe to retry when repeating the request cannot do harm.
_RETRY_IF_IDEMPOTENT = frozenset({408, 500, 502, 503, 504})
# A name-taken error after an ambiguous create attempt means that attempt succeeded.
_NAME_TAKEN = re.compile(r"already exists|name.{0,20}taken|unique", re.IGNORECASE)
_START_RETRY = re.compile(
    r"still active|getting replaced|current state: '(created|replacing|stopping)'",
    re.IGNORECASE,
)
_ALREADY_STARTED = re.compile(
    r"current state: '(started|starting)'|already (started|running)", re.IGNORECASE
)
_ALREADY_STOPPED = re.compile(r"current state: '(stopped|stopping)'|already stopped", re.IGNORECASE)
_ALREADY_SUSPENDED = re.compile(
    r"current state: '(suspended|suspending)'|already suspended", re.IGNORECASE
)
# Tokens shorter than this are test placeholders; redacting them would mangle messages.
_MIN_REDACT = 8


def _package_version() -> str:
    try:
        return importlib_metadata.version("django-flyworkers")
    except importlib_metadata.PackageNotFoundError:
        return "0"


DEFAULT_USER_AGENT = f"django-flyworkers/{_package_version()} httpx/{httpx.__version__}"


def authorization_header(token: str) -> str:
    """The ``Authorization`` value for ``token``, chosen the way fly-go chooses it."""
    token = token.strip()
    if token.startswith(("FlyV1 ", "Bearer ")):
        return token
    if token.startswith(_MACAROON_PREFIXES):
        return f"FlyV1 {token}"
    return f"Bearer {token}"


class MachinesClient:
    """Client for one Fly app's Machines.

    Args:
        base_url: API root, e.g. ``https://api.machines.dev`` or an emulator URL;
            ``/v1`` is appended unless already there.
        token: Fly API token (``FlyV1 ...``, a bare macaroon, or an OAuth token). It is sent
            only in the ``Authorization`` header and never shown in reprs, logs or errors.
        app_name: the Fly app whose Machines are managed.
        transport: httpx transport (``WSGITransport``, ``MockTransport``); the client owns
            it and closes it in :meth:`close`.
        timeout: seconds for connect/read/write of ordinary calls (waits extend the read
            timeout past their long-poll).
        retry: backoff policy; ``RetryPolicy()`` by default, ``RetryPolicy.never()`` to
            disable retries.
        user_agent: ``User-Agent`` header.

    The client is thread-safe (it shares one ``httpx.Client``).
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
        if not app_name:
            raise ValueError("MachinesClient needs an app name")
        root = base_url.rstrip("/")
        if not root.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        if not root.endswith("/v1"):
            root += "/v1"
        self._base_url = base_url.rstrip("/")
        self._app_name = app_name
        self._token = token.strip()
        self._timeout = timeout
        self._retry = retry if retry is not None else RetryPolicy()
        self._http = httpx.Client(
            base_url=root,
            transport=transport,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            headers={
                "Authorization": authorization_header(self._token),
                "Accept": "application/json",
                "User-Agent": user_agent,
            },
            follow_redirects=False,
        )

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Close the HTTP connection pool (and the transport)."""
        self._http.close()

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
        return f"MachinesClient(base_url={self._base_url!r}, app={self._app_name!r})"

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
                return self._machine(self._send("POST", path, json_body=body))
            except MachinesAPIError as err:
                if _is_ambiguous(err) or (was_ambiguous and _NAME_TAKEN.search(err.message)):
                    was_ambiguous = True
                    found = self._find_created(name, meta_filter, backoff, err)
                    if found is not None:
                        return found
                retryable = isinstance(err, RateLimited | TransportError) or _is_ambiguous(err)
                self._backoff_or_raise(err, retryable, backoff, "POST", path)

    def get(self, machine_id: str) -> Machine:
        """Fetch one Machine; raises :class:`MachineNotFound` if it does not exist."""
        return self._machine(self._call("GET", self._path(machine_id), idempotent=True))

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
        response = self._call(
            "POST", self._path(machine_id), json_body=body, nonce=nonce, idempotent=False
        )
        return self._machine(response)

    def start(self, machine_id: str, *, nonce: str | None = None) -> StartResult:
        """Start a created, stopped or suspended Machine.

        Retries the transient 412s of a start that follows a stop or an update too closely.
        Starting an already started (or starting) Machine succeeds with
        ``already_started=True``, whether Fly answers 200 or 412.
        """
        try:
            response = self._call(
                "POST",
                self._path(machine_id, "start"),
                nonce=nonce,
                idempotent=True,
                retry_if=_start_should_retry,
            )
        except PreconditionFailed as err:
            match = _ALREADY_STARTED.search(err.message)
            if match is None:
                raise
            logger.debug("start machine=%s: already %s", machine_id, match.group(1) or "started")
            return StartResult(previous_state=match.group(1) or "started", already_started=True)
        return StartResult.from_api(self._action_body(response))

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
            response = self._call(
                "POST",
                self._path(machine_id, "stop"),
                json_body=body or None,
                nonce=nonce,
                idempotent=True,
            )
        except PreconditionFailed as err:
            if _ALREADY_STOPPED.search(err.message) is None:
                raise
            logger.debug("stop machine=%s: already stopped", machine_id)
            return
        self._action_body(response)

    def suspend(self, machine_id: str, *, nonce: str | None = None) -> None:
        """Snapshot and suspend a started Machine (wait for ``suspended`` afterwards)."""
        try:
            response = self._call(
                "POST", self._path(machine_id, "suspend"), nonce=nonce, idempotent=True
            )
        except PreconditionFailed as err:
            if _ALREADY_SUSPENDED.search(err.message) is None:
                raise
            logger.debug("suspend machine=%s: already suspended", machine_id)
            return
        self._action_body(response)

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
        clock = self._retry.clock
        deadline = clock() + timeout
        backoff = self._retry.start(budget=timeout)
        last: MachinesAPIError | None = None
        while True:
            remaining = deadline - clock()
            if remaining <= 0 and last is not None:
                raise WaitTimeout(
                    408,
                    "deadline_exceeded",
                    f"machine {machine_id} did not reach {'|'.join(states)} within "
                    f"{timeout:g}s (last: {last.message})",
                    last.request_id,
                    "GET",
                    last.path,
                ) from last
            poll = max(_WAIT_MIN, min(_WAIT_MAX, math.ceil(remaining)))
            params: list[tuple[str, str]] = [("state", s) for s in states]
            params.append(("timeout", str(poll)))
            if instance_id:
                params.append(("instance_id", instance_id))
            sent_at = clock()
            try:
                self._send(
                    "GET",
                    path,
                    params=params,
                    timeout=httpx.Timeout(self._timeout, read=poll + _WAIT_READ_MARGIN),
                )
                return
            except WaitTimeout as err:
                last = err
                # A 408 long before the poll ran out (a proxy, a fault) must not spin.
                if clock() - sent_at < poll / 2:
                    self._retry.sleep(min(self._retry.delay(0), max(0.0, deadline - clock())))
            except MachineNotFound:
                if "destroyed" in states:
                    return
                raise
            except MachinesAPIError as err:
                if not _should_retry(err, idempotent=True):
                    raise
                # Transient trouble (429, 5xx, timeouts) counts against the wait's deadline;
                # once it has passed, the loop raises WaitTimeout naming the last error.
                last = err
                delay = backoff.next_delay()
                if delay is not None:
                    self._log_retry(err, "GET", path, backoff.attempts + 1, delay)
                    backoff.sleep(delay)

    def destroy(self, machine_id: str, *, force: bool = False, nonce: str | None = None) -> None:
        """Destroy the Machine; ``force`` kills it first if it is running.

        Sends ``?force=true&kill=true`` when forcing (Fly's docs use ``force``, fly-go
        ``kill``). A 404 after a retried attempt counts as success: the earlier attempt won.
        """
        params = [("force", "true"), ("kill", "true")] if force else None
        backoff = self._retry.start()
        try:
            self._call(
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
            response = self._call(
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
        data = self._json(response)
        if not isinstance(data, Mapping) or data.get("status") == "error":
            raise self._invalid(response, "lease response without a lease")
        try:
            return Lease.from_api(data)
        except ValueError as exc:
            raise self._invalid(response, str(exc)) from None

    def release_lease(self, machine_id: str, nonce: str) -> None:
        """Release a lease. A lease (or Machine) that is already gone counts as released."""
        try:
            self._call(
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
        response = self._call(
            "GET", self._path(), params=params or None, idempotent=True, backoff=backoff
        )
        data = self._json(response)
        if not isinstance(data, list):
            raise self._invalid(response, "expected a JSON array of Machines")
        try:
            machines = [Machine.from_api(item) for item in data if isinstance(item, Mapping)]
        except ValueError as exc:
            raise self._invalid(response, str(exc)) from None
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

    def _call(
        self,
        method: str,
        path: str,
        *,
        params: Sequence[tuple[str, str]] | None = None,
        json_body: Any = None,
        nonce: str | None = None,
        idempotent: bool,
        retry_if: Callable[[MachinesAPIError], bool] | None = None,
        backoff: Backoff | None = None,
    ) -> httpx.Response:
        """Send with retries; returns a 2xx response or raises the last error."""
        backoff = backoff if backoff is not None else self._retry.start()
        while True:
            try:
                return self._send(method, path, params=params, json_body=json_body, nonce=nonce)
            except MachinesAPIError as err:
                retryable = _should_retry(err, idempotent=idempotent) or (
                    retry_if is not None and retry_if(err)
                )
                self._backoff_or_raise(err, retryable, backoff, method, path)

    def _backoff_or_raise(
        self,
        err: MachinesAPIError,
        retryable: bool,
        backoff: Backoff,
        method: str,
        path: str,
    ) -> None:
        """Sleep before the next attempt, or re-raise ``err`` if that is not allowed."""
        err.attempts = backoff.attempts
        delay = backoff.next_delay() if retryable else None
        if delay is None:
            raise err
        self._log_retry(err, method, path, backoff.attempts + 1, delay)
        backoff.sleep(delay)

    @staticmethod
    def _log_retry(
        err: MachinesAPIError, method: str, path: str, attempt: int, delay: float
    ) -> None:
        logger.warning(
            "retrying method=%s path=%s attempt=%d delay=%.2fs error=%s",
            method,
            err.path or path,
            attempt,
            delay,
            _short(err),
        )

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: Sequence[tuple[str, str]] | None = None,
        json_body: Any = None,
        nonce: str | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> httpx.Response:
        """One attempt. Returns a 2xx response or raises a :class:`MachinesAPIError`."""
        request = self._http.build_request(
            method,
            path,
            params=list(params) if params else None,
            json=json_body,
            headers={NONCE_HEADER: nonce} if nonce else None,
            timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
        )
        shown = request.url.raw_path.decode("ascii", errors="replace")
        started = time.perf_counter()
        try:
            response = self._http.send(request)
        except httpx.TransportError as exc:
            elapsed = time.perf_counter() - started
            # Nothing was sent when the connection could not be made (or pooled).
            ambiguous = not isinstance(
                exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout
            )
            text = self._redact(str(exc)) or "no details"
            logger.debug(
                "request method=%s path=%s status=error elapsed=%.3fs error=%s",
                method,
                shown,
                elapsed,
                type(exc).__name__,
            )
            # `from None`: the httpx exception references the request and its headers.
            raise TransportError(
                None,
                None,
                f"{type(exc).__name__}: {text}",
                None,
                method,
                shown,
                ambiguous=ambiguous,
            ) from None
        elapsed = time.perf_counter() - started
        request_id = response.headers.get("fly-request-id")
        logger.debug(
            "request method=%s path=%s status=%d elapsed=%.3fs fly_request_id=%s",
            method,
            shown,
            response.status_code,
            elapsed,
            request_id,
        )
        if response.is_success:
            return response
        err = error_from_response(
            response.status_code,
            response.content,
            reason=response.reason_phrase,
            request_id=request_id,
            method=method,
            path=shown,
        )
        err.message = self._redact(err.message)
        raise err

    def _machine(self, response: httpx.Response) -> Machine:
        data = self._json(response)
        if not isinstance(data, Mapping):
            raise self._invalid(response, "expected a Machine object")
        try:
            return Machine.from_api(data)
        except ValueError as exc:
            raise self._invalid(response, str(exc)) from None

    def _json(self, response: httpx.Response) -> Any:
        try:
            return json.loads(response.content)
        except ValueError as exc:
            snippet = response.content[:120].decode("utf-8", errors="replace")
            raise self._invalid(response, f"malformed JSON ({exc}): {snippet!r}") from None

    def _action_body(self, response: httpx.Response) -> Mapping[str, Any]:
        """Body of start/stop/suspend: JSON, empty, or anything (the status is what counts)."""
        try:
            data = json.loads(response.content) if response.content.strip() else {}
        except ValueError:
            logger.debug("ignoring a non-JSON body on %s", response.request.url.path)
            return {}
        if not isinstance(data, Mapping):
            return {}
        if data.get("status") == "error":
            # fly-go/flyctl treat {"status": "error", "message": ...} on 200 as a failure.
            message = data.get("message")
            raise MachinesAPIError(
                response.status_code,
                data.get("code") if isinstance(data.get("code"), str) else None,
                self._redact(message if isinstance(message, str) else "action failed"),
                response.headers.get("fly-request-id"),
                response.request.method,
                response.request.url.raw_path.decode("ascii", errors="replace"),
            )
        return data

    def _invalid(self, response: httpx.Response, message: str) -> MachinesAPIError:
        return MachinesAPIError(
            response.status_code,
            "invalid_response",
            self._redact(message),
            response.headers.get("fly-request-id"),
            response.request.method,
            response.request.url.raw_path.decode("ascii", errors="replace"),
        )

    def _redact(self, text: str) -> str:
        """Belt and braces: remove the token should a server or proxy ever echo it."""
        if len(self._token) >= _MIN_REDACT and self._token in text:
            text = text.replace(self._token, "[redacted]")
        return text


def _should_retry(err: MachinesAPIError, *, idempotent: bool) -> bool:
    """Retry decision shared by every call except create (which has its own)."""
    if isinstance(err, RateLimited):
        return True
    if isinstance(err, TransportError):
        return idempotent or not err.ambiguous
    return idempotent and err.status in _RETRY_IF_IDEMPOTENT


def _is_ambiguous(err: MachinesAPIError) -> bool:
    """True when the failed request may nevertheless have taken effect."""
    if isinstance(err, TransportError):
        return err.ambiguous
    return err.status in _RETRY_IF_IDEMPOTENT


def _start_should_retry(err: MachinesAPIError) -> bool:
    return isinstance(err, PreconditionFailed) and _START_RETRY.search(err.message) is not None


def _state_list(state: str | Sequence[str]) -> list[str]:
    items = [state] if isinstance(state, str) else list(state)
    return [s.strip() for item in items for s in str(item).split(",") if s.strip()]


def _go_duration(seconds: float) -> str:
    """Seconds as a Go duration string (``"10s"``, ``"1500ms"``), the form Fly parses."""
    if seconds < 0 or math.isnan(seconds):
        raise ValueError("timeout must be a non-negative number of seconds")
    millis = round(seconds * 1000)
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def _short(err: MachinesAPIError) -> str:
    head = f"{err.status} " if err.status is not None else ""
    return f"{head}{err.code + ': ' if err.code else ''}{err.message}"
