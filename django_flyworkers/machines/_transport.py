"""The client's plumbing: one HTTP attempt, retries around it, and decoding of bodies.

:class:`Session` owns the ``httpx.Client`` and the :class:`~.redaction.Redactor`; every byte
a server sends passes the redactor before it can reach an error, a log line or a caller.
Private to :mod:`django_flyworkers.machines`: :class:`~.client.MachinesClient` is the API.
"""

from __future__ import annotations

import functools
import json
import logging
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata as importlib_metadata
from typing import Any

import httpx

from .errors import MachinesAPIError, RateLimited, TransportError, error_from_response
from .redaction import Redactor
from .retry import Backoff, RetryPolicy

logger = logging.getLogger("django_flyworkers.machines")


def tls_verify(base_url: str) -> ssl.SSLContext | bool:
    """What a client of ``base_url`` gives httpx as ``verify``.

    Left to itself httpx builds a TLS context for every client, reading the whole CA bundle:
    about 20 ms of CPU, paid on every cold boot of a worker Machine. A plain-HTTP client (Fly's
    ``http://_api.internal:4280``, a Machine's local socket, the emulator) never makes a TLS
    handshake, since it follows no redirects, so it gets no context; HTTPS clients share one
    per process.
    """
    if base_url.startswith("http://"):
        return False
    return _shared_tls_context()


@functools.cache
def _shared_tls_context() -> ssl.SSLContext:
    # httpx's own default (certifi's bundle, SSL_CERT_FILE / SSL_CERT_DIR honoured), built once.
    return httpx.create_ssl_context(verify=True)


NONCE_HEADER = "fly-machine-lease-nonce"
# fly-go sends macaroons (fm1r_/fm1a_/fm2_) with the FlyV1 scheme, everything else as Bearer.
_MACAROON_PREFIXES = ("fm1r_", "fm1a_", "fm2_")
# Statuses that are safe to retry when repeating the request cannot do harm.
RETRY_IF_IDEMPOTENT = frozenset({408, 500, 502, 503, 504})
# Nothing was sent when the connection could not be made (or pooled).
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# How much of an undecodable body an error quotes.
_SNIPPET = 120


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


def should_retry(err: MachinesAPIError, *, idempotent: bool) -> bool:
    """Retry decision shared by every call except create (which has its own)."""
    if isinstance(err, RateLimited):
        return True
    if isinstance(err, TransportError):
        return idempotent or not err.ambiguous
    return idempotent and err.status in RETRY_IF_IDEMPOTENT


def is_ambiguous(err: MachinesAPIError) -> bool:
    """True when the failed request may nevertheless have taken effect."""
    if isinstance(err, TransportError):
        return err.ambiguous
    return err.status in RETRY_IF_IDEMPOTENT


class Session:
    """One ``httpx.Client`` plus the retry policy and the redactor of the token it sends."""

    def __init__(self, http: httpx.Client, retry: RetryPolicy, redactor: Redactor) -> None:
        self.http = http
        self.retry = retry
        self.redact = redactor

    def close(self) -> None:
        self.http.close()

    # -- sending -----------------------------------------------------------------------

    def call(
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
        backoff = backoff if backoff is not None else self.retry.start()
        while True:
            try:
                return self.send(method, path, params=params, json_body=json_body, nonce=nonce)
            except MachinesAPIError as err:
                retryable = should_retry(err, idempotent=idempotent) or (
                    retry_if is not None and retry_if(err)
                )
                self.backoff_or_raise(err, retryable, backoff, method, path)

    def send(
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
        request = self.http.build_request(
            method,
            path,
            params=list(params) if params else None,
            json=json_body,
            headers={NONCE_HEADER: nonce} if nonce else None,
            timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
        )
        shown = _shown_path(request)
        started = time.perf_counter()
        try:
            response = self.http.send(request)
        except httpx.TransportError as exc:
            _log_request(method, shown, "error", time.perf_counter() - started, type(exc).__name__)
            # `from None`: the httpx exception references the request and its headers.
            raise self._transport_error(exc, method, shown) from None
        request_id = response.headers.get("fly-request-id")
        elapsed = time.perf_counter() - started
        _log_request(method, shown, response.status_code, elapsed, request_id)
        if response.is_success:
            return response
        raise error_from_response(
            response.status_code,
            self.redact.redact_bytes(response.content),
            reason=response.reason_phrase,
            request_id=request_id,
            method=method,
            path=shown,
            redact=self.redact,
        )

    def _transport_error(
        self, exc: httpx.TransportError, method: str, shown: str
    ) -> TransportError:
        text = self.redact(str(exc)) or "no details"
        return TransportError(
            None,
            None,
            f"{type(exc).__name__}: {text}",
            None,
            method,
            shown,
            ambiguous=not isinstance(exc, _NOT_SENT),
        )

    # -- retrying ----------------------------------------------------------------------

    def backoff_or_raise(
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
        self.pause(err, backoff, delay, method, path)

    @staticmethod
    def pause(
        err: MachinesAPIError, backoff: Backoff, delay: float, method: str, path: str
    ) -> None:
        """Log the retry that ``err`` causes, then sleep ``delay`` seconds."""
        logger.warning(
            "retrying method=%s path=%s attempt=%d delay=%.2fs error=%s",
            method,
            err.path or path,
            backoff.attempts + 1,
            delay,
            short(err),
        )
        backoff.sleep(delay)

    # -- decoding ----------------------------------------------------------------------

    def json(self, response: httpx.Response) -> Any:
        """The decoded JSON body, or an ``invalid_response`` error quoting its start."""
        try:
            return json.loads(response.content)
        except ValueError as exc:
            # Redact the whole body before cutting it, so no cut can split an echoed token.
            body = self.redact(response.content.decode("utf-8", errors="replace"))
            snippet = body[:_SNIPPET]
            raise self.invalid(response, f"malformed JSON ({exc}): {snippet!r}") from None

    def action_body(self, response: httpx.Response) -> Mapping[str, Any]:
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
            code = data.get("code")
            raise MachinesAPIError(
                response.status_code,
                code if isinstance(code, str) else None,
                self.redact(message if isinstance(message, str) else "action failed"),
                response.headers.get("fly-request-id"),
                response.request.method,
                _shown_path(response.request),
            )
        return data

    def invalid(self, response: httpx.Response, message: str) -> MachinesAPIError:
        """An ``invalid_response`` error for a 2xx answer the client cannot use."""
        return MachinesAPIError(
            response.status_code,
            "invalid_response",
            self.redact(message),
            response.headers.get("fly-request-id"),
            response.request.method,
            _shown_path(response.request),
        )


def short(err: MachinesAPIError) -> str:
    """``"429 resource_exhausted: rate limit exceeded"``: status, code and message."""
    head = f"{err.status} " if err.status is not None else ""
    return f"{head}{err.code + ': ' if err.code else ''}{err.message}"


def _shown_path(request: httpx.Request) -> str:
    """Path and query of a request, as errors and logs show it (never a header)."""
    return request.url.raw_path.decode("ascii", errors="replace")


def _log_request(
    method: str, path: str, status: int | str, elapsed: float, extra: str | None
) -> None:
    if status == "error":
        logger.debug(
            "request method=%s path=%s status=error elapsed=%.3fs error=%s",
            method,
            path,
            elapsed,
            extra,
        )
    else:
        logger.debug(
            "request method=%s path=%s status=%s elapsed=%.3fs fly_request_id=%s",
            method,
            path,
            status,
            elapsed,
            extra,
        )
