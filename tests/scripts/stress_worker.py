"""Run many short FlyWorker burst cycles for the lost wake-up stress test.

    python tests/scripts/stress_worker.py <queue> <iterations> <prefix>

Each cycle waits for ``<prefix>:go``, runs a burst worker, announces on
``<prefix>:withdrawn`` the moment rq first finds the queue empty (the worker starts to leave),
dawdles 0-2 ms there to widen the race, and reports ``<prefix>:done``. Wake-ups the worker
asks for as it leaves are recorded in ``<prefix>:leave-wakes`` instead of calling the Machines API.
"""

import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

import django

django.setup()

import django_rq  # noqa: E402

from django_flyworkers.queue import FlyQueue  # noqa: E402
from django_flyworkers.scaling import scaler  # noqa: E402
from django_flyworkers.worker import FlyWorker  # noqa: E402

queue_name, iterations, prefix = sys.argv[1], int(sys.argv[2]), sys.argv[3]
conn = django_rq.get_connection(queue_name)
current = {"iteration": -1, "signalled": False}


def record_leave_wake(queue: str, **kwargs: object) -> None:
    conn.rpush(f"{prefix}:leave-wakes", current["iteration"])


scaler._reconcile = record_leave_wake  # type: ignore[assignment]


class StressQueue(FlyQueue):
    @classmethod
    def dequeue_any(cls, *args, **kwargs):  # type: ignore[no-untyped-def]
        # rq found the queue empty: from here on the worker is leaving. This hook sits in rq's
        # dequeue, not in FlyWorker, so it times the race the same way whatever FlyWorker does.
        result = super().dequeue_any(*args, **kwargs)
        if result is None and not current["signalled"]:
            current["signalled"] = True
            conn.rpush(f"{prefix}:withdrawn", current["iteration"])
            time.sleep(random.uniform(0, 0.002))
        return result


for i in range(iterations):
    conn.blpop([f"{prefix}:go"], timeout=60)
    current.update(iteration=i, signalled=False)
    FlyWorker([queue_name], connection=conn, queue_class=StressQueue).work(burst=True)
    conn.rpush(f"{prefix}:done", i)
