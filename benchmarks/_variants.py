"""Worker classes that try one start-up or exit cut each, for ``benchmarks/cold_start.py``.

They subclass the product's ``FlyWorker`` and change one thing, so a variant measures that
cut alone. None of this is product code: it is how a proposed change is priced before it is
made in ``django_flyworkers/worker.py``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from django_flyworkers.worker import FlyWorker


class OrderedUnsubscribeWorker(FlyWorker):
    """Stops rq's pubsub thread *before* unsubscribing, so the reply wakes it for good.

    rq (since rq/rq#2172) unsubscribes first and then clears the thread's running flag. When
    the thread reads Redis's unsubscribe reply before the flag is cleared, it blocks in
    another ``get_message(timeout=60)``, and ``unsubscribe()`` waits out its ``join(1)``: one
    second more on the Machine's bill, in about half of the exits.
    """

    def unsubscribe(self) -> None:
        if self.pubsub_thread:
            self.pubsub_thread.stop()
        super().unsubscribe()


class FastExitWorker(OrderedUnsubscribeWorker):
    """Leaves the process with ``os._exit(0)`` once the work loop is over.

    A worker Machine stops when its process exits; tearing down a whole Django interpreter
    first (module globals, the garbage collector, ``atexit`` hooks) is billed time that
    serves nothing. Logging and the standard streams are flushed first.
    """

    def work(self, burst: bool = False, *args: Any, **kwargs: Any) -> bool:
        worked = super().work(burst, *args, **kwargs)
        if not self.is_horse:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return worked
