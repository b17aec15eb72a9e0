"""Refusing, at enqueue, arguments a worker could not load (:func:`check_serializable`)."""

from __future__ import annotations

import io
import pickle
from typing import Any

from rq.job import Job

from django_flyworkers.exceptions import UnserializableArguments


class _MainFinder(pickle.Pickler):
    """A pickler that notes the first object it meets whose class or definition is ``__main__``."""

    def __init__(self) -> None:
        super().__init__(io.BytesIO(), protocol=pickle.HIGHEST_PROTOCOL)
        self.found: str | None = None

    def reducer_override(self, obj: Any) -> Any:
        if self.found is None:
            owner = obj if isinstance(obj, type) or callable(obj) else type(obj)
            if getattr(owner, "__module__", None) == "__main__":
                self.found = getattr(owner, "__qualname__", repr(owner))
        return NotImplemented


def _from_main(value: Any) -> str | None:
    finder = _MainFinder()
    try:
        finder.dump(value)
    except Exception:
        return None
    return finder.found


def check_serializable(job: Job, serializer: Any) -> None:
    """Raise :class:`UnserializableArguments` unless a worker can load ``job``'s arguments.

    Serializes the payload now (rq keeps it for the push), so a value the serializer rejects
    fails in the caller. A pickle that refers to something defined in ``__main__`` pickles
    fine here but cannot be loaded by a worker, whose ``__main__`` is ``manage.py``: refused
    too, naming the argument. The extra check only runs when ``__main__`` occurs in the payload.
    """
    try:
        data = job.data
    except Exception as exc:
        raise UnserializableArguments(
            f"cannot enqueue {job.func_name}: its arguments cannot be serialized by "
            f"{getattr(serializer, '__name__', serializer)!r} ({exc}). "
            "Pass ids or plain data instead of objects such as model instances, "
            "files, locks or lambdas."
        ) from exc
    if not (isinstance(data, bytes) and data[:1] == b"\x80" and b"__main__" in data):
        return  # not a pickle, or nothing in it can come from __main__
    named = [(f"argument {i + 1}", value) for i, value in enumerate(job.args)]
    named += [(f"keyword argument {key!r}", value) for key, value in job.kwargs.items()]
    if job.instance is not None:
        named.insert(0, ("the instance", job.instance))
    for label, value in named:
        found = _from_main(value)
        if found:
            raise UnserializableArguments(
                f"cannot enqueue {job.func_name}: {label} refers to {found}, which is defined in "
                "__main__ (the script that enqueues). A worker runs manage.py as __main__ and "
                "could not load it: define it in an importable module, or pass plain data."
            )
