"""FlyTaskBackend: Django's tasks framework (``django.tasks``) on flyworkers' RQ queues.

::

    TASKS = {
        "default": {
            "BACKEND": "django_flyworkers.tasks.FlyTaskBackend",
            "QUEUES": ["default", "images"],
            "OPTIONS": {},
        }
    }

    @task(queue_name="images")
    def make_thumbnail(photo_id): ...

    result = make_thumbnail.enqueue(42)     # pushed through FlyQueue: ledger row, wake-up, caps
    make_thumbnail.get_result(result.id)    # from any process: status, return value, Machine

How a Task maps onto RQ:

* ``.enqueue()`` creates an RQ job on the queue named ``queue_name`` (a django-rq queue, so a
  ``FlyQueue``: the push is recorded in the ledger and wakes a Machine). The job's id is the
  ``TaskResult`` id. Arguments must survive a JSON round trip, as Django requires; the worker
  receives them after that round trip, exactly as Django's own backends pass them.
* The job's function is ``<task module path>.execute``: rq imports the Task object from the
  task's module and calls :meth:`FlyTask.execute`, which runs the function in the work horse
  (with the ``TaskContext`` if the task takes one), records the Machine id, sends Django's
  ``task_started`` / ``task_finished`` signals and returns the JSON-normalised value. Workers
  need nothing but ``FlyWorker``: no job class, no extra command.
* ``run_after`` in the future schedules the job (``schedule_job``); ``flyworkers_scale`` wakes
  a Machine when it comes due. ``run_after`` in the past is enqueued at once.
* ``priority``: RQ has one list per queue and can only push to its front or its back. A
  priority above 0 goes to the front (ahead of everything waiting; among such jobs, the
  newest runs first); 0 and below go to the back in arrival order.
* Inside ``transaction.atomic()`` the push waits for the commit and is dropped on rollback
  (option ``ENQUEUE_ON_COMMIT``, default True), like ``@flyjob``'s ``.delay()``.
* ``get_result(id)`` reads the job from Redis: status, return value, tracebacks, the Machine
  of each attempt; the ledger adds the reason when the reaper failed a job whose Machine died.
  Results live as long as the RQ job (``RESULT_TTL``).

Django 6 has ``django.tasks``; on Django 5.2 the ``django-tasks`` backport provides the same
API and this module uses it (``pip install django-tasks``). With neither, importing this
module raises ``ImproperlyConfigured`` saying so.
"""

from __future__ import annotations

from django_flyworkers.tasks._compat import (
    InvalidTask,
    Task,
    TaskContext,
    TaskResult,
    TaskResultDoesNotExist,
    TaskResultStatus,
    task,
    task_backends,
)
from django_flyworkers.tasks.backend import FlyTaskBackend
from django_flyworkers.tasks.execution import FlyTask, execute_task
from django_flyworkers.tasks.options import E_OPTIONS, E_QUEUE, Options, parse_options

__all__ = [
    "E_OPTIONS",
    "E_QUEUE",
    "FlyTask",
    "FlyTaskBackend",
    "InvalidTask",
    "Options",
    "Task",
    "TaskContext",
    "TaskResult",
    "TaskResultDoesNotExist",
    "TaskResultStatus",
    "execute_task",
    "parse_options",
    "task",
    "task_backends",
]
