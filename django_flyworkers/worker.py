"""FlyWorker: an rq worker that knows it runs on a Fly Machine that should stop when idle.

Run by the Machines flyworkers creates as
``manage.py rqworker <queue> --burst --worker-class django_flyworkers.worker.FlyWorker``
(``--max-idle-time N`` instead of ``--burst`` when the queue's ``IDLE_TIMEOUT`` is N > 0).
On top of rq's ``Worker`` it

* takes part in the lost wake-up handshake (see :mod:`django_flyworkers.presence`): it
  announces itself while it takes jobs and, before leaving, withdraws and looks at its queues
  one last time;
* goes round again instead of leaving when a job arrived as it was leaving, and wakes another
  Machine for jobs it had to leave behind (stop requested, crash);
* mirrors every job it runs into the ledger (started, finished, failed, stopped, retried) with
  its Machine, worker name, times, attempt number and error, and its own run time into the
  Machine's row;
* shuts down warm on the first SIGINT/SIGTERM (Fly's ``kill_signal``) and cold on the second.
  The work horse ignores both, so only the parent decides when a running job is killed;
* never runs a job of a newer release: it hands it back and leaves (:mod:`.release`).

``IDLE_ACTION = "suspend"`` runs :class:`django_flyworkers.warm.SuspendingWorker` instead.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from django.db import connections
from rq import Worker
from rq.exceptions import InvalidJobOperation, NoSuchJobError, StopRequested
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.results import Result

from django_flyworkers import ledger, presence, receivers, release
from django_flyworkers.conf import get_settings

logger = logging.getLogger("django_flyworkers.worker")

T = TypeVar("T")
_TRACEBACK_KEY = "flyworkers:traceback:{}"

_STATUS = {
    JobStatus.FINISHED: "finished",
    JobStatus.FAILED: "failed",
    JobStatus.STOPPED: "stopped",
    JobStatus.CANCELED: "canceled",
    JobStatus.QUEUED: "queued",
    JobStatus.SCHEDULED: "scheduled",
    JobStatus.DEFERRED: "deferred",
}


def _quietly(what: str, fn: Callable[[], T]) -> T | None:
    # Bookkeeping must never stop a worker from working: log and carry on.
    try:
        return fn()
    except Exception:
        logger.exception("flyworkers: could not record %s", what)
        return None


class FlyWorker(Worker):
    """The worker class flyworkers runs on its Machines (usable anywhere rq runs)."""

    def __init__(self, queues: Any, name: str | None = None, *args: Any, **kwargs: Any) -> None:
        self.machine_id = os.environ.get("FLY_MACHINE_ID") or None
        # Unique per boot: rq refuses a name whose previous owner's key has not expired yet.
        name = name or f"{self.machine_id or socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        kwargs.setdefault("worker_ttl", get_settings().worker_ttl)
        super().__init__(queues, name, *args, **kwargs)
        self.presence_id = self.machine_id or self.name
        self._booted = time.monotonic()
        self._leftover: list[str] = []
        self._announced = False
        self._release = release.worker_release()
        self._outdated = False
        """Set when a job of a newer release came by: this worker leaves for the new code."""
        # A work horse leaves through os._exit, which would kill a wake-up thread mid-call.
        receivers.FORCE_SYNC = True

    # -- presence -----------------------------------------------------------------------------

    def _presence_ttl(self, timeout: float | None = None) -> float:
        return float(timeout or self.worker_ttl + 60)

    def _announce(self, timeout: float | None = None, pipeline: Any = None) -> None:
        conn = pipeline if pipeline is not None else self.connection
        presence.announce(conn, self.queue_names(), self.presence_id, self._presence_ttl(timeout))
        self._announced = True

    def _withdraw(self) -> None:
        self._announced = False
        for queue in self.queue_names():
            presence.withdraw(self.connection, queue, self.presence_id)

    def register_birth(self) -> None:
        super().register_birth()
        self._announce()
        if self.machine_id:
            machine_id = self.machine_id
            _quietly(
                "machine boot",
                lambda: ledger.record_machine_boot(
                    machine_id,
                    queue=",".join(self.queue_names()),
                    region=os.environ.get("FLY_REGION", ""),
                    image=os.environ.get("FLY_IMAGE_REF", ""),
                    instance_id=os.environ.get("FLY_MACHINE_VERSION", ""),
                    memory_mb=int(os.environ.get("FLY_VM_MEMORY_MB", "0") or 0) or None,
                ),
            )
            queues = ",".join(self.queue_names())
            _quietly("run", lambda: ledger.record_run_booted(machine_id, queue=queues))

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        super().heartbeat(timeout, pipeline)
        if self._announced and not self.is_horse:
            self._announce(timeout, pipeline)

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        if result is not None or self._stop_requested:
            return result
        # About to leave. Withdraw first, then look once more: a producer that pushed before
        # our withdrawal is seen by this look; one that pushed after it sees no live worker
        # and wakes a Machine. Either way nothing is left behind.
        self._withdraw()
        result = super().dequeue_job_and_maintain_ttl(None, None)
        if result is not None:
            self._announce()
        return result

    # -- the work loop ------------------------------------------------------------------------

    def work(self, burst: bool = False, *args: Any, **kwargs: Any) -> bool:
        worked = False
        idle_rounds = 0
        try:
            while True:
                did = super().work(burst, *args, **kwargs)
                worked = worked or did
                if not self._leftover or self._stop_requested or self._outdated:
                    break
                # Jobs arrived as we were leaving: serve them rather than start another
                # Machine. Two rounds in a row that ran nothing mean something else is wrong
                # (a crash loop): leave, and hand the jobs to another Machine on the way out.
                idle_rounds = 0 if did else idle_rounds + 1
                if idle_rounds >= 2:
                    break
                self.log.info("Worker %s: jobs arrived while leaving, going round again", self.name)
        finally:
            self._leave()
        return worked

    def handle_warm_shutdown_request(self) -> None:
        # Fly is stopping this Machine: take no new work, so producers wake another one now
        # rather than count on us for the rest of the kill timeout.
        super().handle_warm_shutdown_request()
        self._withdraw()

    def teardown(self) -> None:
        if not self.is_horse:
            self._withdraw()
        super().teardown()
        if not self.is_horse:
            self._leftover = [
                queue.name for queue in self.queues if self.connection.llen(queue.key) > 0
            ]

    def _leave(self) -> None:
        from django_flyworkers.scaling.scaler import wake

        # An outdated worker wakes nothing: its code would start Machines on its old image.
        for queue in [] if self._outdated else self._leftover:
            # Our own Machine is about to stop and cannot serve them: wake another one.
            left = functools.partial(wake, queue, reason="worker left jobs", exclude=self._own())
            _quietly("wake-up on exit", left)
        if self.machine_id:
            machine_id, run = self.machine_id, time.monotonic() - self._booted
            _quietly("machine exit", lambda: ledger.record_machine_exit(machine_id, run))
            _quietly("run end", lambda: ledger.record_run_ended(machine_id))
        connections.close_all()

    def _own(self) -> Sequence[str]:
        return (self.machine_id,) if self.machine_id else ()

    # -- jobs ---------------------------------------------------------------------------------

    def execute_job(self, job: Job, queue: Queue) -> None:
        if release.is_newer(job, self.connection, self._release):
            self._step_aside(job, queue)
        attempt = _quietly(
            "job start",
            lambda: ledger.record_started(job, queue.name, self.machine_id, self.name),
        )
        try:
            super().execute_job(job, queue)
        finally:
            if attempt is not None:
                _quietly("job end", lambda: self._record_end(job, attempt))

    def _step_aside(self, job: Job, queue: Queue) -> None:
        # Old code must not run it: withdraw, give it back at the front, and leave. The wake
        # path of the new release updates this Machine's image and starts it cold.
        self._outdated = True
        self._withdraw()
        release.hand_back(job, queue)
        raise StopRequested

    def _record_end(self, job: Job, attempt: int) -> None:
        try:
            status = job.get_status(refresh=True)
        except (NoSuchJobError, InvalidJobOperation):
            status = JobStatus.FINISHED  # result_ttl=0 deletes the job as soon as it finishes
        error = None
        if status in (JobStatus.FAILED, JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.STOPPED):
            try:
                result = job.latest_result()
            except Exception:
                result = None
            if result is not None and result.type == Result.Type.FAILED:
                error = result.exc_string
        ledger.record_ended(job.id, attempt, _STATUS.get(status, str(status)), error=error)
        if status != JobStatus.FINISHED:  # the dashboard keeps every attempt that did not succeed
            retried = status in (JobStatus.QUEUED, JobStatus.SCHEDULED)
            outcome = "retried" if retried else _STATUS.get(status, str(status))
            # rq keeps no traceback of an attempt it retries: the horse handed it over.
            kept = _quietly("traceback", lambda: self._kept_traceback(job.id))
            error = error or kept
            ledger.record_attempt(
                job.id, attempt, outcome, queue=job.origin, machine_id=self.machine_id or "",
                worker_name=self.name, started_at=job.started_at, error=error,
            )  # fmt: skip

    def handle_job_failure(self, job: Job, queue: Queue, *args: Any, **kwargs: Any) -> None:
        exc_string = kwargs.get("exc_string") or (args[1] if len(args) > 1 else "")
        super().handle_job_failure(job, queue, *args, **kwargs)
        if exc_string:  # for the dashboard's attempts: the parent picks it up in _record_end
            key = _TRACEBACK_KEY.format(job.id)
            _quietly("traceback", lambda: self.connection.set(key, exc_string, ex=3600))

    def _kept_traceback(self, job_id: str) -> str | None:
        with self.connection.pipeline() as pipe:
            pipe.get(_TRACEBACK_KEY.format(job_id))
            pipe.delete(_TRACEBACK_KEY.format(job_id))
            raw, _ = pipe.execute()
        return raw.decode() if raw else None

    def fork_work_horse(self, job: Job, queue: Queue) -> None:
        # The parent used the ORM; a forked child must not share its database socket.
        connections.close_all()
        super().fork_work_horse(job, queue)

    def setup_work_horse_signals(self) -> None:
        # Fly sends kill_signal to the main process; the horse runs its own process group, but
        # ignore both signals anyway so only the parent decides when a job is killed.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
