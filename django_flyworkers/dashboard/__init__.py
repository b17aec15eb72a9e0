"""The admin dashboard: a card per queue, charts, the Machine timeline, job and Machine detail,
and the operator's actions. ``queries`` reads, ``charts`` draws, ``operations`` acts,
``views`` serves; :mod:`django_flyworkers.admin` mounts it under the admin."""
