"""Fly's rules for a Machine's ``guest`` (CPU kind, CPUs, memory), in one place.

:func:`validate_guest` checks a guest mapping against the rules Fly applies when a Machine is
created, and returns a :class:`Guest`. The ``GUEST`` of every queue profile goes through it
(``conf``), and so does a per-job override (``.using(guest=...)``) at call time. No Django
here, so the emulator may use it too.

The rules (flyctl's ``cpusPerKind`` and fly-go's ``MIN/MAX_MEMORY_MB_PER_*`` constants; Fly's
docs, "Machine sizing": "Memory limits are 2gb * shared CPU size or 8gb * performance CPU
size. Minimum memory is 256m * shared CPU size or 2048m * performance CPU size"):

=============  ===============================  =====================  =====================
cpu_kind       cpus                             memory_mb at least     memory_mb at most
=============  ===============================  =====================  =====================
shared         1, 2, 4, 6, 8                    256 x cpus             2048 x cpus
performance    1, 2, 4, 6, 8, 10, 12, 14, 16    2048 x cpus            8192 x cpus
=============  ===============================  =====================  =====================

``memory_mb`` is a multiple of 256 (the Machines API's ``MachineGuest`` schema).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

CPUS: Mapping[str, tuple[int, ...]] = {
    "shared": (1, 2, 4, 6, 8),
    "performance": (1, 2, 4, 6, 8, 10, 12, 14, 16),
}
"""The CPU counts Fly offers for each ``cpu_kind``."""

MEMORY_MB_PER_CPU: Mapping[str, tuple[int, int]] = {
    "shared": (256, 2048),
    "performance": (2048, 8192),
}
"""Least and most memory per CPU of each kind, in MB. The least is what Fly's size presets
(``shared-cpu-1x``, ``performance-1x``) include in their price."""

MEMORY_STEP_MB = 256

DEFAULT_MEMORY_MB = 512

KEYS = frozenset(
    {"cpu_kind", "cpus", "memory_mb", "gpus", "gpu_kind", "kernel_args", "max_memory_mb"}
)
"""The guest keys a profile may set (a subset of Fly's ``MachineGuest``)."""


@dataclass(frozen=True, eq=False)  # Mapping's __eq__: a Guest equals the same dict
class Guest(Mapping[str, Any]):
    """A validated Fly guest. It is also a read-only mapping of the keys that are set, so
    ``dict(guest)`` is the ``guest`` object of a Machine config."""

    cpu_kind: str = "shared"
    cpus: int = 1
    memory_mb: int = DEFAULT_MEMORY_MB
    gpus: int | None = None
    gpu_kind: str | None = None
    kernel_args: tuple[str, ...] | None = None
    max_memory_mb: int | None = None

    def __getitem__(self, key: str) -> Any:
        if key not in KEYS or getattr(self, key) is None:
            raise KeyError(key)
        value = getattr(self, key)
        return list(value) if isinstance(value, tuple) else value

    def __iter__(self) -> Iterator[str]:
        return (f.name for f in fields(self) if getattr(self, f.name) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, f.name) for f in fields(self)))

    @property
    def has_gpu(self) -> bool:
        """Whether the guest asks for GPUs."""
        return bool(self.gpus) or bool(self.gpu_kind)


def _whole(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be a whole number, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{key} must be at least {minimum}, got {value}.")
    return value


def validate_guest(guest: Any, *, base: Mapping[str, Any] | None = None) -> Guest:
    """Check ``guest`` against Fly's rules and return it as a :class:`Guest`.

    Keys of ``guest`` are merged over ``base`` (default: 1 shared CPU, 512 MB). When ``guest``
    changes the CPUs but not ``memory_mb``, the memory is raised to the least those CPUs
    allow, so ``{"cpu_kind": "performance", "cpus": 2}`` means 4096 MB, as on Fly.

    Raises:
        ValueError: with one sentence naming the first key that breaks a rule.
    """
    if not isinstance(guest, Mapping):
        raise ValueError(f"the guest must be a dict, got {type(guest).__name__}.")
    unknown = sorted(str(key) for key in guest if key not in KEYS)
    if unknown:
        raise ValueError(f"unknown guest key {unknown[0]!r}; Fly's are {', '.join(sorted(KEYS))}.")
    merged: dict[str, Any] = {**dict(base or Guest()), **guest}
    kind = merged.get("cpu_kind", "shared")
    if kind not in CPUS:
        raise ValueError(f"cpu_kind must be 'shared' or 'performance', got {kind!r}.")
    cpus = _whole(merged.get("cpus", 1), "cpus", 1)
    if cpus not in CPUS[kind]:
        allowed = ", ".join(map(str, CPUS[kind]))
        raise ValueError(f"cpus must be one of {allowed} for cpu_kind {kind!r}, got {cpus}.")
    least, most = (per_cpu * cpus for per_cpu in MEMORY_MB_PER_CPU[kind])
    if "memory_mb" in guest:
        memory = _whole(guest["memory_mb"], "memory_mb", MEMORY_STEP_MB)
    else:
        memory = max(_whole(merged.get("memory_mb", DEFAULT_MEMORY_MB), "memory_mb", 1), least)
    if memory % MEMORY_STEP_MB:
        raise ValueError(f"memory_mb must be a multiple of {MEMORY_STEP_MB}, got {memory}.")
    if not least <= memory <= most:
        raise ValueError(
            f"memory_mb must be between {least} and {most} for {cpus} {kind} CPU(s), got {memory}."
        )
    gpus = merged.get("gpus")
    if gpus is not None:
        gpus = _whole(gpus, "gpus", 1)
    gpu_kind = merged.get("gpu_kind")
    if gpu_kind is not None and (not isinstance(gpu_kind, str) or not gpu_kind.strip()):
        raise ValueError(f"gpu_kind must be a GPU name such as 'a10', got {gpu_kind!r}.")
    kernel_args = merged.get("kernel_args")
    if kernel_args is not None:
        if isinstance(kernel_args, str) or not isinstance(kernel_args, list | tuple):
            raise ValueError(f"kernel_args must be a list of strings, got {kernel_args!r}.")
        if not all(isinstance(arg, str) for arg in kernel_args):
            raise ValueError(f"kernel_args must be a list of strings, got {kernel_args!r}.")
        kernel_args = tuple(kernel_args)
    max_memory = merged.get("max_memory_mb")
    if max_memory is not None:
        max_memory = _whole(max_memory, "max_memory_mb", memory)
        if max_memory % MEMORY_STEP_MB:
            raise ValueError(
                f"max_memory_mb must be a multiple of {MEMORY_STEP_MB}, got {max_memory}."
            )
    return Guest(kind, cpus, memory, gpus, gpu_kind, kernel_args, max_memory)
