"""Identifiers and time formats the way Fly writes them."""

from __future__ import annotations

import random
from datetime import UTC, datetime

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
ADJECTIVES = ("aged", "bold", "calm", "dark", "eager", "green", "icy", "late", "misty", "quiet")
NOUNS = ("breeze", "cloud", "dawn", "field", "frost", "lake", "moon", "rain", "river", "wind")


def new_ulid(now: float, rng: random.Random) -> str:
    """A 26-character ULID: 48 bits of milliseconds, 80 random bits, Crockford base32."""
    value = (int(now * 1000) << 80) | rng.getrandbits(80)
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -5, -5))


def machine_name(rng: random.Random) -> str:
    """A Fly-style generated name such as ``misty-river-4821``."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}-{rng.randrange(1000, 10000)}"


def rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def go_time(timestamp: float) -> str:
    """Go's default time format, as used in the lease-conflict message."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S +0000 UTC")
