"""Enqueue, wake and drain one job with rq's ``RQ_KEY_PREFIX`` set (rq 3 reads it at import).

    RQ_KEY_PREFIX=<prefix> python tests/scripts/prefixed_queue.py <queue>

Prints one JSON line: what the scaler saw in Redis, what the wake did, and the job's result
after an in-process FlyWorker drained the queue.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

import django

django.setup()

from rq.queue import Queue  # noqa: E402

from django_flyworkers.models import ScaleEvent  # noqa: E402
from django_flyworkers.queue import get_queue  # noqa: E402
from django_flyworkers.scaling.snapshot import snapshot  # noqa: E402
from django_flyworkers.worker import FlyWorker  # noqa: E402
from tests.testapp import jobs  # noqa: E402

queue = get_queue(sys.argv[1])
job = queue.enqueue(jobs.add, 2, 3)  # the wake-up (WAKE_MODE "sync") runs inline
snap, _ = snapshot(queue)
woke = list(ScaleEvent.objects.values_list("action", flat=True))
FlyWorker([queue], connection=queue.connection).work(burst=True)
print(
    json.dumps(
        {
            "queue_key": queue.key,
            "prefix": Queue.redis_queue_namespace_prefix,
            "queued_seen": snap.queued,
            "booting_seen": sorted(snap.booting),
            "actions": woke,
            "result": job.return_value(),
        }
    )
)
