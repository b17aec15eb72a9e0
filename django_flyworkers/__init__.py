"""django-flyworkers: RQ jobs for Django on Fly Machines that exist only while there is work."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"  # the one place: pyproject.toml reads it ([tool.hatch.version])
__all__ = ["FlyQueue", "__version__", "flyjob", "get_client", "wake"]

if TYPE_CHECKING:
    from django_flyworkers.api import get_client
    from django_flyworkers.decorators import flyjob
    from django_flyworkers.queue import FlyQueue
    from django_flyworkers.scaling.scaler import wake


def __getattr__(name: str) -> Any:
    # Lazy: importing the package (e.g. from settings.py) must not import Django models or rq.
    if name == "flyjob":
        from django_flyworkers.decorators import flyjob

        return flyjob
    if name == "FlyQueue":
        from django_flyworkers.queue import FlyQueue

        return FlyQueue
    if name == "wake":
        from django_flyworkers.scaling.scaler import wake

        return wake
    if name == "get_client":
        from django_flyworkers.api import get_client

        return get_client
    raise AttributeError(f"module 'django_flyworkers' has no attribute {name!r}")
