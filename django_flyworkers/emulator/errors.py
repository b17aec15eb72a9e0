"""Errors in Fly's shape, and the constructors for the common ones."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

JSON = dict[str, Any]


class ApiError(Exception):
    """An error response in Fly's shape: HTTP status, gRPC-style code and message.

    Rendered as ``{"error": "<code>: <message>"}``, or for lease endpoints as
    ``{"status": "error", "message": ..., "code": ...}``.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        lease: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.lease = lease
        self.extra = dict(extra or {})

    def body(self) -> JSON:
        """The JSON body Fly would send for this error."""
        if self.lease:
            return {"status": "error", "message": self.message, "code": self.code}
        text = f"{self.code}: {self.message}" if self.code else self.message
        return {"error": text, **self.extra}


def bad_request(message: str) -> ApiError:
    """400 ``invalid_argument``."""
    return ApiError(400, "invalid_argument", message)


def not_found(what: str = "machine") -> ApiError:
    """404 ``not_found: <what> not found``."""
    return ApiError(404, "not_found", f"{what} not found")


def wrong_state(verb: str, state: str) -> ApiError:
    """412 in the wording Fly uses for a start from the wrong state."""
    return ApiError(
        412, "failed_precondition", f"unable to {verb} machine from current state: '{state}'"
    )


def precondition(message: str) -> ApiError:
    """412 ``failed_precondition``."""
    return ApiError(412, "failed_precondition", message)
