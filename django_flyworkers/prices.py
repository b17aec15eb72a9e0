"""What a Machine costs per second, from Fly's published prices (``FLYWORKERS['PRICES']``
overrides them).

Fly prices a started Machine as its size preset plus the memory above what the preset includes,
both per second, and a stopped or suspended Machine by the root filesystem it keeps:

- a preset (``shared-cpu-Nx``, ``performance-Nx``) is N times the 1-CPU price, and includes
  256 MB (shared) or 2 GB (performance) of memory per CPU;
- memory above that costs the same per GB for both kinds;
- a stopped Machine's root filesystem costs per GB it uses.

So two numbers per CPU kind and one for the root filesystem express the whole table::

    FLYWORKERS["PRICES"] = {
        "shared": {"cpu_per_second": 7.5e-07, "memory_gb_per_second": 1.93e-06},
        "performance": {"cpu_per_second": 1.196e-05, "memory_gb_per_second": 1.93e-06},
        "rootfs_gb_per_second": 5.8e-08,
    }

Any key left out keeps Fly's price. Prices are USD.

Source of the defaults (collected 2026-12-01): https://fly.io/docs/about/pricing/ (Machines:
shared-cpu-1x with 256 MB $1.94 and performance-1x with 2 GB $31.00 per 30 days of running,
additional memory $5 per GB per 30 days) and Fly's announcement of stopped-Machine charges
(https://community.fly.io/t/17825: $0.15 per GB of root filesystem per 30 days). These are the
prices of Fly's cheapest regions (iad, ord, ...); some regions cost more, and GPUs are not
included: set ``PRICES`` to your invoice's figures.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django_flyworkers.guest import MEMORY_MB_PER_CPU

SECONDS_PER_30_DAYS = 30 * 24 * 3600
"""Fly's monthly figures are for 30 days (720 hours) of running."""


@dataclass(frozen=True)
class CpuPrices:
    """Prices of one CPU kind, USD per second."""

    cpu_per_second: float
    """One CPU of this kind, with the memory Fly's preset includes (256 MB shared, 2 GB
    performance)."""
    memory_gb_per_second: float
    """Each GB of memory above what the CPUs include."""


@dataclass(frozen=True)
class Prices:
    """Fly's prices (or the ``PRICES`` override), read with :meth:`machine_per_second`."""

    shared: CpuPrices
    performance: CpuPrices
    rootfs_gb_per_second: float
    """A stopped or suspended Machine, per GB of root filesystem it keeps."""

    def machine_per_second(self, guest: Mapping[str, Any]) -> float:
        """USD per second of a started Machine with this ``guest`` (CPU kind, CPUs, memory)."""
        kind = str(guest.get("cpu_kind", "shared"))
        cpus = int(guest.get("cpus", 1))
        memory_mb = int(guest.get("memory_mb", 0))
        price = self.performance if kind == "performance" else self.shared
        included_mb = MEMORY_MB_PER_CPU.get(kind, MEMORY_MB_PER_CPU["shared"])[0] * cpus
        extra_gb = max(0, memory_mb - included_mb) / 1024
        return cpus * price.cpu_per_second + extra_gb * price.memory_gb_per_second

    def rootfs_per_second(self, gigabytes: float) -> float:
        """USD per second of a stopped or suspended Machine keeping ``gigabytes`` of rootfs."""
        return gigabytes * self.rootfs_gb_per_second


FLY_PRICES = Prices(
    shared=CpuPrices(
        cpu_per_second=1.94 / SECONDS_PER_30_DAYS,
        memory_gb_per_second=5.00 / SECONDS_PER_30_DAYS,
    ),
    performance=CpuPrices(
        cpu_per_second=31.00 / SECONDS_PER_30_DAYS,
        memory_gb_per_second=5.00 / SECONDS_PER_30_DAYS,
    ),
    rootfs_gb_per_second=0.15 / SECONDS_PER_30_DAYS,
)
"""Fly's published prices (see the module docstring for the source and date)."""
