"""Run one FlyWorker burst with WAKE_MODE "off" (no Machines API), as worker tests need.

    python tests/scripts/run_worker.py <queue> [<queue> ...]

The environment reaches the worker as on a Machine: ``FLY_MACHINE_ID`` names its Machine,
``FLYWORKERS_FAULT_POINT`` makes it kill itself at that point. ``FLUSH_EVERY`` (tests only)
sets how long the worker may keep a job's start or end unwritten.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

import django

django.setup()

import django_rq  # noqa: E402
from django.conf import settings  # noqa: E402
from django.db import connections  # noqa: E402
from django.test import override_settings  # noqa: E402

from django_flyworkers import worker_books  # noqa: E402
from django_flyworkers.queue import FlyQueue  # noqa: E402
from django_flyworkers.worker import FlyWorker  # noqa: E402

if os.environ.get("FLUSH_EVERY"):
    worker_books.FLUSH_EVERY = float(os.environ["FLUSH_EVERY"])

with override_settings(FLYWORKERS={**settings.FLYWORKERS, "WAKE_MODE": "off"}):
    queues = [django_rq.get_queue(name) for name in sys.argv[1:]]
    connections.close_all()  # as manage.py rqworker does before it starts
    worker = FlyWorker(queues, connection=queues[0].connection, queue_class=FlyQueue)
    worker.work(burst=True)
