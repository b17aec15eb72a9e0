from django.apps import AppConfig


class FlyWorkersConfig(AppConfig):
    """Connects the wake-up receivers and registers system checks; no import side effects."""

    name = "django_flyworkers"
    label = "django_flyworkers"
    verbose_name = "Fly workers"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django_flyworkers import checks, receivers

        checks.register()
        receivers.connect()
        if uses_task_backend():
            # Django checks task backends only once django.tasks is imported, which a project
            # may not do before `manage.py check`: import the backend (and so it) now.
            import django_flyworkers.tasks  # noqa: F401


def uses_task_backend() -> bool:
    """Whether a ``TASKS`` backend is django-flyworkers' ``FlyTaskBackend``."""
    from django.conf import settings

    backends = getattr(settings, "TASKS", None) or {}
    return isinstance(backends, dict) and any(
        isinstance(params, dict) and str(params.get("BACKEND", "")).startswith("django_flyworkers.")
        for params in backends.values()
    )
