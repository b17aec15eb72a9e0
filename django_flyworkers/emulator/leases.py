"""Machine leases: acquire, refresh, check, release. Pure functions of a Machine and a time."""

from __future__ import annotations

import random

from .errors import ApiError
from .ids import go_time, new_ulid, rfc3339
from .model import Lease, Machine

DEFAULT_LEASE_TTL = 30
LEASE_OWNER = "emulator@tokens.fly.io"


def _held(m: Machine, lease: Lease, expires: str) -> str:
    return f"machine ID {m.id} lease currently held by {lease.owner}, expires at {expires}"


def check(m: Machine, now: float, nonce: str | None) -> None:
    """409 unless the Machine is unleased or `nonce` is its lease's nonce."""
    lease = m.live_lease(now)
    if lease is not None and nonce != lease.nonce:
        # Fly writes RFC 3339 here and Go's default time format in the lease envelope.
        raise ApiError(409, "aborted", _held(m, lease, rfc3339(lease.expires_at)))


def acquire(
    m: Machine,
    now: float,
    rng: random.Random,
    *,
    ttl: int,
    description: str,
    nonce: str | None,
) -> Lease:
    """Take a lease, or refresh it when `nonce` matches the current one."""
    if ttl <= 0:
        raise ApiError(400, "invalid", f"invalid lease ttl {ttl}: must be positive", lease=True)
    lease = m.live_lease(now)
    if lease is not None and nonce != lease.nonce:
        raise ApiError(409, "invalid", _held(m, lease, go_time(lease.expires_at)), lease=True)
    if lease is not None:
        lease.expires_at = now + ttl
        if description:
            lease.description = description
        return lease
    m.lease = Lease(
        nonce=f"{rng.getrandbits(48):012x}",
        owner=LEASE_OWNER,
        description=description,
        expires_at=now + ttl,
        version=new_ulid(now, rng),
    )
    return m.lease


def current(m: Machine, now: float) -> Lease:
    """The live lease, or 404 in the lease envelope."""
    lease = m.live_lease(now)
    if lease is None:
        raise ApiError(404, "not_found", f"machine ID {m.id} lease not found", lease=True)
    return lease


def release(m: Machine, now: float, nonce: str | None) -> None:
    """Drop the lease; the header must carry its nonce."""
    lease = current(m, now)
    if not nonce:
        raise ApiError(
            400,
            "invalid",
            "releasing a lease requires the fly-machine-lease-nonce header",
            lease=True,
        )
    if nonce != lease.nonce:
        raise ApiError(400, "invalid", f"machine ID {m.id} lease nonce does not match", lease=True)
    m.lease = None
