"""HTTP plumbing: requests and responses, the route table type, and query-string helpers."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from .config import parse_duration
from .errors import JSON, bad_request

if TYPE_CHECKING:
    from .app import Emulator

StartResponse = Callable[..., Any]
TEXT = "text/plain; charset=utf-8"
WAIT_RANGE_ERROR = "invalid WaitMachineRequest.Timeout: value must be inside range [1s, 1m0s]"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    raw_body: bytes
    params: dict[str, str] = field(default_factory=dict)
    local_machine: str | None = None
    """Set when the request came in on a Machine's local API socket (no token there)."""

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def flag(self, name: str) -> bool:
        value = self.arg(name)
        return value is not None and value.lower() in ("", "1", "true", "yes", "t")

    @property
    def nonce(self) -> str | None:
        return self.headers.get("fly-machine-lease-nonce") or None

    def json(self) -> JSON:
        if not self.raw_body.strip():
            return {}
        try:
            body = json.loads(self.raw_body)
        except ValueError as exc:
            raise bad_request(f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise bad_request("request body must be a JSON object")
        return body


@dataclass
class Response:
    status: int
    body: Any = None
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[["Emulator", Request], Response]


@dataclass(frozen=True)
class Route:
    """One route: method, path pattern, action (for faults, limits, stats; "" for control)."""

    method: str
    pattern: re.Pattern[str]
    action: str
    handler: Handler


def route(method: str, pattern: str, action: str, handler: Handler) -> Route:
    return Route(method, re.compile(pattern + "/?"), action, handler)


def parse(environ: Mapping[str, Any], local_machine: str | None = None) -> Request:
    """A `Request` from a WSGI environ."""
    headers = {
        k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")
    }
    if environ.get("CONTENT_TYPE"):
        headers["content-type"] = environ["CONTENT_TYPE"]
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    body = environ["wsgi.input"].read(length) if length > 0 else b""
    # WSGI hands the path over as latin-1 decoded bytes.
    path = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8", "replace")
    return Request(
        method=environ.get("REQUEST_METHOD", "GET").upper(),
        path=path,
        query=parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True),
        headers=headers,
        raw_body=body,
        local_machine=local_machine,
    )


def send(response: Response, start_response: StartResponse) -> Iterable[bytes]:
    """Encode `response` and hand it to the WSGI server."""
    if response.body is None:
        payload = b""
    elif response.content_type == "application/json":
        payload = json.dumps(response.body).encode()
    else:
        payload = str(response.body).encode()
    reason = HTTPStatus(response.status).phrase
    headers = [
        ("Content-Type", response.content_type),
        ("Content-Length", str(len(payload))),
        ("fly-request-id", uuid.uuid4().hex),
        *response.headers,
    ]
    start_response(f"{response.status} {reason}", headers)
    return [payload]


def wait_timeout(value: str | None) -> float:
    """The ``timeout`` of a wait: 1-60 seconds, default 60, else Fly's 400."""
    if value is None or value == "":
        return 60.0
    try:
        seconds = float(value)
    except ValueError:
        parsed = parse_duration(value, "timeout")
        seconds = parsed or 0.0
    if not 1 <= seconds <= 60:
        raise bad_request(WAIT_RANGE_ERROR)
    return seconds


def int_arg(value: str | None, default: int, name: str) -> int:
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise bad_request(f"{name} must be an integer") from None
