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
