"""Dedicated Machines, the Machine side: run exactly one job, then hand the place over.

A dedicated Machine runs ``manage.py flyworkers_run <job id>``, which calls :func:`run_job`:

1. **Claim.** The job's id is taken off its queue atomically (``LREM`` into rq's intermediate
   list, in one Lua script, as rq's own dequeue moves it), so no other Machine or worker can
   run it. A job that is no longer queued (it ran, or another Machine claimed it) is left
   alone.
2. **Run.** A :class:`DedicatedWorker`, a :class:`~django_flyworkers.worker.FlyWorker` whose
   dequeue returns that one job, runs it through rq's own execution: the work horse, the job
   timeout, results, retries, callbacks and dependents as with any worker, and the ledger,
   the started registry, heartbeats and presence as with a pool worker.
3. **Hand over.** As it leaves, the worker wakes its queue with its own Machine excluded, so
   the next waiting job gets this Machine's place at once: nothing polls for a free place.
   The process exits, the Machine stops (restart policy ``no``) and Fly destroys it
   (``auto_destroy``).

If the Machine dies mid-job, the job is in rq's started registry under this worker's name,
and ``flyworkers_reap`` retries it (on a new Machine) or fails it with the reason.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any

from django.db import connections
from rq import Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.queue import Queue

from django_flyworkers import ledger
from django_flyworkers.worker import FlyWorker, _quietly

logger = logging.getLogger("django_flyworkers.worker")

_CLAIM = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
    redis.call('RPUSH', KEYS[2], ARGV[1])
    return 1
end
return 0
"""


def claim(rq_queue: Queue, job_id: str) -> bool:
    """Take ``job_id`` off ``rq_queue`` into rq's intermediate list, atomically.

    True for exactly one caller while the job is queued; False if it is not on the queue.
    """
    keys = [rq_queue.key, rq_queue.intermediate_queue_key]
    return bool(rq_queue.connection.eval(_CLAIM, len(keys), *keys, job_id))


class DedicatedWorker(FlyWorker):
    """A FlyWorker that runs one given job (:attr:`job_id`) and nothing else."""

    job_id: str = ""
    """The job to claim and run; set before :meth:`work`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.claimed: Job | None = None
        self._tried = False

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        if self._tried or self._stop_requested:
            return None
        self._tried = True
        self.heartbeat()
        queue = self.queues[0]
        if not claim(queue, self.job_id):
            self.log.warning("Worker %s: job %s is not queued", self.name, self.job_id)
            return None
        job = queue.fetch_job(self.job_id)
        if job is None:  # its data expired or belongs to another queue
            queue.connection.lrem(queue.intermediate_queue_key, 1, self.job_id)
            return None
        self.log.info("Worker %s: %s: %s (dedicated)", self.name, queue.name, job.id)
        self.claimed = job
        return job, queue

    def work(self, burst: bool = True, *args: Any, **kwargs: Any) -> bool:
        # One job, no scheduler, no going round again for jobs that arrived meanwhile: those
        # get Machines of their own when this one hands its place over.
        kwargs.update(max_jobs=1, with_scheduler=False, max_idle_time=None)
        try:
            return bool(Worker.work(self, True, *args, **kwargs))
        finally:
            self._hand_over()

    def _hand_over(self) -> None:
        from django_flyworkers.scaling import dedicated
        from django_flyworkers.scaling.scaler import wake

        self._write_books()  # the job's start and end, before the Machine goes
        if self.machine_id:
            machine_id, run = self.machine_id, time.monotonic() - self._booted
            _quietly("machine exit", lambda: ledger.record_machine_exit(machine_id, run))
            for queue in self.queue_names():
                left = functools.partial(dedicated.hand_over, self.connection, queue, machine_id)
                _quietly("hand-over", left)
        for queue in self.queue_names():
            # Our presence is withdrawn (teardown): the next waiting job takes our place.
            hand_over = functools.partial(
                wake, queue, reason="dedicated job done", exclude=self._own()
            )
            _quietly("hand-over wake-up", hand_over)
        connections.close_all()


@dataclass(frozen=True)
class Outcome:
    """What :func:`run_job` did."""

    job_id: str
    queue: str
    ran: bool
    """False when the job was not queued (already claimed, running, done) or is gone."""
    status: str
    """The job's status afterwards, as rq reports it (``missing`` if its data is gone)."""


def find_queue(job_id: str, queue: str | None = None) -> Queue:
    """The configured queue of ``job_id``: ``queue`` if given, else the job's own origin.

    Raises:
        LookupError: no queue in ``RQ_QUEUES`` holds the job.
    """
    from django.conf import settings

    from django_flyworkers.queue import get_queue

    if queue:
        return get_queue(queue)
    for name in getattr(settings, "RQ_QUEUES", {}) or {}:
        rq_queue = get_queue(name)
        try:
            job = rq_queue.job_class.fetch(
                job_id, connection=rq_queue.connection, serializer=rq_queue.serializer
            )
        except NoSuchJobError:
            continue
        return get_queue(job.origin)
    raise LookupError(f"no job {job_id!r} in the Redis of any queue in RQ_QUEUES")


def run_job(job_id: str, queue: str | None = None, *, logging_level: str = "INFO") -> Outcome:
    """Claim ``job_id`` from its queue and run it on a :class:`DedicatedWorker`, then hand
    this Machine's place over (see the module docstring)."""
    from django_rq.workers import get_worker

    rq_queue = find_queue(job_id, queue)
    worker = get_worker(rq_queue.name, worker_class=DedicatedWorker)
    assert isinstance(worker, DedicatedWorker)
    worker.job_id = job_id
    connections.close_all()  # as rqworker does: nothing shared with the work horse
    ran = worker.work(burst=True, logging_level=logging_level)
    try:
        job = Job.fetch(job_id, connection=rq_queue.connection, serializer=rq_queue.serializer)
        found = job.get_status(refresh=False)
        status = str(getattr(found, "value", found))
    except NoSuchJobError:  # deleted at once (result_ttl=0), or never there
        status = JobStatus.FINISHED.value if ran else "missing"
    return Outcome(job_id, rq_queue.name, ran, status)
