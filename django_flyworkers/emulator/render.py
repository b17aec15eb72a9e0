"""Fly's JSON shapes: Machines, image refs, apps and processes."""

from __future__ import annotations

from hashlib import sha256

from .errors import JSON
from .ids import rfc3339
from .model import App, Machine

EMBEDDED_EVENTS = 20


def render_machine(
    m: Machine,
    now: float,
    *,
    summary: bool = False,
    include_lease: bool = False,
    nonce: str | None = None,
) -> JSON:
    """A Machine in the API's JSON shape (events newest first, at most 20 embedded)."""
    data: JSON = {
        "id": m.id,
        "name": m.name,
        "state": m.state,
        "region": m.region,
        "instance_id": m.instance_id,
        "version": m.instance_id,
        "private_ip": m.private_ip,
        "image_ref": image_ref(m.config["image"]),
        "created_at": rfc3339(m.created_at),
        "updated_at": rfc3339(m.updated_at),
        "cordoned": m.cordoned,
    }
    if not summary:
        data["config"] = m.config
        data["events"] = [e.to_json() for e in reversed(m.events[-EMBEDDED_EVENTS:])]
        data["checks"] = []
        data["host_status"] = "ok"
    if nonce:
        data["nonce"] = nonce
    lease = m.live_lease(now)
    if include_lease and lease is not None:
        data["lease"] = {
            "description": lease.description,
            "owner": lease.owner,
            "expires_at": int(lease.expires_at),
        }
    return data


def image_ref(image: str) -> JSON:
    """Split ``registry/repository:tag@digest`` the way Fly reports ``image_ref``."""
    ref, _, digest = image.partition("@")
    name, tag = ref, "latest"
    if ":" in ref.rsplit("/", 1)[-1]:
        name, tag = ref.rsplit(":", 1)
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, rest
    else:
        registry, repository = "registry-1.docker.io", name if "/" in name else f"library/{name}"
    return {
        "registry": registry,
        "repository": repository,
        "tag": tag,
        "digest": digest or f"sha256:{sha256(image.encode()).hexdigest()}",
        "labels": {},
    }


def render_app(app: App) -> JSON:
    """``GET /v1/apps/{app}``: docs apps-resource "Get app details"."""
    return {
        "id": app.id,
        "name": app.name,
        "status": "deployed",
        "organization": {"name": "Emulator", "slug": app.org_slug},
    }


def render_app_summary(app: App, machine_count: int) -> JSON:
    """One entry of ``GET /v1/apps?org_slug=``: docs apps-resource "List apps"."""
    return {
        "id": app.id,
        "name": app.name,
        "machine_count": machine_count,
        "network": app.network,
    }
