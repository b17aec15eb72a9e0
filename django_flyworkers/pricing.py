"""What Machines cost: Fly's published per-second prices, and the ``PRICES`` override.

Source: https://fly.io/docs/about/pricing/ ("Started Fly Machines", region ``iad``, read
2025-08-19). Fly bills a started Machine per second at the price of its CPU preset plus about
$5 per 30 days for each GB of RAM above the preset's; a stopped (or suspended) Machine costs
only its root filesystem, $0.15 per GB per 30 days. Other regions cost up to ~40% more; set
``FLYWORKERS["PRICES"]`` to your region's figures (or your reservation discount).

The published table is kept as it is (``PUBLISHED``); a guest it does not list is priced with
the same linear rule Fly uses: ``cpus x cpu price + memory GB x memory price``. That rule
reproduces every published row to within 0.2%, the rounding of the published figures
(a test holds it to that).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SOURCE = "https://fly.io/docs/about/pricing/"
SOURCE_DATE = "2025-08-19"
THIRTY_DAYS = 30 * 86400

PUBLISHED: Mapping[tuple[str, int, int], float] = {
    # (cpu_kind, cpus, memory_mb): USD per second, as published (iad)
    ("shared", 1, 256): 0.00000075,
    ("shared", 1, 512): 0.00000123,
    ("shared", 1, 1024): 0.00000220,
    ("shared", 1, 2048): 0.00000413,
    ("shared", 2, 512): 0.00000150,
    ("shared", 2, 1024): 0.00000246,
    ("shared", 2, 2048): 0.00000440,
    ("shared", 2, 4096): 0.00000826,
    ("shared", 4, 1024): 0.00000300,
    ("shared", 4, 2048): 0.00000493,
    ("shared", 4, 4096): 0.00000879,
    ("shared", 4, 8192): 0.00001651,
    ("shared", 8, 2048): 0.00000600,
    ("shared", 8, 4096): 0.00000986,
    ("shared", 8, 8192): 0.00001758,
    ("shared", 8, 16384): 0.00003302,
    ("performance", 1, 2048): 0.00001196,
    ("performance", 1, 4096): 0.00001582,
    ("performance", 1, 8192): 0.00002354,
    ("performance", 2, 4096): 0.00002392,
    ("performance", 2, 8192): 0.00003164,
    ("performance", 2, 16384): 0.00004708,
    ("performance", 4, 8192): 0.00004784,
    ("performance", 4, 16384): 0.00006328,
    ("performance", 4, 32768): 0.00009416,
    ("performance", 8, 16384): 0.00009568,
    ("performance", 8, 32768): 0.00012656,
    ("performance", 8, 65536): 0.00018832,
    ("performance", 16, 32768): 0.00019136,
    ("performance", 16, 65536): 0.00025312,
    ("performance", 16, 131072): 0.00037664,
}

MEMORY_GB_PER_SECOND = 5.0 / THIRTY_DAYS
"""About $5 per 30 days per GB of RAM."""
CPU_PER_SECOND: Mapping[str, float] = {
    # The smallest preset of each kind minus its RAM: shared-cpu-1x has 256 MB, performance-1x
    # 2 GB.
    "shared": PUBLISHED[("shared", 1, 256)] - 0.25 * MEMORY_GB_PER_SECOND,
    "performance": PUBLISHED[("performance", 1, 2048)] - 2 * MEMORY_GB_PER_SECOND,
}
ROOTFS_GB_PER_SECOND = 0.15 / THIRTY_DAYS
ROOTFS_GB = 1.0
"""Assumed root filesystem of a worker Machine (Fly bills what the image uses)."""


@dataclass(frozen=True)
class Prices:
    """Per-second prices for started Machines and the root filesystem of stopped ones."""

    cpu_per_second: Mapping[str, float] = field(default_factory=lambda: dict(CPU_PER_SECOND))
    memory_gb_per_second: float = MEMORY_GB_PER_SECOND
    rootfs_gb_per_second: float = ROOTFS_GB_PER_SECOND
    rootfs_gb: float = ROOTFS_GB
    published: Mapping[tuple[str, int, int], float] = field(default_factory=lambda: PUBLISHED)
    source: str = f"{SOURCE} ({SOURCE_DATE}, iad)"

    def started_per_second(self, cpu_kind: str, cpus: int, memory_mb: int) -> float:
        """USD per second while a Machine of this guest is started."""
        exact = self.published.get((cpu_kind, cpus, memory_mb))
        if exact is not None:
            return exact
        cpu = self.cpu_per_second.get(cpu_kind, self.cpu_per_second.get("shared", 0.0))
        return cpus * cpu + memory_mb / 1024 * self.memory_gb_per_second

    @property
    def stopped_per_second(self) -> float:
        """USD per second for a stopped or suspended Machine (its root filesystem)."""
        return self.rootfs_gb * self.rootfs_gb_per_second


DEFAULT = Prices()


def _as_mapping(value: Any) -> Mapping[str, Any]:
    if isinstance(value, Mapping):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return vars(value) if hasattr(value, "__dict__") else {}


def _number(raw: Mapping[str, Any], *names: str) -> float | None:
    lowered = {str(key).lower(): value for key, value in raw.items()}
    for name in names:
        value = lowered.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def from_override(raw: Any) -> Prices:
    """Prices from ``FLYWORKERS["PRICES"]``; what it leaves out keeps Fly's published value.

    Read keys (case-insensitive): ``shared`` / ``performance`` mappings with
    ``cpu_per_second`` and ``memory_gb_per_second``, a top-level ``memory_gb_per_second``,
    ``rootfs_gb_per_second`` (or ``rootfs_gb_month``) and ``rootfs_gb``. Overriding any
    started-Machine rate replaces the published table with the linear rule.
    """
    data = _as_mapping(raw)
    if not data:
        return DEFAULT
    lowered = {str(key).lower(): value for key, value in data.items()}
    cpu = dict(CPU_PER_SECOND)
    memory = _number(data, "memory_gb_per_second")
    for kind in ("shared", "performance"):
        per_kind = _as_mapping(lowered.get(kind) or {})
        rate = _number(per_kind, "cpu_per_second")
        if rate is not None:
            cpu[kind] = rate
        memory = _number(per_kind, "memory_gb_per_second") or memory
    rootfs = _number(data, "rootfs_gb_per_second")
    monthly = _number(data, "rootfs_gb_month", "rootfs_gb_per_month")
    if rootfs is None and monthly is not None:
        rootfs = monthly / THIRTY_DAYS
    changed_rates = cpu != dict(CPU_PER_SECOND) or memory is not None
    return Prices(
        cpu_per_second=cpu,
        memory_gb_per_second=MEMORY_GB_PER_SECOND if memory is None else memory,
        rootfs_gb_per_second=ROOTFS_GB_PER_SECOND if rootfs is None else rootfs,
        rootfs_gb=_number(data, "rootfs_gb") or ROOTFS_GB,
        published={} if changed_rates else PUBLISHED,
        source="FLYWORKERS['PRICES']",
    )


def current() -> Prices:
    """The prices in use: ``FLYWORKERS["PRICES"]`` over Fly's published ones."""
    from django_flyworkers.conf import get_settings, raw_settings

    override = getattr(get_settings(), "prices", None)
    if override is None:  # read the raw setting too, for settings parsed without PRICES
        override = raw_settings().get("PRICES")
    return from_override(override) if override else DEFAULT
