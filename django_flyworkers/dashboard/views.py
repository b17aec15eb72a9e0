"""The dashboard's views: the page, its JSON feed, job and Machine detail, and actions.

Reading needs staff status and the view permission on jobs (``django_flyworkers.view_flyjob``);
acting needs ``django_flyworkers.operate_workers`` (superusers have both). Every action is a POST
with Django's CSRF check that first answers with a confirmation page, then acts when that
page's form comes back with ``confirm``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
    JsonResponse,
)
from django.shortcuts import render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme

from django_flyworkers.conf import get_settings
from django_flyworkers.dashboard import charts, detail, operations, queries
from django_flyworkers.dashboard.operations import Done, Refused
from django_flyworkers.models import FlyJob, WorkerMachine

VIEW_PERMISSION = "django_flyworkers.view_flyjob"
OPERATE_PERMISSION = "django_flyworkers.operate_workers"
REFRESH_SECONDS = 5


def can_view(user: Any) -> bool:
    """Staff with the view permission on jobs (or the operate permission) read the dashboard."""
    return bool(
        user.is_active
        and user.is_staff
        and (user.has_perm(VIEW_PERMISSION) or user.has_perm(OPERATE_PERMISSION))
    )


def can_operate(user: Any) -> bool:
    """Only ``operate_workers`` acts: wake, size, reap, retry, delete, stop, destroy."""
    return bool(user.is_active and user.is_staff and user.has_perm(OPERATE_PERMISSION))


def _base(model_admin: admin.ModelAdmin, request: HttpRequest, title: str) -> dict[str, Any]:  # type: ignore[type-arg]
    return {
        **model_admin.admin_site.each_context(request),
        "title": title,
        "opts": model_admin.model._meta,
        "dashboard_url": reverse("admin:django_flyworkers_dashboard_changelist"),
        "action_url": reverse("admin:django_flyworkers_dashboard_action"),
        "can_operate": can_operate(request.user),
    }


def _sections(request: HttpRequest, window: queries.Span) -> dict[str, Any]:
    found, global_cap = queries.cards()
    data = queries.charts(window)
    rows, truncated = queries.timeline(window)
    return {
        "cards": found,
        "global_cap": global_cap,
        "window": window,
        "windows": list(queries.WINDOWS),
        "jobs_chart": charts.jobs_chart(data),
        "wait_chart": charts.wait_chart(data),
        "machines_chart": charts.machines_chart(data),
        "timeline": charts.timeline_svg(window, rows),
        "timeline_rows": len(rows),
        "timeline_truncated": truncated,
        "failed_jobs": queries.failed_jobs(),
        "events": queries.recent_events(),
        "can_operate": can_operate(request.user),
        "action_url": reverse("admin:django_flyworkers_dashboard_action"),
        "here": reverse("admin:django_flyworkers_dashboard_changelist") + f"?window={window.key}",
        "generated_at": timezone.now(),
    }


def dashboard(model_admin: admin.ModelAdmin, request: HttpRequest) -> HttpResponse:  # type: ignore[type-arg]
    """The page: cards, charts, the Machine timeline, failed jobs and the latest events."""
    if not can_view(request.user):
        raise PermissionDenied
    window = queries.span(request.GET.get("window", "1h"))
    context = {
        **_base(model_admin, request, "Fly workers"),
        **_sections(request, window),
        "live_url": reverse("admin:django_flyworkers_dashboard_live") + f"?window={window.key}",
        "refresh_seconds": REFRESH_SECONDS,
        "prices_source": get_settings().prices.source,
    }
    return render(request, "django_flyworkers/dashboard/page.html", context)


def live(model_admin: admin.ModelAdmin, request: HttpRequest) -> JsonResponse:  # type: ignore[type-arg]
    """The numbers (and the page's sections, rendered) for the live refresh."""
    if not can_view(request.user):
        raise PermissionDenied
    window = queries.span(request.GET.get("window", "1h"))
    context = _sections(request, window)
    html = {
        name: render_to_string(f"django_flyworkers/dashboard/_{name}.html", context, request)
        for name in ("cards", "charts", "timeline", "lists")
    }
    response = JsonResponse(
        {
            "generated_at": context["generated_at"].isoformat(),
            "window": window.key,
            "global": context["global_cap"],
            "queues": {card.queue: _card_json(card) for card in context["cards"]},
            "html": html,
        }
    )
    response["Cache-Control"] = "no-store"
    return response


def _card_json(card: queries.QueueCard) -> dict[str, Any]:
    return {
        "queued": card.queued,
        "scheduled": card.scheduled,
        "next_due": card.next_due.isoformat() if card.next_due else None,
        "running": card.running,
        "failed": card.failed,
        "oldest_age": card.oldest_age,
        "machines": card.machines,
        "max_machines": card.max_machines,
        "finished_1h": card.finished_1h,
        "failed_1h": card.failed_1h,
        "finished_24h": card.finished_24h,
        "failed_24h": card.failed_24h,
        "wait_1h": list(card.wait_1h),
        "wait_24h": list(card.wait_24h),
        "billed_24h": card.billed_24h,
        "billed_30d": card.billed_30d,
        "cost_24h": card.cost_24h,
        "cost_30d": card.cost_30d,
        "attention": card.attention,
    }


# -- detail pages ------------------------------------------------------------------------------


def job_page(model_admin: admin.ModelAdmin, request: HttpRequest, job: FlyJob) -> HttpResponse:  # type: ignore[type-arg]
    """One job: its attempts with their Machines, the traceback, the arguments, its cost."""
    info = detail.job_detail(job)
    context = {
        **_base(model_admin, request, f"Job {job.func_name or job.job_id}"),
        "info": info,
        "job": job,
        "here": request.get_full_path(),
    }
    return render(request, "django_flyworkers/dashboard/job.html", context)


def machine_page(
    model_admin: admin.ModelAdmin,  # type: ignore[type-arg]
    request: HttpRequest,
    machine: WorkerMachine,
) -> HttpResponse:
    """One Machine: its state from the API (recorded as it is read), runs, jobs, image, guest,
    region and cost."""
    found, api_error = operations.refresh_machine(machine.machine_id)
    api_state = found.state if found is not None else ""
    machine.refresh_from_db()
    info = detail.machine_detail(machine)
    context = {
        **_base(model_admin, request, f"Machine {machine.machine_id}"),
        "info": info,
        "machine": machine,
        "guest": detail.guest_text(machine.guest),
        "api_state": api_state,
        "api_error": api_error,
        "read_at": timezone.now(),
        "here": request.get_full_path(),
    }
    return render(request, "django_flyworkers/dashboard/machine.html", context)


# -- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """One button: what it asks before acting, how it checks its input, what it does."""

    label: str
    question: str
    check: Callable[[dict[str, str]], str]
    """Validates the POSTed fields (raises Refused) and returns the target's description."""
    run: Callable[[dict[str, str], str], Done]
    danger: bool = False


def _check_queue(data: dict[str, str]) -> str:
    return operations.known_queue(data.get("queue", ""))


def _check_pool(data: dict[str, str]) -> str:
    queue = _check_queue(data)
    if "count" in data and data.get("count", "") != "":
        operations.parse_count(data["count"], queue)
    return queue


def _check_job(data: dict[str, str]) -> str:
    return operations.failed_job(data.get("job", ""))[0].job_id


def _check_machine(data: dict[str, str]) -> str:
    return operations.machine_row(data.get("machine", "")).machine_id


ACTIONS: dict[str, Action] = {
    "wake": Action(
        "Wake now", "Start Machines now for the work waiting on queue {target}?", _check_queue,
        lambda d, u: operations.wake(d["queue"], user=u),
    ),
    "pool": Action(
        "Set pool size", "Set the pool of queue {target} to this many Machines?", _check_pool,
        lambda d, u: operations.set_pool(d["queue"], d.get("count", ""), user=u),
    ),
    "reap": Action(
        "Reap now", "Sync Machines and recover the jobs of dead ones on queue {target}?",
        _check_queue, lambda d, u: operations.reap(d["queue"], user=u),
    ),
    "retry": Action(
        "Retry", "Requeue failed job {target}? A Machine will be woken for it.", _check_job,
        lambda d, u: operations.retry_job(d["job"], user=u),
    ),
    "delete": Action(
        "Delete", "Delete failed job {target} from rq and from the history?", _check_job,
        lambda d, u: operations.delete_job(d["job"], user=u), danger=True,
    ),
    "stop": Action(
        "Stop", "Stop Machine {target}?", _check_machine,
        lambda d, u: operations.stop_machine(d["machine"], user=u, force=d.get("force") == "1"),
    ),
    "destroy": Action(
        "Destroy", "Destroy Machine {target}? It is deleted at Fly.", _check_machine,
        lambda d, u: operations.destroy_machine(d["machine"], user=u), danger=True,
    ),
}  # fmt: skip


def _next(request: HttpRequest) -> str:
    target = request.POST.get("next") or reverse("admin:django_flyworkers_dashboard_changelist")
    if not url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        target = reverse("admin:django_flyworkers_dashboard_changelist")
    return target


def action(model_admin: admin.ModelAdmin, request: HttpRequest) -> HttpResponse:  # type: ignore[type-arg]
    """POST ``name`` (+ its fields): a confirmation page, then, with ``confirm``, the action."""
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    name = request.POST.get("name", "")
    if name == "refresh":
        return _refresh(request)
    if not can_operate(request.user):
        raise PermissionDenied
    chosen = ACTIONS.get(name)
    back = _next(request)
    if chosen is None:
        messages.error(request, f"Unknown action {name!r}.")
        return HttpResponseRedirect(back)
    data = {key: request.POST.get(key, "") for key in ("queue", "job", "machine", "count", "force")}
    try:
        target = chosen.check(data)
        if request.POST.get("confirm") != "yes":
            return _confirm(model_admin, request, name, chosen, target, data, back)
        done = chosen.run(data, request.user.get_username())
    except Refused as exc:
        messages.error(request, str(exc))
        return HttpResponseRedirect(back)
    (messages.success if done.ok else messages.error)(request, done.message)
    return HttpResponseRedirect(back)


def _confirm(
    model_admin: admin.ModelAdmin,  # type: ignore[type-arg]
    request: HttpRequest,
    name: str,
    chosen: Action,
    target: str,
    data: dict[str, str],
    back: str,
) -> HttpResponse:
    context = {
        **_base(model_admin, request, f"{chosen.label}: are you sure?"),
        "name": name,
        "action": chosen,
        "question": chosen.question.format(target=target),
        "data": data,
        "next": back,
        "busy": [],
        "max_machines": None,
    }
    if name == "stop":
        context["busy"] = operations.busy_jobs(operations.machine_row(data["machine"]))
    if name == "pool":
        profile = get_settings().profile(data["queue"])
        context["max_machines"] = profile.max_machines if profile else None
    return render(request, "django_flyworkers/dashboard/confirm.html", context)


def _refresh(request: HttpRequest) -> HttpResponse:
    """Read a Machine's state from the API now (view permission: it only reads and records)."""
    if not can_view(request.user):
        raise PermissionDenied
    back = _next(request)
    try:
        machine, error = operations.refresh_machine(request.POST.get("machine", ""))
    except Refused as exc:
        messages.error(request, str(exc))
        return HttpResponseRedirect(back)
    if machine is None:
        messages.error(request, f"Could not read the Machine: {error}")
    else:
        messages.success(request, f"Machine {machine.id} is {machine.state} (read just now).")
    return HttpResponseRedirect(back)
