"""Errors raised by the Machines API client.

Every failure the client reports is a :class:`MachinesAPIError`; the subclass says what kind::

    MachinesAPIError            any failed call; .status .code .message .request_id
     ├── Unauthorized           401 / 403: token missing, invalid or not allowed for the app
     ├── MachineNotFound        404: no such Machine (or it was destroyed)
     ├── WaitTimeout            408, or wait()'s own overall deadline passed
     ├── Conflict               409: version mismatch, concurrent update, host capacity
     │    └── LeaseHeld         409: someone else holds the Machine's lease
     ├── PreconditionFailed     412: wrong state for the action, no capacity
     ├── RateLimited            429: Fly's per-action rate limit (retried before it reaches you)
     └── TransportError         no HTTP response: connect/read timeout, reset, protocol error

Other statuses (400, 422, 5xx) raise the base class. A 2xx response whose body cannot be
decoded raises the base class with ``code == "invalid_response"``.

``code`` is the gRPC-style prefix Fly puts in front of its messages
(``{"error": "failed_precondition: machine still active, refusing to start"}`` gives
``code="failed_precondition"``, ``message="machine still active, refusing to start"``). When
there is no such prefix it falls back to the ``code`` of the lease envelope
(``{"status": "error", "message": ..., "code": "invalid"}``) or the ``status`` of the spec's
error response (``"insufficient_capacity"``, ``"name_taken"``), else ``None``.

Nothing here ever holds request headers, so no error can carry the API token; the client
passes every message through its :class:`~.redaction.Redactor` in case a server echoed it.

The predicates at the end (:func:`is_still_active`, :func:`is_already_started`, ...) read
Fly's free-text messages, so that the client's retry and no-op decisions are named, tested
in one place, and the regexes live next to the error classes they inspect.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "Conflict",
    "LeaseHeld",
    "MachineNotFound",
    "MachinesAPIError",
    "PreconditionFailed",
    "RateLimited",
    "TransportError",
    "Unauthorized",
    "WaitTimeout",
    "current_state",
    "error_from_response",
    "is_already_started",
    "is_already_stopped",
    "is_already_suspended",
    "is_name_taken",
    "is_still_active",
]

# Canonical gRPC status codes, as flyd spells them in message prefixes.
_GRPC_CODES = (
    "cancelled",
    "unknown",
    "invalid_argument",
    "deadline_exceeded",
    "not_found",
    "already_exists",
    "permission_denied",
    "resource_exhausted",
    "failed_precondition",
    "aborted",
    "out_of_range",
    "unimplemented",
    "internal",
    "unavailable",
    "data_loss",
    "unauthenticated",
)
# The prefix is usually at the start, but wrappers put context in front of it
# ("failed to launch VM: resource_exhausted: rate limit exceeded").
_CODE_RE = re.compile(r"(?:^|:\s)(" + "|".join(_GRPC_CODES) + r"):\s*")
_MAX_MESSAGE = 500


class MachinesAPIError(Exception):
    """A Machines API call failed.

    Attributes:
        status: HTTP status, or ``None`` when no response arrived (:class:`TransportError`).
        code: Fly's gRPC-style error code (``"failed_precondition"``), or ``None``.
        message: Fly's message without the code prefix.
        request_id: the ``fly-request-id`` response header, for Fly support.
        method, path: the request that failed (path includes the query, never headers).
        attempts: how many times the client sent the request before giving up.
    """

    def __init__(
        self,
        status: int | None,
        code: str | None,
        message: str,
        request_id: str | None = None,
        method: str | None = None,
        path: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.method = method
        self.path = path
        self.attempts = 1

    def __str__(self) -> str:
        head = f"{self.status} " if self.status is not None else ""
        text = f"{head}{self.code}: {self.message}" if self.code else f"{head}{self.message}"
        where = [f"{self.method} {self.path}"] if self.method and self.path else []
        if self.request_id:
            where.append(f"fly-request-id={self.request_id}")
        if self.attempts > 1:
            where.append(f"after {self.attempts} attempts")
        return f"{text} ({', '.join(where)})" if where else text

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, "
            f"message={self.message!r}, request_id={self.request_id!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep errors picklable (RQ stores exceptions) despite the custom __init__.
        args = (self.status, self.code, self.message, self.request_id, self.method, self.path)
        return (type(self), args, self.__dict__)


class Unauthorized(MachinesAPIError):
    """401/403: the API token is missing, invalid, or lacks access to the app."""


class MachineNotFound(MachinesAPIError):
    """404: the Machine (or app, or route) does not exist."""


class WaitTimeout(MachinesAPIError):
    """The Machine did not reach the wanted state in time (408 or wait()'s own deadline)."""


class Conflict(MachinesAPIError):
    """409: version mismatch, concurrent update, or the host lacks capacity."""


class LeaseHeld(Conflict):
    """409: another holder has the Machine's lease; pass its nonce or wait for expiry."""


class PreconditionFailed(MachinesAPIError):
    """412: the Machine is in the wrong state for the action, or no capacity was found."""


class RateLimited(MachinesAPIError):
    """429: Fly's rate limit (about 1 request/s per action and Machine) was hit."""


class TransportError(MachinesAPIError):
    """No usable HTTP response: connection refused, timeout, reset, protocol error.

    ``ambiguous`` is True when the request may have reached Fly (read timeout, reset after
    sending), so a non-idempotent call such as create may or may not have taken effect.
    """

    def __init__(
        self,
        status: int | None,
        code: str | None,
        message: str,
        request_id: str | None = None,
        method: str | None = None,
        path: str | None = None,
        ambiguous: bool = True,
    ) -> None:
        super().__init__(status, code, message, request_id, method, path)
        self.ambiguous = ambiguous

    def __reduce__(self) -> tuple[Any, ...]:
        args = (
            self.status,
            self.code,
            self.message,
            self.request_id,
            self.method,
            self.path,
            self.ambiguous,
        )
        return (type(self), args, self.__dict__)


_BY_STATUS: dict[int, type[MachinesAPIError]] = {
    401: Unauthorized,
    403: Unauthorized,
    404: MachineNotFound,
    408: WaitTimeout,
    409: Conflict,
    412: PreconditionFailed,
    429: RateLimited,
}


def split_code(text: str) -> tuple[str | None, str]:
    """Split ``"failed_precondition: machine still active"`` into code and message."""
    match = _CODE_RE.search(text)
    if match is None:
        return None, text
    if match.start() == 0:
        return match.group(1), text[match.end() :]
    # Keep the wrapper's context; only the code is lifted out.
    return match.group(1), text


def parse_error_body(body: bytes, reason: str) -> tuple[str | None, str]:
    """Return ``(code, message)`` from any error body shape Fly is known to send.

    Shapes: ``{"error": "<code>: <msg>"}`` (optionally with ``status``/``message``),
    the lease envelope ``{"status": "error", "message": ..., "code": ...}``, plain text,
    and empty bodies (the HTTP reason phrase is used).
    """
    text = body.decode("utf-8", errors="replace").strip()
    if not text:
        return None, reason or "no response body"
    try:
        data: Any = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, Mapping):
        # Plain text ("404 page not found", proxies) or JSON that is not an object.
        return split_code(_truncate(text))
    raw = data.get("error") or data.get("message") or data.get("detail")
    message = raw if isinstance(raw, str) else _truncate(text)
    code, message = split_code(_truncate(message))
    if code is None:
        fallback = data.get("code")
        status = data.get("status")
        if isinstance(fallback, str) and fallback:
            code = fallback
        elif isinstance(status, str) and status not in ("", "error", "unknown"):
            code = status
    return code, message


def error_from_response(
    status: int,
    body: bytes,
    *,
    reason: str = "",
    request_id: str | None = None,
    method: str | None = None,
    path: str | None = None,
    redact: Callable[[str], str] | None = None,
) -> MachinesAPIError:
    """Build the right :class:`MachinesAPIError` subclass for a non-2xx response.

    ``redact`` cleans the message before the error exists, so no attribute (not even
    ``args``) ever holds what it removes.
    """
    code, message = parse_error_body(body, reason)
    if redact is not None:
        message = redact(message)
    cls = _BY_STATUS.get(status, MachinesAPIError)
    lowered = message.lower()
    if cls is Conflict and "lease" in lowered and "held" in lowered:
        cls = LeaseHeld
    elif cls is MachinesAPIError and code == "resource_exhausted" and "rate limit" in lowered:
        # Rate limiting reported under another status by a proxy layer.
        cls = RateLimited
    return cls(status, code, message, request_id, method, path)


def _truncate(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "…"


# -- what Fly's messages say ----------------------------------------------------------------

_CURRENT_STATE = re.compile(r"current state: '([a-z_]+)'", re.IGNORECASE)
_STILL_ACTIVE = re.compile(r"still active|getting replaced", re.IGNORECASE)
# States a start meets while the previous run, an update or a suspend is still settling.
_SETTLING = frozenset({"created", "replacing", "stopping", "suspending"})
_ALREADY = {
    "started": (re.compile(r"already (?:started|running)", re.IGNORECASE), {"started", "starting"}),
    "stopped": (re.compile(r"already stopped", re.IGNORECASE), {"stopped", "stopping"}),
    "suspended": (re.compile(r"already suspended", re.IGNORECASE), {"suspended", "suspending"}),
}
_NAME_TAKEN = re.compile(r"already exists|name.{0,20}taken|unique", re.IGNORECASE)


def current_state(error: MachinesAPIError) -> str | None:
    """The state a 412 names (``unable to start machine from current state: 'stopping'``)."""
    match = _CURRENT_STATE.search(error.message)
    return match.group(1).lower() if match else None


def is_still_active(error: MachinesAPIError) -> bool:
    """A start refused for a moment: the previous run, an update or a suspend is settling.

    ``machine still active, refusing to start`` (right after a stop), ``machine getting
    replaced``, and ``current state: 'created'/'replacing'/'stopping'/'suspending'``. Fly
    accepts the same start shortly after, so the client retries it.
    """
    if not isinstance(error, PreconditionFailed):
        return False
    return bool(_STILL_ACTIVE.search(error.message)) or current_state(error) in _SETTLING


def is_already_started(error: MachinesAPIError) -> bool:
    """A start refused because the Machine is started or starting: the start is a no-op."""
    return _is_already(error, "started")


def is_already_stopped(error: MachinesAPIError) -> bool:
    """A stop refused because the Machine is stopped or stopping: the stop is a no-op."""
    return _is_already(error, "stopped")


def is_already_suspended(error: MachinesAPIError) -> bool:
    """A suspend refused because the Machine is suspended or suspending: a no-op."""
    return _is_already(error, "suspended")


def is_name_taken(error: MachinesAPIError) -> bool:
    """A create refused because a Machine of that name exists (``already_exists``)."""
    return bool(_NAME_TAKEN.search(error.message)) or error.code == "name_taken"


def _is_already(error: MachinesAPIError, state: str) -> bool:
    if not isinstance(error, PreconditionFailed):
        return False
    words, states = _ALREADY[state]
    return current_state(error) in states or bool(words.search(error.message))
