"""The admin: the dashboard, and read-only pages for Machines, jobs and scaling events.

History is written by workers and the scaler (through the ledger), never edited by people.
The dashboard lives at ``/admin/django_flyworkers/dashboard/`` (the entry of a table-less
``Dashboard`` model, as django-rq does), so it works with the default ``admin.site`` and no
urls.py change. A job's and a Machine's page are the dashboard's detail pages.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html

from django_flyworkers.models import Dashboard, FlyJob, ScaleEvent, WorkerMachine


def _views() -> Any:
    # Imported on the first dashboard request, not at start-up: every worker Machine loads
    # this module (admin autodiscovery) and would pay about 50 ms a cold boot for the charts.
    from django_flyworkers.dashboard import views

    return views


CHANGE_LIST = "django_flyworkers/dashboard/change_list.html"


class NoWritesAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Nothing is added, changed or deleted through the admin's forms: only the ledger writes."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class ReadOnlyAdmin(NoWritesAdmin):
    """History is written by workers and the scaler; the admin only shows it."""

    change_list_template = CHANGE_LIST
    detail_page: str | None = None
    """The dashboard view (in ``dashboard/views.py``) that shows one object, if any."""

    def _detail(self, request: HttpRequest, object_id: str) -> Any:
        obj = self.get_object(request, unquote(object_id))
        if obj is None:
            raise Http404(f"No {self.opts.verbose_name} with id {object_id!r}.")
        if not self.has_view_permission(request, obj):
            raise PermissionDenied
        return obj

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        if self.detail_page is None:
            return super().change_view(request, object_id, form_url, extra_context)
        page = getattr(_views(), self.detail_page)
        response: HttpResponse = page(self, request, self._detail(request, object_id))
        return response


@admin.register(Dashboard)
class DashboardAdmin(NoWritesAdmin):
    """The dashboard page and its JSON feed and actions, under this entry's URL."""

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return _views().can_view(request.user)

    def has_module_permission(self, request: HttpRequest) -> bool:
        return _views().can_view(request.user)

    def get_urls(self) -> list[URLPattern]:
        site = self.admin_site
        return [
            path(
                "",
                site.admin_view(lambda request: _views().dashboard(self, request)),
                name="django_flyworkers_dashboard_changelist",
            ),
            path(
                "live.json",
                site.admin_view(lambda request: _views().live(self, request)),
                name="django_flyworkers_dashboard_live",
            ),
            path(
                "action/",
                site.admin_view(lambda request: _views().action(self, request)),
                name="django_flyworkers_dashboard_action",
            ),
        ]


@admin.register(WorkerMachine)
class WorkerMachineAdmin(ReadOnlyAdmin):
    detail_page = "machine_page"
    list_display = (
        "machine_id",
        "queue",
        "state",
        "region",
        "boots",
        "run_seconds_display",
        "last_started_at",
        "last_exit_code",
    )
    list_filter = ("queue", "state", "region")
    search_fields = ("machine_id", "name", "queue")
    ordering = ("-updated_at",)

    @admin.display(description="run time (s)", ordering="run_seconds")
    def run_seconds_display(self, obj: WorkerMachine) -> str:
        return f"{obj.run_seconds:.1f}"


@admin.register(FlyJob)
class FlyJobAdmin(ReadOnlyAdmin):
    detail_page = "job_page"
    list_display = (
        "job_id",
        "func_name",
        "queue",
        "status",
        "attempts",
        "enqueued_at",
        "started_at",
        "ended_at",
        "machine_link",
    )
    list_filter = ("queue", "status", "machine__region")
    search_fields = ("job_id", "func_name", "description", "machine__machine_id", "worker_name")
    list_select_related = ("machine",)
    date_hierarchy = "created_at"
    ordering = ("-created_at",)

    @admin.display(description="machine", ordering="machine__machine_id")
    def machine_link(self, obj: FlyJob) -> str:
        if obj.machine is None:
            return "-"
        url = reverse("admin:django_flyworkers_workermachine_change", args=[obj.machine.pk])
        return format_html('<a href="{}">{}</a>', url, obj.machine.machine_id)


@admin.register(ScaleEvent)
class ScaleEventAdmin(ReadOnlyAdmin):
    list_display = (
        "created_at",
        "queue",
        "action",
        "machine_id",
        "user",
        "outcome",
        "reason",
        "duration_ms",
    )
    list_filter = ("queue", "action", "outcome")
    search_fields = ("machine_id", "reason", "detail", "user")
    ordering = ("-created_at",)
