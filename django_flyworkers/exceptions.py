"""Every exception django-flyworkers raises, drawn once.

::

    Exception
     ├── FlyWorkersError                  django_flyworkers.exceptions: the library's own
     │    ├── UnserializableArguments     .delay() with arguments that cannot be serialized
     │    │                               for a worker (also a TypeError); nothing was pushed
     │    ├── UnknownQueue                a queue not in RQ_QUEUES (also a KeyError)
     │    ├── NotDedicated                dedicated=True or a per-job guest on a queue whose
     │    │                               MODE is not "dedicated" (also a ValueError)
     │    ├── InvalidGuest                a per-job guest that breaks Fly's rules (also a
     │    │                               ValueError); nothing was pushed
     │    └── NotConfigured               the API token or app name is missing (also an
     │                                    ImproperlyConfigured)
     ├── ImproperlyConfigured             django.core.exceptions: get_settings() found a bad
     │                                    FLYWORKERS value (the first of `manage.py check`'s)
     └── MachinesAPIError                 django_flyworkers.machines: a Machines API call failed
          ├── Unauthorized                401 / 403
          ├── MachineNotFound             404
          ├── WaitTimeout                 408, or wait()'s own deadline passed
          ├── Conflict                    409
          │    └── LeaseHeld              409: someone else holds the Machine's lease
          ├── PreconditionFailed          412: wrong state for the action, no capacity
          ├── RateLimited                 429, after the client's own retries
          └── TransportError              no HTTP response (timeout, reset, refused)

``.delay()`` never raises for Fly: a failed wake-up is recorded and retried, and only
``UnserializableArguments``, ``UnknownQueue``, ``NotDedicated`` and ``InvalidGuest`` (all
about the call itself) reach the caller. The management commands
report a bad setting, a Machines API failure and Redis being unreachable as a one-line
``CommandError``.
"""

from django.core.exceptions import ImproperlyConfigured


class FlyWorkersError(Exception):
    """Base class of django-flyworkers' own errors."""


class UnserializableArguments(FlyWorkersError, TypeError):
    """A job's arguments cannot be serialized; raised at enqueue time, nothing was pushed."""


class UnknownQueue(FlyWorkersError, KeyError):
    """The queue name is not configured in ``RQ_QUEUES``."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown queue"


class NotConfigured(FlyWorkersError, ImproperlyConfigured):
    """The Machines API cannot be used: the API token or the app name is missing."""


class NotDedicated(FlyWorkersError, ValueError):
    """``dedicated=True`` or a per-job guest on a queue whose ``MODE`` is not ``"dedicated"``;
    raised at enqueue time, nothing was pushed."""


class InvalidGuest(FlyWorkersError, ValueError):
    """A per-job guest (``.using(guest=...)``) breaks Fly's rules; raised at enqueue time,
    nothing was pushed."""
