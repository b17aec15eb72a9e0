"""Scale events: every Machines API action, automatic or an operator's, and how it went."""

from __future__ import annotations

from django_flyworkers.ledger.common import (
    truncate_error,
)
from django_flyworkers.models import ScaleEvent


def record_event(
    queue: str,
    action: str,
    machine_id: str = "",
    *,
    reason: str = "",
    outcome: str = ScaleEvent.Outcome.OK,
    detail: str = "",
    duration_ms: int = 0,
    user: str = "",
) -> ScaleEvent:
    """Remember one Machines API action (or a wake that was capped): who, why, how it went.

    ``user`` names the operator for actions taken from the admin; blank for automatic ones.
    """
    return ScaleEvent.objects.create(
        queue=queue,
        action=action,
        machine_id=machine_id,
        reason=reason[:300],
        outcome=outcome,
        detail=truncate_error(detail),
        duration_ms=max(0, int(duration_ms)),
        user=user[:150],
    )


record_scale_event = record_event
"""The name earlier versions used for :func:`record_event`."""


def record_user_event(
    queue: str,
    action: str,
    *,
    user: str,
    machine_id: str = "",
    reason: str = "",
    outcome: str = ScaleEvent.Outcome.OK,
    detail: str = "",
    duration_ms: int = 0,
) -> ScaleEvent:
    """Remember an action an operator took from the dashboard, with their name."""
    return ScaleEvent.objects.create(
        queue=queue,
        action=action[:32],
        machine_id=machine_id[:32],
        reason=reason[:300],
        outcome=outcome,
        detail=truncate_error(detail),
        duration_ms=max(0, int(duration_ms)),
        user=user[:150],
    )
