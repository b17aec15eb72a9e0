"""What flyworkers remembers: Machines, jobs and every scaling action.

Rows are written only by :mod:`django_flyworkers.ledger`. The admin reads them; Redis stays the
source of truth for what is queued right now, these tables are the history and the search index.
"""

from __future__ import annotations

from typing import Any

from django.db import models


class WorkerMachine(models.Model):
    """One Fly Machine that runs workers for a queue."""

    class State(models.TextChoices):
        CREATED = "created"
        STARTING = "starting"
        STARTED = "started"
        STOPPING = "stopping"
        STOPPED = "stopped"
        SUSPENDING = "suspending"
        SUSPENDED = "suspended"
        REPLACING = "replacing"
        FAILED = "failed"
        DESTROYING = "destroying"
        DESTROYED = "destroyed"
        UNKNOWN = "unknown"

    machine_id = models.CharField(max_length=32, unique=True)
    name = models.CharField(max_length=100, blank=True)
    queue = models.CharField(max_length=100, db_index=True)
    region = models.CharField(max_length=16, blank=True)
    state = models.CharField(max_length=16, choices=State.choices, default="unknown")
    image = models.CharField(max_length=300, blank=True)
    instance_id = models.CharField(max_length=32, blank=True)
    guest = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    last_started_at = models.DateTimeField(null=True, blank=True)
    last_stopped_at = models.DateTimeField(null=True, blank=True)
    boots = models.PositiveIntegerField(default=0)
    run_seconds = models.FloatField(default=0.0, help_text="Worker run time over all boots.")
    last_exit_code = models.IntegerField(null=True, blank=True)

    class Meta:
        ordering = ["-updated_at"]
        indexes = [models.Index(fields=["queue", "state"]), models.Index(fields=["region"])]

    def __str__(self) -> str:
        return f"{self.machine_id} ({self.queue}, {self.state})"


class FlyJob(models.Model):
    """One RQ job, from the moment its push is visible in Redis to its final state."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        SCHEDULED = "scheduled"
        DEFERRED = "deferred"
        STARTED = "started"
        FINISHED = "finished"
        FAILED = "failed"
        STOPPED = "stopped"
        CANCELED = "canceled"

    job_id = models.CharField(max_length=64, unique=True)
    queue = models.CharField(max_length=100)
    func_name = models.CharField(max_length=300, blank=True, db_index=True)
    description = models.CharField(max_length=300, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default="queued")
    enqueued_at = models.DateTimeField(null=True, blank=True)
    scheduled_for = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    machine = models.ForeignKey(
        WorkerMachine, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs"
    )
    worker_name = models.CharField(max_length=100, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["queue", "status"]),
            models.Index(fields=["status", "created_at"]),
            # The dashboard's windows ("jobs that started / ended in the last hour"), covering
            # what it reads so it never visits the rows; rows not started (ended) stay out.
            models.Index(
                fields=["started_at", "queue", "enqueued_at", "scheduled_for"],
                name="flyworkers_job_started",
                condition=models.Q(started_at__isnull=False),
            ),
            models.Index(
                fields=["ended_at", "queue", "status"],
                name="flyworkers_job_ended",
                condition=models.Q(ended_at__isnull=False),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.func_name or self.job_id} [{self.status}]"

    @property
    def run_seconds(self) -> float | None:
        if self.started_at and self.ended_at:
            return (self.ended_at - self.started_at).total_seconds()
        return None


class ScaleEvent(models.Model):
    """One Machines API action taken (or attempted) by flyworkers."""

    class Outcome(models.TextChoices):
        OK = "ok"
        ERROR = "error"
        SKIPPED = "skipped"

    created_at = models.DateTimeField(auto_now_add=True)
    queue = models.CharField(max_length=100)
    action = models.CharField(max_length=32)
    machine_id = models.CharField(max_length=32, blank=True)
    reason = models.CharField(max_length=300, blank=True)
    outcome = models.CharField(max_length=8, choices=Outcome.choices, default="ok")
    detail = models.TextField(blank=True)
    duration_ms = models.PositiveIntegerField(default=0)
    user = models.CharField(
        max_length=150, blank=True, help_text="Who asked for it, for actions taken from the admin."
    )

    class Meta:
        ordering = ["-created_at"]
        permissions = [("operate_workers", "Can wake, size, reap, stop and retry from the admin")]
        indexes = [
            models.Index(fields=["queue", "created_at"]),
            models.Index(fields=["action", "outcome"]),
        ]

    def __str__(self) -> str:
        return f"{self.action} {self.machine_id or ''} ({self.outcome})".strip()


class MachineRun(models.Model):
    """One run of a Machine: from the start (or create) that booted it to its stop.

    Fly bills a Machine's CPU and RAM per second while it is ``started``: a run's billed seconds
    include its boot and the idle time around its jobs. ``stopped_at`` is empty while it runs.
    """

    class State(models.TextChoices):
        RUNNING = "running"
        STOPPED = "stopped"
        SUSPENDED = "suspended"
        FAILED = "failed"
        DESTROYED = "destroyed"

    machine = models.ForeignKey(WorkerMachine, on_delete=models.CASCADE, related_name="runs")
    queue = models.CharField(max_length=100)
    state = models.CharField(max_length=16, choices=State.choices, default=State.RUNNING)
    started_at = models.DateTimeField()
    booted_at = models.DateTimeField(
        null=True, blank=True, help_text="When its worker announced itself."
    )
    stopped_at = models.DateTimeField(null=True, blank=True)
    billed_seconds = models.FloatField(
        null=True, blank=True, help_text="From start to stop; empty while it runs."
    )
    cpu_kind = models.CharField(max_length=16, default="shared")
    cpus = models.PositiveSmallIntegerField(default=1)
    memory_mb = models.PositiveIntegerField(default=256)
    exit_code = models.IntegerField(null=True, blank=True)

    class Meta:
        ordering = ["-started_at"]
        indexes = [
            models.Index(fields=["machine", "started_at"]),
            models.Index(fields=["queue", "started_at"]),
            # Covers the dashboard's billed sums (runs are few writes, many reads).
            models.Index(
                fields=[
                    "stopped_at",
                    "queue",
                    "started_at",
                    "billed_seconds",
                    "cpu_kind",
                    "cpus",
                    "memory_mb",
                ],
                name="flyworkers_run_billed",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.machine_id} run from {self.started_at:%Y-%m-%d %H:%M:%S}"

    @property
    def guest(self) -> dict[str, Any]:
        return {"cpu_kind": self.cpu_kind, "cpus": self.cpus, "memory_mb": self.memory_mb}


class JobAttempt(models.Model):
    """An attempt of a job that did not end in success (failed, retried, stopped, lost).

    The ``FlyJob`` row always holds the latest attempt; these rows keep the earlier ones (and
    the failures), so a job that succeeds the first time writes none.
    """

    job_id = models.CharField(max_length=64)
    queue = models.CharField(max_length=100)
    number = models.PositiveIntegerField()
    machine_id = models.CharField(max_length=32, blank=True)
    worker_name = models.CharField(max_length=100, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    outcome = models.CharField(max_length=16)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["job_id", "number"]
        constraints = [
            models.UniqueConstraint(fields=["job_id", "number"], name="flyworkers_attempt_unique")
        ]
        indexes = [models.Index(fields=["ended_at"])]

    def __str__(self) -> str:
        return f"{self.job_id} attempt {self.number} ({self.outcome})"


class Dashboard(models.Model):
    """No table: the admin's entry for the dashboard page (as django-rq does for its own)."""

    class Meta:
        managed = False
        default_permissions = ()
        verbose_name = "dashboard"
        verbose_name_plural = "dashboard"
