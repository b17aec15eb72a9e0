"""Django's tasks framework: ``django.tasks`` (Django 6+) or the ``django-tasks`` backport."""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured

try:  # Django 6+
    from django.tasks import TaskContext, TaskResult, TaskResultStatus, task, task_backends
    from django.tasks.backends.base import BaseTaskBackend
    from django.tasks.base import DEFAULT_TASK_PRIORITY, Task, TaskError
    from django.tasks.exceptions import InvalidTask, InvalidTaskBackend, TaskResultDoesNotExist
    from django.tasks.signals import task_enqueued, task_finished, task_started
    from django.utils.json import normalize_json
except ImportError:  # Django 5.2: the django-tasks backport, same API under another name
    try:
        # Registers the backport's check_tasks (Django 6 does it in django.tasks itself).
        import django_tasks.checks  # noqa: F401
        from django_tasks import (  # type: ignore[no-redef,assignment]
            TaskContext,
            TaskResult,
            TaskResultStatus,
            task,
            task_backends,
        )
        from django_tasks.backends.base import BaseTaskBackend  # type: ignore[no-redef,assignment]
        from django_tasks.base import (  # type: ignore[no-redef,assignment]
            DEFAULT_TASK_PRIORITY,
            Task,
            TaskError,
        )
        from django_tasks.exceptions import (  # type: ignore[no-redef,assignment]
            InvalidTaskBackendError as InvalidTaskBackend,
        )
        from django_tasks.exceptions import (  # type: ignore[no-redef,assignment]
            InvalidTaskError as InvalidTask,
        )
        from django_tasks.exceptions import (  # type: ignore[no-redef,assignment]
            TaskResultDoesNotExist,
        )
        from django_tasks.signals import (  # type: ignore[no-redef,assignment]
            task_enqueued,
            task_finished,
            task_started,
        )
        from django_tasks.utils import normalize_json  # type: ignore[no-redef,assignment]
    except ImportError as exc:
        raise ImproperlyConfigured(
            "django_flyworkers.tasks needs Django's tasks framework: Django 6.0 or later, or "
            "on Django 5.2 the backport (pip install 'django-flyworkers[tasks]', which "
            "installs django-tasks)."
        ) from exc

__all__ = [
    "DEFAULT_TASK_PRIORITY",
    "BaseTaskBackend",
    "InvalidTask",
    "InvalidTaskBackend",
    "Task",
    "TaskContext",
    "TaskError",
    "TaskResult",
    "TaskResultDoesNotExist",
    "TaskResultStatus",
    "normalize_json",
    "task",
    "task_backends",
    "task_enqueued",
    "task_finished",
    "task_started",
]
