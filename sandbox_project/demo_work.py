"""What the demo enqueues (photos uploaded in waves) and how it follows them to the end."""

from __future__ import annotations

import argparse
import time
from datetime import timedelta
from typing import Any

from demo_report import (  # type: ignore[import-not-found]  # beside this script
    FINAL,
    Screen,
    job_rows,
    machines,
    progress_lines,
)


class Run:
    """The jobs this run enqueued, wave by wave."""

    def __init__(self) -> None:
        from django.utils import timezone

        self.began = timezone.now()
        self.monotonic = time.monotonic()
        self.waves: list[list[str]] = []
        self.scheduled: dict[str, Any] = {}

    @property
    def job_ids(self) -> list[str]:
        return [job_id for wave in self.waves for job_id in wave]

    def elapsed(self) -> float:
        return time.monotonic() - self.monotonic


def warm_pool() -> bool:
    """Do idle workers suspend their Machines in this run (``DEMO_IDLE_ACTION=suspend``)?"""
    from django_flyworkers.conf import get_settings

    return any(p.idle_action == "suspend" for p in get_settings().queues.values())


def plan_waves(total: int) -> list[tuple[int, int, bool]]:
    """(thumbnails, receipts, digest?) per wave: about 4/5 of the jobs first, then the rest
    once every Machine has stopped, to show stopped Machines being started again."""
    if total <= 0:
        return []
    second = total // 5 if total >= 5 else 0
    first = total - second
    waves = [((first - 1) // 2 + (first - 1) % 2, (first - 1) // 2, True)]
    if second:
        waves.append(((second + 1) // 2, second // 2, False))
    return waves


def enqueue(run: Run, thumbnails: int, receipts: int, digest_in: float | None) -> str:
    """Upload photos: a thumbnail each on ``images``, a receipt each on ``default``."""
    from django.db import transaction
    from django.utils import timezone
    from gallery import jobs
    from gallery.models import Photo

    wave: list[str] = []
    run.waves.append(wave)
    with transaction.atomic():
        photos = []
        for i in range(max(thumbnails, receipts)):
            photo = Photo.objects.create(title="photo", size_kb=200 + (i % 5) * 100)
            Photo.objects.filter(pk=photo.pk).update(title=f"photo #{photo.pk}")
            photos.append(photo)
    # Interleaved, the way uploads arrive. Each .delay() is a Redis push plus a cheap check;
    # the waker thread calls the Machines API only when workers are missing.
    for i, photo in enumerate(photos):
        if i < thumbnails:
            wave.append(jobs.make_thumbnail.delay(photo.pk).id)
        if i < receipts:
            wave.append(jobs.send_receipt.delay(photo.pk).id)
    text = f"{thumbnails} thumbnails (images), {receipts} receipts (default)"
    if digest_in is not None:
        due = timezone.now() + timedelta(seconds=digest_in)
        digest = jobs.publish_digest.enqueue_at(due)
        wave.append(digest.id)
        run.scheduled[digest.id] = due
        text += f", a digest due in {digest_in:g}s"
    return f"wave {len(run.waves)}: {text}"


def settled(rows: list[Any], expected: int, fleet: dict[str, dict[str, Any]]) -> bool:
    """Every job ended and every Machine stopped or suspended (so billed time is final)."""
    ended = len(rows) == expected and all(row.status in FINAL for row in rows)
    return ended and all(info["state"] in AT_REST for info in fleet.values())


AT_REST = ("stopped", "created", "suspended")
"""States in which a Machine is not billed for CPU and memory."""


def follow(
    run: Run, waves: list[tuple[int, int, bool]], fly: Any, screen: Screen, args: argparse.Namespace
) -> None:
    """Enqueue wave after wave, redrawing progress, until all settled (or the timeout)."""
    deadline = time.monotonic() + args.timeout
    pending = list(waves)
    while True:
        if pending and (
            not run.waves or settled(job_rows(run.job_ids), len(run.job_ids), machines(fly))
        ):
            thumbnails, receipts, digest = pending.pop(0)
            note = enqueue(run, thumbnails, receipts, args.schedule_in if digest else None)
            if len(run.waves) > 1:
                note += (
                    " (every Machine had suspended: they are resumed, not created)"
                    if warm_pool()
                    else " (every Machine had stopped: they are started again, not created)"
                )
            screen.say(f"{run.elapsed():6.1f}s  {note}")
        rows = job_rows(run.job_ids)
        fleet = machines(fly)
        title = f"{run.elapsed():6.1f}s  {len(run.job_ids)} jobs"
        lines = progress_lines(title, rows, fleet, len(run.job_ids))
        if not pending and settled(rows, len(run.job_ids), fleet):
            screen.draw(lines, force=True)
            return
        if time.monotonic() > deadline:
            screen.draw(lines, force=True)
            raise RuntimeError(f"the demo did not finish within {args.timeout:g}s")
        screen.draw(lines)
        time.sleep(0.5)
