"""Dedicated Machines, the enqueue side: one fresh Machine per job, sized per job if asked.

A queue whose profile says ``MODE: "dedicated"`` runs each job on a Machine of its own, which
runs ``manage.py flyworkers_run <job id>`` (:mod:`django_flyworkers.dedicated_worker`) and is
destroyed when it exits. ``@flyjob(..., dedicated=True)`` declares that a function must only
ever run that way, and ``.using(guest={...})`` sizes one job's Machine. Both are checked here,
when ``.delay()`` is called, before anything is pushed; the guest travels with the job in
``job.meta`` so that the wake path creates its Machine with it
(:mod:`django_flyworkers.scaling.dedicated`).

No Django models are imported here: job modules import ``@flyjob`` at start-up.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django_flyworkers.conf import get_settings
from django_flyworkers.exceptions import InvalidGuest, NotDedicated
from django_flyworkers.guest import validate_guest

GUEST_META = "flyworkers_guest"
"""``job.meta`` key of a job's own guest, validated and complete (every key Fly needs)."""


def enqueue_meta(queue: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """What a job enqueued on ``queue`` with ``options`` (``@flyjob``'s and ``.using()``'s)
    adds to its ``meta``: its own guest, if it asked for one.

    Raises:
        NotDedicated: ``dedicated=True`` or ``guest=`` on a queue whose ``MODE`` is not
            ``"dedicated"`` (a pool worker's size is its queue's ``GUEST``).
        InvalidGuest: the guest breaks Fly's rules; the message names the key.
    """
    guest = options.get("guest")
    if not options.get("dedicated") and guest is None:
        return {}
    profile = get_settings().profile(queue)
    if profile is None or profile.mode != "dedicated":
        what = "a per-job guest" if guest is not None else "a dedicated=True job"
        mode = "is not in FLYWORKERS['QUEUES']" if profile is None else "runs in pool mode"
        raise NotDedicated(
            f"{what} needs a Machine of its own, but queue {queue!r} {mode}: set "
            f"FLYWORKERS['QUEUES'][{queue!r}]['MODE'] = 'dedicated', or enqueue it on a "
            "dedicated queue with .using(queue=...)."
        )
    if guest is None:
        return {}
    try:
        checked = validate_guest(guest, base=profile.guest)
    except ValueError as exc:
        raise InvalidGuest(f"guest for a job on queue {queue!r}: {exc}") from None
    return {GUEST_META: dict(checked)}
