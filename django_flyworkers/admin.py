"""Read-only admin for Machines, jobs and scaling events (the ledger writes them, not people)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from django_flyworkers.models import FlyJob, ScaleEvent, WorkerMachine


class ReadOnlyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """History is written by workers and the scaler; the admin only shows it."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(WorkerMachine)
class WorkerMachineAdmin(ReadOnlyAdmin):
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
        "outcome",
        "reason",
        "duration_ms",
    )
    list_filter = ("queue", "action", "outcome")
    search_fields = ("machine_id", "reason", "detail")
    ordering = ("-created_at",)
