"""Signals sent by django-flyworkers.

``job_enqueued``  sender=FlyQueue class, ``queue`` (name), ``jobs`` (list of rq Jobs): the jobs
                  are visible in Redis. Sent once per push, from whatever process pushed.
``job_scheduled`` sender=FlyQueue class, ``queue``, ``jobs``, ``at`` (aware datetime).
``job_deferred``  sender=FlyQueue class, ``queue``, ``jobs``: waiting on a dependency.
``machine_started`` / ``machine_created`` sender=the queue name, ``queue``, ``machine_id``,
                  ``reason``: the scaler started (or created and launched) a worker Machine.
``machine_stopped`` sender=the queue name, ``queue``, ``machine_id``, ``exit_code`` (None if
                  unknown), ``reason``: the ledger learned that a worker Machine stopped (or
                  failed), from the Machines API (a reap, a pass that saw a boot fail) or
                  from the reaper stopping a stuck one. Sent once per stop.

Connect with ``sender="images"`` to hear about one queue's Machines only.
"""

from django.dispatch import Signal

job_enqueued = Signal()
job_scheduled = Signal()
job_deferred = Signal()
machine_started = Signal()
machine_created = Signal()
machine_stopped = Signal()
