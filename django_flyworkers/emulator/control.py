"""A small httpx client for the emulator's ``/_emulator/`` control endpoints (for tests)."""

from __future__ import annotations

from typing import Any

import httpx

from django_flyworkers.machines._transport import tls_verify


class EmulatorControlError(RuntimeError):
    """A control call failed; the message carries the emulator's answer."""


class EmulatorControl:
    """Drive an emulator from tests: reset it, inject faults, kill Machines, read stats.

    Usage::

        ctl = EmulatorControl(srv.url, "T")
        ctl.fault("start", status=503, count=2)
        ctl.kill(machine_id)
        assert ctl.stats()["machines"][machine_id]["state"] == "stopped"

    Pass ``transport=httpx.WSGITransport(app=emulator)`` to talk to an in-process emulator.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 10.0,
    ) -> None:
        self._client = httpx.Client(
            base_url=base_url,
            headers={"Authorization": f"Bearer {token}"},
            transport=transport,
            timeout=timeout,
            verify=tls_verify(base_url),
        )

    def reset(self) -> None:
        """Kill all processes, forget all Machines, clear faults, latency and counters."""
        self._call("POST", "/_emulator/reset")

    def stats(self) -> dict[str, Any]:
        """``{"machines": {id: {...}}, "total_billed_seconds", "calls", "rate_limited", ...}``."""
        result: dict[str, Any] = self._call("GET", "/_emulator/stats")
        return result

    def fault(
        self,
        action: str,
        status: int = 500,
        count: int = 1,
        message: str | None = None,
        *,
        after: bool = False,
    ) -> None:
        """Fail the next `count` calls of `action` (``after=True``: apply them, then fail)."""
        body = {"action": action, "status": status, "count": count, "after": after}
        if message is not None:
            body["message"] = message
        self._call("POST", "/_emulator/faults", json=body)

    def clear_faults(self) -> None:
        """Remove pending faults and latency."""
        self._call("DELETE", "/_emulator/faults")

    def latency(self, action: str, seconds: float, *, after: bool = False) -> None:
        """Delay every call of `action` by `seconds` (0 removes the delay).

        With ``after=True`` the call takes effect at once and only its answer is late.
        """
        body = {"action": action, "seconds": seconds, "after": after}
        self._call("POST", "/_emulator/latency", json=body)

    def kill(self, machine_id: str) -> dict[str, Any]:
        """SIGKILL the Machine's process group; it then exits as a crash would."""
        result: dict[str, Any] = self._call("POST", f"/_emulator/machines/{machine_id}/kill")
        return result

    def set_rate_limits(self, enabled: bool, *, speed: float = 1.0) -> None:
        """Turn Fly's rate limits on or off, with fresh buckets.

        `speed` multiplies the refill rates (1 is Fly's; bursts stay Fly's): a test of
        behaviour under 429s can use 20 to see buckets refill twenty times faster.
        """
        self._call("POST", "/_emulator/rate_limits", json={"enabled": enabled, "speed": speed})

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> EmulatorControl:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, method: str, path: str, json: Any = None) -> Any:
        response = self._client.request(method, path, json=json)
        if response.status_code >= 400:
            raise EmulatorControlError(
                f"{method} {path} -> {response.status_code}: {response.text.strip()}"
            )
        return response.json()
