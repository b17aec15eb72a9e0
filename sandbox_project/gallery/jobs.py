"""The demo's jobs. Worker Machines import them from here, by their module path.

* ``make_thumbnail`` is CPU-bound (compression and hashing stand in for image resizing, so the
  sandbox needs no imaging library); it runs on the ``images`` queue, whose Machines are
  bigger (see ``FLYWORKERS["QUEUES"]["images"]["GUEST"]``).
* ``send_receipt`` is quick and talks to a flaky "mail server": some receipts fail on their
  first attempt and succeed on the retry rq schedules for them.
* ``publish_digest`` is enqueued with ``enqueue_in``: a scheduled job that comes due while
  every Machine may be stopped, which ``manage.py flyworkers_scale --watch`` takes care of.
* ``count_photos`` is written against Django's tasks API (``@task``, ``.enqueue()``,
  ``.get_result()``) instead of ``@flyjob``; it runs on the same queue and Machines.
"""

from __future__ import annotations

import hashlib
import random
import zlib

from django.utils import timezone
from rq import get_current_job

from django_flyworkers import flyjob
from django_flyworkers.tasks import task  # django.tasks.task (Django 6) or the backport's
from gallery.models import Digest, Photo

FLAKY_EVERY = 4
"""The receipts of photos 1, 5, 9, ... fail once before they are sent."""


def render(seed: int, size_kb: int) -> tuple[str, int]:
    """About half a second of CPU per 400 KB: returns (sha256, compressed size) of the result.

    Three "scales" of the synthetic image are compressed and hashed; key stretching
    (PBKDF2) stands in for the resampling a real thumbnailer would spend its time on.
    """
    rng = random.Random(seed)
    pixels = bytes(rng.choice(b"0123456789abcdef") for _ in range(size_kb * 1024))
    digest = hashlib.sha256()
    compressed = 0
    for scale in (1, 2, 4):
        scaled = pixels[::scale]
        compressed = len(zlib.compress(scaled, 9))
        digest.update(hashlib.pbkdf2_hmac("sha256", scaled[:4096], b"thumb", size_kb * 1500))
    return digest.hexdigest(), compressed


@flyjob("images", timeout=300)
def make_thumbnail(photo_id: int) -> str:
    photo = Photo.objects.get(pk=photo_id)
    sha, size = render(photo.pk, photo.size_kb)
    Photo.objects.filter(pk=photo_id).update(
        thumbnail_sha256=sha, thumbnail_bytes=size, thumbnailed_at=timezone.now()
    )
    return sha


class MailServerBusy(RuntimeError):
    pass


@flyjob("default", timeout=60, retry=2)
def send_receipt(photo_id: int) -> str:
    job = get_current_job()
    if job is not None and photo_id % FLAKY_EVERY == 1:
        # Count attempts in Redis (shared by every Machine): fail the first one only.
        attempt = job.connection.incr(f"sandbox:receipt-attempts:{photo_id}")
        job.connection.expire(f"sandbox:receipt-attempts:{photo_id}", 3600)
        if attempt == 1:
            raise MailServerBusy(f"421 mail server busy, receipt for photo {photo_id} deferred")
    Photo.objects.filter(pk=photo_id).update(receipt_sent_at=timezone.now())
    return f"receipt sent for photo {photo_id}"


@flyjob("default", timeout=60)
def publish_digest() -> str:
    digest = Digest.objects.create(
        photos=Photo.objects.count(),
        thumbnails=Photo.objects.exclude(thumbnailed_at=None).count(),
    )
    return str(digest)


@task(queue_name="default")
def count_photos() -> dict[str, int]:
    """``count_photos.enqueue()``; later ``count_photos.get_result(id).return_value``."""
    return {
        "photos": Photo.objects.count(),
        "thumbnails": Photo.objects.exclude(thumbnailed_at=None).count(),
    }
