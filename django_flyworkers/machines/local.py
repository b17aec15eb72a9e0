"""Finding the Machine's own local API socket, which needs no token.

Inside a Fly Machine, Fly's init serves a Unix socket at ``/.fly/api`` that speaks the
Machines API under the host name ``flaps``; Fly's docs use it to let a Machine suspend
itself without an API token::

    curl --unix-socket /.fly/api -X POST \\
        http://flaps/v1/apps/$FLY_APP_NAME/machines/$FLY_MACHINE_ID/suspend

:meth:`MachinesClient.local() <.client.MachinesClient.local>` builds a client on that socket
(``httpx.HTTPTransport(uds=...)``) when :func:`local_api_socket` finds one this process can
use, and returns ``None`` otherwise, so the caller falls back to the token client.

Which path is reliable, and why
-------------------------------
For a worker suspending **its own** Machine, use the socket when it is usable and fall back
to the token and ``API_URL`` otherwise:

- The socket is Fly's documented way for a Machine to suspend itself, and needs no token:
  https://fly.io/docs/reference/suspend-resume/ ("suspending your own machine using the
  ``/.fly/api`` Unix socket directly does not [require a token]"). Fly's init attaches a
  credential locked to that one Machine, so a worker needs no API token in its environment
  and a leaked worker cannot act on other Machines.
- It is a *subset* of the API, for *privileged processes*: "a server for a Unix socket at
  /.fly/api, which exports a subset of the Fly Machines API to privileged processes in the
  Machine" (https://fly.io/blog/oidc-cloud-roles/). Access is by file permissions, so an
  image that drops root (as ours does, ``USER app``) may be refused: hence the check below
  that this process can open it, and the fallback. Only actions on the Machine itself
  (suspend) are documented; do not use it to manage other Machines.
- The token path (``https://api.machines.dev``) works from any process that has the token,
  on Fly or off it, for every action; it costs a secret on every worker and counts against
  the same per-Machine rate limits.
- A suspend freezes the caller, so its answer may only be read after the resume. A retried
  suspend could then freeze the Machine again just after it woke: a client on the local
  socket therefore does not retry by default (see ``MachinesClient.local``); a worker whose
  suspend failed simply stays up and tries again when next idle.

The emulator serves the same API on a Unix socket and sets ``FLYWORKERS_LOCAL_API_SOCKET``
in its Machines' environment, so the worker runs the same code path locally as on Fly.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping

__all__ = [
    "DEFAULT_BASE_URL",
    "LOCAL_API_SOCKET",
    "LOCAL_API_SOCKET_ENV",
    "LOCAL_API_URL",
    "local_api_socket",
]

logger = logging.getLogger("django_flyworkers.machines")

LOCAL_API_SOCKET = "/.fly/api"
"""Where Fly's init serves the Machine's local API."""
LOCAL_API_SOCKET_ENV = "FLYWORKERS_LOCAL_API_SOCKET"
"""Environment variable naming another socket (the emulator sets it); empty disables the socket."""
# Fly's public Machines API, reached with an API token from anywhere; a Machine's own socket
# (below) is the other way in.
DEFAULT_BASE_URL = "https://api.machines.dev"
LOCAL_API_URL = "http://flaps"
"""Base URL of requests over the socket: Fly's docs address the API as host ``flaps``."""


def local_api_socket(environ: Mapping[str, str] | None = None) -> str | None:
    """The local API socket this process can use, or ``None`` (use the token client then).

    ``$FLYWORKERS_LOCAL_API_SOCKET`` when set (an empty value means "never use a socket"),
    else ``/.fly/api``; either only if it is a Unix socket this process may open.
    """
    env = os.environ if environ is None else environ
    override = env.get(LOCAL_API_SOCKET_ENV)
    if override is not None and not override.strip():
        return None
    path = override.strip() if override is not None else LOCAL_API_SOCKET
    if _usable(path):
        return path
    if override is not None:
        # An explicit setting that does not work is worth a line; a missing /.fly/api is not
        # (it is simply not a Fly Machine).
        logger.warning(
            "%s=%s is not a Unix socket this process can open; using the API token instead",
            LOCAL_API_SOCKET_ENV,
            path,
        )
    return None


def _usable(path: str) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    # Connecting to a Unix socket needs write permission on it.
    return stat.S_ISSOCK(mode) and os.access(path, os.R_OK | os.W_OK)
