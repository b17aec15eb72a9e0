"""What a worker Machine is: the metadata that marks it ours, its config and its name.

The scaler creates and updates Machines from these; the reaper and the commands recognise
ours by them. Nothing here calls the API or touches Redis.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any

from django_flyworkers.conf import FlySettings, QueueProfile
from django_flyworkers.machines import Machine

META_KEY = "flyworkers_queue"
"""Metadata key on every Machine we create: ``?metadata.flyworkers_queue=<queue>`` lists them."""

POOL_KEY = "flyworkers_pool"
"""Metadata on Machines created stopped (``--count``, ``MIN_MACHINES``): they are meant to sit
in ``created`` until needed, unlike a Machine stuck there."""


def queue_of(machine: Machine) -> str | None:
    """The queue a Machine serves, or None for a Machine flyworkers did not create."""
    queue = machine.metadata.get(META_KEY)
    return str(queue) if queue is not None else None


def is_pool(machine: Machine) -> bool:
    """Created stopped on purpose (a warm pool Machine), not stuck in ``created``."""
    return POOL_KEY in machine.metadata


def machine_config(
    profile: QueueProfile,
    settings: FlySettings,
    base: Mapping[str, Any] | None = None,
    *,
    pool: bool = False,
) -> dict[str, Any]:
    """The Machine config for a worker of ``profile``, keeping unrelated keys of ``base``.

    ``pool`` marks a Machine created stopped for the warm pool.
    """
    config: dict[str, Any] = dict(base or {})
    init = dict(config.get("init") or {})
    init["cmd"] = profile.worker_command()
    init.pop("exec", None)
    metadata = {**dict(config.get("metadata") or {}), META_KEY: profile.name}
    if pool:
        metadata[POOL_KEY] = "true"
    config.update(
        image=settings.image,
        init=init,
        guest=dict(profile.guest),
        # Only the profile's ENV: app secrets reach Machines through Fly, never through us.
        env={**profile.env, "FLYWORKERS_QUEUE": profile.name},
        restart={"policy": "no"},
        auto_destroy=False,
        metadata=metadata,
        stop_config={"signal": "SIGTERM", "timeout": f"{settings.stop_timeout}s"},
    )
    return config


def machine_name(queue: str) -> str:
    """A fresh Machine name: Fly allows lowercase letters, digits and dashes."""
    slug = re.sub(r"[^a-z0-9-]+", "-", queue.lower()).strip("-")[:30] or "queue"
    return f"flyworkers-{slug}-{uuid.uuid4().hex[:8]}"
