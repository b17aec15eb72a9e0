"""Enqueue N jobs from a separate process once a Redis barrier opens (concurrency tests).

python tests/scripts/enqueue.py <queue> <count> <barrier-key>
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

import django

django.setup()

import django_rq  # noqa: E402

from tests.testapp import jobs  # noqa: E402

queue, count, barrier = sys.argv[1], int(sys.argv[2]), sys.argv[3]
conn = django_rq.get_connection(queue)
conn.rpush(f"{barrier}:ready", os.getpid())
conn.blpop([barrier], timeout=30)
ids = [jobs.add.using(queue=queue).delay(i, 1).id for i in range(count)]
print("\n".join(ids))
