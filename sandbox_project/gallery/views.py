"""One page to enqueue more work by hand (staff only: every click can start paid Machines)."""

from __future__ import annotations

from datetime import timedelta

from django.contrib import messages
from django.contrib.admin.views.decorators import staff_member_required
from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from django_flyworkers.models import FlyJob, WorkerMachine
from gallery import jobs
from gallery.models import Photo

MAX_PER_CLICK = 50


def upload_photos(count: int) -> list[Photo]:
    """Create ``count`` photos and enqueue a thumbnail and a receipt for each."""
    photos = []
    for _ in range(count):
        photo = Photo.objects.create(title="photo", size_kb=200 + (Photo.objects.count() % 5) * 100)
        Photo.objects.filter(pk=photo.pk).update(title=f"photo #{photo.pk}")
        jobs.make_thumbnail.delay(photo.pk)
        jobs.send_receipt.delay(photo.pk)
        photos.append(photo)
    return photos


@staff_member_required
def home(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        try:
            count = max(1, min(MAX_PER_CLICK, int(request.POST.get("count", "5"))))
        except ValueError:
            count = 5
        if request.POST.get("action") == "digest":
            jobs.publish_digest.enqueue_in(timedelta(seconds=10))
            counted = jobs.count_photos.enqueue()  # a django.tasks task, beside the jobs
            messages.info(
                request, f"Scheduled a digest in 10 seconds; counting photos ({counted.id})."
            )
        else:
            upload_photos(count)
            messages.info(request, f"Uploaded {count} photo(s): {2 * count} jobs enqueued.")
        return redirect("home")
    context = {
        "jobs": FlyJob.objects.values("queue", "status")
        .annotate(n=Count("id"))
        .order_by("queue", "status"),
        "machines": WorkerMachine.objects.values("queue", "state")
        .annotate(n=Count("id"))
        .order_by("queue", "state"),
        "recent": FlyJob.objects.select_related("machine")[:15],
    }
    return render(request, "gallery/home.html", context)
