"""Signals sent by django-flyworkers.

``job_enqueued``  sender=FlyQueue class, ``queue`` (name), ``jobs`` (list of rq Jobs): the jobs
                  are visible in Redis. Sent once per push, from whatever process pushed.
``job_scheduled`` sender=FlyQueue class, ``queue``, ``jobs``, ``at`` (aware datetime).
``job_deferred``  sender=FlyQueue class, ``queue``, ``jobs``: waiting on a dependency.
``machine_started`` / ``machine_created`` sender=None, ``queue``, ``machine_id``, ``reason``:
                  the scaler started (or created and launched) a worker Machine.
"""

from django.dispatch import Signal

job_enqueued = Signal()
job_scheduled = Signal()
job_deferred = Signal()
machine_started = Signal()
machine_created = Signal()
