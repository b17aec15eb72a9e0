"""Exceptions raised by django-flyworkers (the Machines API client has its own tree).

FlyWorkersError
 +-- UnserializableArguments (also TypeError)   .delay() with arguments the serializer rejects
 +-- UnknownQueue (also KeyError)               a queue not in RQ_QUEUES
 +-- NotConfigured                              the API token, app or image is missing
"""


class FlyWorkersError(Exception):
    """Base class of django-flyworkers' own errors."""


class UnserializableArguments(FlyWorkersError, TypeError):
    """A job's arguments cannot be serialized; raised at enqueue time, nothing was pushed."""


class UnknownQueue(FlyWorkersError, KeyError):
    """The queue name is not configured in ``RQ_QUEUES``."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown queue"


class NotConfigured(FlyWorkersError):
    """The Machines API cannot be used: token, app name or image missing."""
