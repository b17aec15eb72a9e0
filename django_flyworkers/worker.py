"""FlyWorker: an rq worker that knows it runs on a Fly Machine that should stop when idle.

Run by the Machines flyworkers creates as
``manage.py rqworker <queue> --burst --worker-class django_flyworkers.worker.FlyWorker``
(``--max-idle-time N`` instead of ``--burst`` when the queue's ``IDLE_TIMEOUT`` is N > 0).
On top of rq's ``Worker`` it

* takes part in the lost wake-up handshake (see :mod:`django_flyworkers.presence`): it
  announces itself while it takes jobs (again at most every ``ANNOUNCE_EVERY`` seconds, in one
  round trip) and, before leaving, withdraws and looks at its queues one last time;
* goes round again instead of leaving when a job arrived as it was leaving, and wakes another
  Machine for jobs it had to leave behind (stop requested, crash);
* mirrors every job it runs into the ledger (started, finished, failed, stopped, retried) with
  its Machine, worker name, times, attempt number and error, and its own exit into the
  Machine's row;
* shuts down warm on the first SIGINT/SIGTERM (Fly's ``kill_signal``) and cold on the second.
  The work horse ignores both, so only the parent decides when a running job is killed;
* never runs a job of a newer release: it hands it back and leaves (:mod:`.release`).

``IDLE_ACTION = "suspend"`` runs :class:`django_flyworkers.warm.SuspendingWorker` instead.

What a job costs on top of plain rq, by design:

* no new database connection per job. The parent keeps its connection across forks; the horse
  lets go of the inherited handle without closing it (closing would end the parent's session)
  and opens its own only if the job itself uses the database;
* about one ledger statement per job, batched: the parent collects starts and ends and writes
  them in one transaction at least every ``FLUSH_EVERY`` seconds (or ``FLUSH_RUNS`` runs),
  always while a horse is working, so the write overlaps a job rather than delays one. A job
  that starts and ends between two writes is written once, already ended. A job still running
  when its start is due is written as started. The books are also written before the worker
  blocks waiting for work, leaves, or shuts down warm. A worker killed before a write leaves
  those rows behind; the reaper settles them from rq's state
  (:func:`django_flyworkers.ledger.settle_from_rq`). While a job runs, "running" is rq's
  StartedJobRegistry; the ledger follows within ``FLUSH_EVERY``;
* one Redis read per job for how it ended.

``FLYWORKERS_FAULT_POINT`` (tests and soak runs only) makes the worker SIGKILL itself at a named
point: ``horse-forked`` (a horse runs, its start is not written) or ``job-ended`` (a job ended,
its end is not written).
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

from django.db import connections
from rq import Worker
from rq.exceptions import InvalidJobOperation, NoSuchJobError, StopRequested
from rq.job import Job, JobStatus
from rq.queue import Queue

from django_flyworkers import ledger, presence, release
from django_flyworkers.conf import get_settings
from django_flyworkers.ledger import JobRun
from django_flyworkers.scaling.background import waker  # imported once, not in every horse
from django_flyworkers.worker_books import (
    _STATUS,
    FAULT_ENV,
    Books,
    _exit_now,
    _exits_within,
    _quietly,
    _resolve_driver_info_once,
    release_inherited_connections,
)
from django_flyworkers.worker_books import FAULT_POINTS as FAULT_POINTS  # still importable here
from django_flyworkers.worker_books import FLUSH_EVERY as FLUSH_EVERY
from django_flyworkers.worker_books import FLUSH_RUNS as FLUSH_RUNS
from django_flyworkers.worker_books import MAX_UNWRITTEN as MAX_UNWRITTEN

logger = logging.getLogger("django_flyworkers.worker")


ANNOUNCE_EVERY = 5.0
"""Seconds between re-announcements in Redis; presence lasts ``WORKER_TTL`` + 60 s."""

RQ_DEFAULT_WORKER_TTL = 420

ON_OUR_MACHINE_ENV = "FLYWORKERS_QUEUE"
"""Set in the environment of every Machine flyworkers creates (``scaling.spec``)."""


class FlyWorker(Worker):
    """The worker class flyworkers runs on its Machines (usable anywhere rq runs)."""

    def __init__(self, queues: Any, name: str | None = None, *args: Any, **kwargs: Any) -> None:
        self.machine_id = os.environ.get("FLY_MACHINE_ID") or None
        # Unique per boot: rq refuses a name whose previous owner's key has not expired yet.
        name = name or f"{self.machine_id or socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        # django-rq's rqworker always passes its default (420 s): WORKER_TTL is what we want.
        if kwargs.get("worker_ttl") in (None, RQ_DEFAULT_WORKER_TTL):
            kwargs["worker_ttl"] = get_settings().worker_ttl
        super().__init__(queues, name, *args, **kwargs)
        self.presence_id = self.machine_id or self.name
        self._booted = time.monotonic()
        self._leftover: list[str] = []
        self._announced = False
        self._announce_due = 0.0
        self._machine_pk: int | None = None
        self._books = Books()
        self._fault_point = os.environ.get(FAULT_ENV) or None
        self._attempts: list[tuple[JobRun, str, str | None]] = []
        """Attempts that did not succeed, kept for the dashboard once their run is written."""
        self._release = release.worker_release()
        self._outdated = False
        """Set when a job of a newer release came by: this worker leaves for the new code."""
        _resolve_driver_info_once(self.connection)

    def _fault(self, point: str) -> None:
        if self._fault_point == point:
            logger.warning("flyworkers: fault point %s reached: killing this worker", point)
            os.kill(os.getpid(), signal.SIGKILL)

    # -- presence -----------------------------------------------------------------------------

    def _presence_ttl(self, timeout: float | None = None) -> float:
        return float(timeout or self.worker_ttl + 60)

    def _announce(self, timeout: float | None = None, pipeline: Any = None) -> None:
        conn = pipeline if pipeline is not None else self.connection
        presence.announce(conn, self.queue_names(), self.presence_id, self._presence_ttl(timeout))
        self._announced = True
        self._announce_due = time.monotonic() + ANNOUNCE_EVERY

    def _withdraw(self) -> None:
        self._announced = False
        for queue in self.queue_names():
            presence.withdraw(self.connection, queue, self.presence_id)

    def register_birth(self) -> None:
        super().register_birth()
        self._announce()
        if self.machine_id:
            machine_id = self.machine_id
            self._machine_pk = _quietly(
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
        # rq beats several times a job; presence lasts minutes: renew it every few seconds.
        if self._announced and not self.is_horse and time.monotonic() >= self._announce_due:
            self._announce(timeout, pipeline)

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        result = self._dequeue(timeout, max_idle_time)
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

    def _dequeue(self, timeout: int | None, max_idle_time: int | None) -> tuple[Job, Queue] | None:
        if timeout is not None and self._books.unwritten:
            # About to block until work arrives: write the last job's end first, unless the
            # next job is already there (then it is written with that job's start).
            result = super().dequeue_job_and_maintain_ttl(None, None)
            if result is not None:
                return result
            self._write_books()
        return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)

    # -- the work loop ------------------------------------------------------------------------

    def work(self, burst: bool = False, *args: Any, **kwargs: Any) -> bool:
        worked = False
        idle_rounds = 0
        clean = False
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
            clean = True
        except SystemExit as exc:  # a cold shutdown still exits 0
            clean = exc.code in (None, 0)
            raise
        finally:
            self._leave(clean)
        if clean and self.machine_id and os.environ.get(ON_OUR_MACHINE_ENV):
            _exit_now()
        return worked

    def unsubscribe(self) -> None:
        # rq unsubscribes before it stops its pubsub thread; when the thread reads the reply
        # first it blocks again and rq waits out a 1 s join: a billed second in about a
        # quarter of exits (benchmarks/cold_start.py). Stopping the thread first avoids it.
        thread: Any = getattr(self, "pubsub_thread", None)
        if thread is not None:
            thread.stop()
        super().unsubscribe()

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

    def _leave(self, clean: bool) -> None:
        from django_flyworkers.scaling.scaler import wake

        self._write_books()
        # An outdated worker wakes nothing: its code would start Machines on its old image.
        for queue in [] if self._outdated else self._leftover:
            # Our own Machine is about to stop and cannot serve them: wake another one.
            left = functools.partial(wake, queue, reason="worker left jobs", exclude=self._own())
            _quietly("wake-up on exit", left)
        if self.machine_id:
            machine_id, run = self.machine_id, time.monotonic() - self._booted
            code = 0 if clean else None
            _quietly("machine exit", lambda: ledger.record_machine_exit(machine_id, run, code))
            _quietly("run end", lambda: ledger.record_run_ended(machine_id))
        connections.close_all()

    def _own(self) -> Sequence[str]:
        return (self.machine_id,) if self.machine_id else ()

    # -- jobs ---------------------------------------------------------------------------------

    def _write_books(self) -> None:
        _quietly("job records", self._books.flush)
        if self._attempts:
            _quietly("attempts", self._write_attempts)

    def _write_attempts(self) -> None:
        # Once a run is written it has its attempt number: keep the attempt for the dashboard.
        waiting = []
        for run, outcome, error in self._attempts:
            if run.attempt is None:
                waiting.append((run, outcome, error))
                continue
            ledger.record_attempt(
                run.job_id, run.attempt, outcome, queue=run.queue,
                machine_id=self.machine_id or "", worker_name=run.worker_name,
                started_at=run.started_at, ended_at=run.ended_at, error=error,
            )  # fmt: skip
        self._attempts = waiting

    def execute_job(self, job: Job, queue: Queue) -> None:
        if release.is_newer(job, self.connection, self._release):
            self._step_aside(job, queue)
        run = JobRun.of(job, queue.name, self.name, self._machine_pk)
        self._books.add(run)
        try:
            super().execute_job(job, queue)
        finally:
            self._fault("job-ended")
            _quietly("job end", lambda: self._ended(job, run))

    def fork_work_horse(self, job: Job, queue: Queue) -> None:
        # The horse's garbage collector should not walk (and so copy) every page of the
        # parent's objects: frozen, they are left alone there. The parent thaws at once.
        gc.freeze()
        try:
            super().fork_work_horse(job, queue)
        finally:
            gc.unfreeze()
        # Only the parent gets here (the horse leaves through os._exit). The horse is working:
        # if the books are due, write them meanwhile, off the job's critical path.
        self._fault("horse-forked")
        if self._books.overdue():
            self._write_books()

    def wait_for_horse(self) -> Any:
        if self._books.unwritten:
            # Not due yet: wait for the horse until they are. A short job ends first and its
            # end joins the next write; a long one gets its start written now.
            left = self._books.due - time.monotonic()
            if left <= 0 or not _exits_within(self.horse_pid, left):
                self._write_books()
        return super().wait_for_horse()

    def maintain_heartbeats(self, job: Job, *args: Any, **kwargs: Any) -> None:
        super().maintain_heartbeats(job, *args, **kwargs)
        self._write_books()

    def _ended(self, job: Job, run: JobRun) -> None:
        try:
            status = job.get_status(refresh=True)
        except (NoSuchJobError, InvalidJobOperation):
            status = JobStatus.FINISHED  # result_ttl=0 deletes the job as soon as it finishes
        error = None
        if status in (JobStatus.FAILED, JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.STOPPED):
            error = ledger.failure_reason(job) or None
        run.end(_STATUS.get(status, str(status)), error=error)
        self._books.changed()
        if status != JobStatus.FINISHED:  # the dashboard keeps every attempt that did not succeed
            retried = status in (JobStatus.QUEUED, JobStatus.SCHEDULED)
            outcome = "retried" if retried else _STATUS.get(status, str(status))
            # rq keeps no traceback of an attempt it retries: the horse handed it over.
            kept = _quietly("traceback", lambda: self._kept_traceback(job.id))
            self._attempts.append((run, outcome, error or kept))

    def _step_aside(self, job: Job, queue: Queue) -> None:
        # Old code must not run it: withdraw, give it back at the front, and leave. The wake
        # path of the new release updates this Machine's image and starts it cold.
        self._outdated = True
        self._withdraw()
        release.hand_back(job, queue)
        raise StopRequested

    def handle_job_failure(self, job: Job, queue: Queue, *args: Any, **kwargs: Any) -> None:
        exc_string = kwargs.get("exc_string") or (args[1] if len(args) > 1 else "")
        super().handle_job_failure(job, queue, *args, **kwargs)
        if exc_string:  # for the dashboard's attempts: the parent picks it up in _ended
            key = ledger.TRACEBACK_KEY.format(job.id)
            _quietly("traceback", lambda: self.connection.set(key, exc_string, ex=3600))

    def _kept_traceback(self, job_id: str) -> str | None:
        with self.connection.pipeline() as pipe:
            pipe.get(ledger.TRACEBACK_KEY.format(job_id))
            pipe.delete(ledger.TRACEBACK_KEY.format(job_id))
            raw, _ = pipe.execute()
        return raw.decode() if raw else None

    def main_work_horse(self, job: Job, queue: Queue) -> None:
        # The parent's database connection stays the parent's: drop our copy, unclosed.
        release_inherited_connections()
        super().main_work_horse(job, queue)

    def perform_job(self, job: Job, queue: Queue, *args: Any, **kwargs: Any) -> bool:
        try:
            return bool(super().perform_job(job, queue, *args, **kwargs))
        finally:
            if self.is_horse:
                # The horse leaves through os._exit, which would cut the waker thread short:
                # write and wake what this job enqueued (retries, dependents) first.
                waker.drain()

    def setup_work_horse_signals(self) -> None:
        # Fly sends kill_signal to the main process; the horse runs its own process group, but
        # ignore both signals anyway so only the parent decides when a job is killed.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
