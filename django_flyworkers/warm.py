"""Warm workers: an idle worker suspends its Machine instead of leaving (``IDLE_ACTION``
``"suspend"``), and carries on where it was frozen when a wake-up resumes it.

:class:`SuspendingWorker` is the worker class of such queues. Where rq would leave (the queue
empty with ``--burst``, or idle for ``--max-idle-time`` seconds) it does, in order:

1. withdraw from presence and look at its queues once more, as every :class:`FlyWorker`
   does before leaving (the lost wake-up handshake): a job found there is served;
2. ask Fly to suspend its own Machine: through the Machine's local API socket
   (``/.fly/api``, no token) when this process can use it, else through the Machines API
   with the app's token (:mod:`django_flyworkers.machines.local` says why, with sources),
   once: a suspend retried after the resume would freeze the Machine again;
3. confirm it was resumed: a suspend freezes the caller, so the answer may arrive after
   the resume (the emulator) or just before the freeze (Fly); either way the worker reads
   its own Machine until it is ``started`` again after the suspend, within
   :data:`RESUME_WAIT` seconds of its own running time;
4. once resumed: check its Redis connection (reconnecting if the server closed it while the
   Machine was frozen), renew its rq worker registration (its key expired meanwhile: rq
   would otherwise take it for dead) and re-announce itself in the same round trip, let
   rq's scheduler promote jobs that came due, and go back to taking jobs, until it is idle
   again and suspends again.

If the suspend is refused or fails, or the resume cannot be confirmed, the worker leaves as
with ``IDLE_ACTION = "stop"``: it exits and its Machine stops. Off a Fly Machine (no
``FLY_MACHINE_ID``) there is nothing to suspend, and it behaves like :class:`FlyWorker`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

from django.db import connections
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import worker_registration
from rq.job import Job
from rq.queue import Queue
from rq.utils import now

from django_flyworkers import ledger
from django_flyworkers.api import get_client
from django_flyworkers.conf import get_settings
from django_flyworkers.exceptions import NotConfigured
from django_flyworkers.machines import (
    Machine,
    MachineNotFound,
    MachinesAPIError,
    MachinesClient,
    RetryPolicy,
    TransportError,
    Unauthorized,
)
from django_flyworkers.scaling import actions
from django_flyworkers.worker import FlyWorker, _quietly

logger = logging.getLogger("django_flyworkers.warm")

RESUME_WAIT = 60.0
"""Seconds (of this process's running time) to see the Machine suspended and resumed after
the suspend call answered, before giving up and leaving as ``IDLE_ACTION = "stop"`` would."""
REDIS_WAIT = 30.0
"""Seconds to get Redis back after a resume before leaving."""
_POLL_FIRST, _POLL_MAX = 0.05, 1.0
_ROUND_MAX = 10.0

RESUMED_BY = frozenset({"start", "resume"})
"""Event types that end a suspend (Fly names its resume events like its starts)."""


class SuspendingWorker(FlyWorker):
    """A :class:`FlyWorker` that suspends its Machine when idle and serves again when resumed.

    The worker class of ``IDLE_ACTION = "suspend"`` queues; see the module docstring.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.suspends = 0
        """How many times this process was suspended and resumed."""
        self._local: MachinesClient | None = None
        self._token: MachinesClient | None = None

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        while True:
            # FlyWorker returns None only after withdrawing and looking once more.
            result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            if result is not None or self._stop_requested or not self.machine_id:
                return result
            if not self.nap():
                return None  # leave: the process exits and the Machine stops

    def nap(self) -> bool:
        """Suspend the Machine and come back ready for jobs; False means leave instead."""
        assert self.machine_id is not None
        machine_id, queue = self.machine_id, self.queue_names()[0]
        self._write_books()  # nothing unwritten may sleep through a freeze
        awake = time.monotonic() - self._booted
        _quietly("machine suspend", lambda: ledger.record_machine_suspended(machine_id, awake))
        self._booted = time.monotonic()  # run time from here on is counted by whoever is next
        # Keep no database connection across a freeze: the server may drop it meanwhile.
        connections.close_all()
        client = self._suspend(machine_id, queue)
        if client is None or not self._await_resume(client, machine_id):
            return False
        if not self._back_online():
            return False
        self.suspends += 1
        self._booted = time.monotonic()
        _quietly("machine resume", lambda: ledger.record_machine_resumed(machine_id))
        return True

    # -- suspending ---------------------------------------------------------------------------

    def _clients(self) -> list[MachinesClient]:
        """The local API socket's client first (no token), then the token client; neither
        retries: a suspend retried after the resume would suspend the Machine again."""
        settings = get_settings()
        app = os.environ.get("FLY_APP_NAME") or settings.app_name or ""
        if self._local is None and app:
            self._local = MachinesClient.local(app)
        if self._token is None and app and settings.api_token:
            self._token = MachinesClient(
                settings.api_url,
                str(settings.api_token),
                app,
                timeout=settings.http_timeout,
                retry=RetryPolicy.never(),
            )
        return [client for client in (self._local, self._token) if client is not None]

    def _suspend(self, machine_id: str, queue: str) -> MachinesClient | None:
        """Ask Fly to suspend this Machine; the client that did, or None if none could."""
        clients = self._clients()
        for client in clients:
            path = "local API socket" if client is self._local else "API token"
            reason = f"worker {self.name} idle, queue empty; through the {path}"
            result = actions.suspend(client, queue, machine_id, reason=reason)
            if result:
                return client
            # The socket refused (not a privileged process, an action outside its subset)
            # or was not there: nothing was suspended, so the token may try. Anything else
            # (a refusal of this Machine, or a request that may have been acted upon) ends it.
            if client is not self._local or not _path_unavailable(result.error):
                break
        logger.warning(
            "flyworkers: Machine %s could not be suspended%s; its worker leaves instead",
            machine_id,
            "" if clients else " (no local API socket and no API token)",
        )
        return None

    def _await_resume(self, client: MachinesClient, machine_id: str) -> bool:
        """Read the Machine until it is started after the suspend (it was resumed)."""
        spent, delay = 0.0, _POLL_FIRST
        while True:
            began = time.monotonic()
            machine = self._read_own(client, machine_id)
            if machine is not None and resumed(machine):
                return True
            if self._stop_requested or spent > RESUME_WAIT:
                logger.warning(
                    "flyworkers: Machine %s was not seen suspended and resumed within %gs; "
                    "its worker leaves",
                    machine_id,
                    RESUME_WAIT,
                )
                return False
            time.sleep(delay)
            # The clock runs on while the Machine is frozen, this process does not: a round
            # counts for at most what it can take awake, so a long sleep spends no budget.
            spent += min(time.monotonic() - began, delay + _ROUND_MAX)
            delay = min(_POLL_MAX, delay * 2)

    def _read_own(self, client: MachinesClient, machine_id: str) -> Machine | None:
        # Reads may be retried (the shared token client does): only the suspend may not.
        readers = [client, *[c for c in self._clients() if c is not client]]
        with contextlib.suppress(NotConfigured):
            readers.append(get_client())
        for candidate in readers:
            try:
                return candidate.get(machine_id)
            except MachinesAPIError as exc:
                # A request cut by the freeze, or a socket that may not read Machines: try
                # the next path now, and this one again on the next round.
                logger.debug("flyworkers: reading Machine %s failed: %s", machine_id, exc)
        return None

    # -- resuming -----------------------------------------------------------------------------

    def _back_online(self) -> bool:
        """Redis back, registration renewed, presence announced: ready for jobs."""
        if not reconnect(self.connection, REDIS_WAIT):
            return False
        with self.connection.pipeline() as pipe:
            self.renew_registration(pipe)
            self._announce(pipeline=pipe)
            pipe.execute()
        self._promote_scheduled()
        return True

    def renew_registration(self, pipeline: Any) -> None:
        """Write this worker's rq key and registry entries again (they expired while frozen,
        and rq's cleanup may have dropped them), as rq's registration does, birth kept."""
        self.last_heartbeat = now()
        pipeline.delete(self.key)
        pipeline.hset(self.key, mapping=self.serialize())
        worker_registration.register(self, pipeline)
        pipeline.expire(self.key, self.worker_ttl + 60)

    def _promote_scheduled(self) -> None:
        # With --burst rq runs its scheduler once, at start: do its part again, or a
        # scheduled job that came due while we slept would wait for the next boot.
        scheduler = getattr(self, "scheduler", None)
        if scheduler is None or getattr(scheduler, "_process", None) is not None:
            return
        try:
            scheduler.acquire_locks()
            if scheduler.acquired_locks:
                try:
                    scheduler.enqueue_scheduled_jobs()
                finally:
                    scheduler.release_locks()
        except Exception:
            logger.exception("flyworkers: promoting scheduled jobs after a resume failed")


def resumed(machine: Machine) -> bool:
    """Is ``machine`` started again after its latest suspend?"""
    if machine.state != "started":
        return False
    latest = next((e for e in machine.events if e.type in RESUMED_BY | {"suspend"}), None)
    return latest is None or latest.type in RESUMED_BY


def reconnect(conn: Redis, wait: float) -> bool:
    """Make sure ``conn`` reaches Redis: connections the server closed while the Machine was
    frozen are dropped and opened again. False if Redis stays unreachable for ``wait`` s."""
    deadline = time.monotonic() + wait
    delay = _POLL_FIRST
    while True:
        try:
            conn.ping()
            return True
        except (RedisConnectionError, RedisTimeoutError) as exc:
            logger.info("flyworkers: Redis connection lost while suspended (%s): reconnecting", exc)
            conn.connection_pool.disconnect()
            if time.monotonic() > deadline:
                logger.error("flyworkers: Redis unreachable %gs after a resume; leaving", wait)
                return False
            time.sleep(delay)
            delay = min(_POLL_MAX, delay * 2)


def _path_unavailable(error: MachinesAPIError | None) -> bool:
    """The local socket refused or could not be reached: nothing was acted upon."""
    if isinstance(error, TransportError):
        return not error.ambiguous
    return isinstance(error, Unauthorized | MachineNotFound) or (
        error is not None and error.status == 403
    )
