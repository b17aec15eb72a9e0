"""What a Machine costs per second: Fly's published prices, or ``FLYWORKERS['PRICES']``.

Source: https://fly.io/docs/about/pricing/ ("Started Fly Machines", region ``iad``, read
2025-08-19) and Fly's announcement of stopped-Machine charges (https://community.fly.io/t/17825).
Fly bills a started Machine per second at the price of its size preset plus the memory above
what the preset includes, and a stopped or suspended Machine by the root filesystem it keeps:

- a preset (``shared-cpu-Nx``, ``performance-Nx``) is N times the 1-CPU price, and includes
  256 MB (shared) or 2 GB (performance) of memory per CPU;
- memory above that costs about $5 per GB per 30 days, for both kinds;
- a stopped Machine's root filesystem costs $0.15 per GB per 30 days.

``PUBLISHED`` keeps Fly's per-second table as published; with no override a guest it lists is
priced from it exactly. Any other guest is priced by that linear rule, whose parameters are the
1-CPU preset rows of the table and the memory price (two numbers per CPU kind, one for the root
filesystem). The rule reproduces every published row within Fly's rounding (a test holds it to
that). ``FLYWORKERS["PRICES"]`` overrides the rule's numbers, and then prices every guest by
the rule::

    FLYWORKERS["PRICES"] = {
        "shared": {"cpu_per_second": 7.5e-07, "memory_gb_per_second": 1.93e-06},
        "performance": {"cpu_per_second": 1.196e-05, "memory_gb_per_second": 1.93e-06},
        "rootfs_gb_per_second": 5.8e-08,
    }

Any key left out keeps Fly's price. Prices are USD. They are those of Fly's cheapest regions
(``iad``, ``ord``, ...); some regions cost up to ~40% more, and GPUs are not included: set
``PRICES`` to your invoice's figures (or your reservation discount).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from django_flyworkers.guest import MEMORY_MB_PER_CPU

SECONDS_PER_30_DAYS = 30 * 24 * 3600
"""Fly's monthly figures are for 30 days (720 hours) of running."""

PUBLISHED_URL = "https://fly.io/docs/about/pricing/"
PUBLISHED_DATE = "2025-08-19"
OVERRIDE_SOURCE = "FLYWORKERS['PRICES']"
"""What :attr:`Prices.source` says when the setting overrides Fly's prices."""

PUBLISHED: Mapping[tuple[str, int, int], float] = MappingProxyType(
    {
        # (cpu_kind, cpus, memory_mb): USD per second, as published (iad, 2025-08-19)
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
)
"""Fly's published price of a started Machine, per guest (CPU kind, CPUs, memory MB)."""

ROOTFS_GB = 1.0
"""Assumed root filesystem of a stopped or suspended worker Machine, in GB (Fly bills what the
image uses; a slim Python image with its dependencies is about that)."""


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
    """Fly's prices (:data:`FLY_PRICES`) or the ``PRICES`` override (``get_settings().prices``).

    A guest listed in ``published`` is priced from it; any other by the linear rule of
    ``shared`` / ``performance``. The override carries no table, so its rule prices every guest.
    """

    shared: CpuPrices
    performance: CpuPrices
    rootfs_gb_per_second: float
    """A stopped or suspended Machine, per GB of root filesystem it keeps."""
    published: Mapping[tuple[str, int, int], float] = field(
        default_factory=dict, repr=False, hash=False
    )
    """Exact prices per guest ``(cpu_kind, cpus, memory_mb)``, ahead of the linear rule."""
    source: str = OVERRIDE_SOURCE
    """Where these prices come from, for people: Fly's page and date, or the setting."""

    def linear_per_second(self, cpu_kind: str, cpus: int, memory_mb: int) -> float:
        """USD per second of a started Machine by the rule: presets plus the memory above."""
        price = self.performance if cpu_kind == "performance" else self.shared
        included_mb = MEMORY_MB_PER_CPU.get(cpu_kind, MEMORY_MB_PER_CPU["shared"])[0] * cpus
        extra_gb = max(0, memory_mb - included_mb) / 1024
        return cpus * price.cpu_per_second + extra_gb * price.memory_gb_per_second

    def started_per_second(self, cpu_kind: str, cpus: int, memory_mb: int) -> float:
        """USD per second while a Machine of this guest is started: the table, else the rule."""
        exact = self.published.get((cpu_kind, cpus, memory_mb))
        return exact if exact is not None else self.linear_per_second(cpu_kind, cpus, memory_mb)

    def machine_per_second(self, guest: Mapping[str, Any]) -> float:
        """:meth:`started_per_second` of a ``guest`` mapping (``cpu_kind``, ``cpus``,
        ``memory_mb``; Fly's defaults for what it leaves out)."""
        return self.started_per_second(
            str(guest.get("cpu_kind", "shared")),
            int(guest.get("cpus", 1)),
            int(guest.get("memory_mb", 256)),
        )

    def rootfs_per_second(self, gigabytes: float) -> float:
        """USD per second of a stopped or suspended Machine keeping ``gigabytes`` of rootfs."""
        return gigabytes * self.rootfs_gb_per_second

    @property
    def stopped_per_second(self) -> float:
        """USD per second of a stopped or suspended worker Machine (``ROOTFS_GB`` of rootfs)."""
        return self.rootfs_per_second(ROOTFS_GB)


MEMORY_GB_PER_SECOND = 5.00 / SECONDS_PER_30_DAYS
"""Fly's "about $5 per 30 days per GB of additional RAM", both kinds."""

FLY_PRICES = Prices(
    shared=CpuPrices(
        cpu_per_second=PUBLISHED[("shared", 1, 256)],  # shared-cpu-1x, $1.94 per 30 days
        memory_gb_per_second=MEMORY_GB_PER_SECOND,
    ),
    performance=CpuPrices(
        cpu_per_second=PUBLISHED[("performance", 1, 2048)],  # performance-1x, $31.00
        memory_gb_per_second=MEMORY_GB_PER_SECOND,
    ),
    rootfs_gb_per_second=0.15 / SECONDS_PER_30_DAYS,
    published=PUBLISHED,
    source=f"{PUBLISHED_URL} ({PUBLISHED_DATE}, iad)",
)
"""Fly's published prices (see the module docstring for the source and date)."""
