"""The ledger: the one writer of ``FlyJob``, ``JobAttempt``, ``MachineRun``, ``WorkerMachine`` and
``ScaleEvent`` rows. It is still the only module (now a package) that writes them; every other
module reads them, or asks the ledger to write. Import it as ``from django_flyworkers import
ledger`` and call ``ledger.record_...``: every name below is re-exported here.

Writers run in several processes at once (web requests, worker parents, work horses, the
reaper), so every write is a single conditional statement that cannot move a row backwards:

* the enqueue side inserts, and only revives rows that are waiting or finished, never one a
  worker has started (:func:`write_notices`, one multi-row upsert per batch; :mod:`.enqueue`);
* a worker numbers each attempt when it starts a job and closes only that attempt, so a slow
  worker never overwrites a newer attempt on another Machine (:func:`record_runs`;
  :mod:`.jobs`);
* the reaper settles rows a dead process left behind from rq's own state
  (:func:`settle_from_rq`; :mod:`.settle`).

The rest: Machines (:mod:`.machines`), their billed runs (:mod:`.machine_runs`), scaling and
operator events (:mod:`.events`), and pruning old history (:mod:`.pruning`).
"""

from django_flyworkers.ledger.common import (
    ERROR_MAX_CHARS,
    FINAL,
    RAN,
    REVIVABLE,
    WAITING,
    Status,
    truncate_error,
)
from django_flyworkers.ledger.enqueue import (
    UPSERT_BATCH,
    UPSERT_ROWS,
    Notice,
    notices,
    record_enqueue_failed,
    record_enqueued,
    write_notices,
)
from django_flyworkers.ledger.events import (
    record_event,
    record_scale_event,
    record_user_event,
)
from django_flyworkers.ledger.jobs import (
    JobRun,
    delete_job,
    record_attempt,
    record_ended,
    record_job_machine,
    record_reaped,
    record_runs,
    record_started,
)
from django_flyworkers.ledger.machine_runs import (
    EXIT_SLACK,
    RUN_END_STATES,
    record_run_booted,
    record_run_ended,
    record_run_started,
    record_runs_seen,
)
from django_flyworkers.ledger.machines import (
    record_machine_boot,
    record_machine_exit,
    record_machine_resumed,
    record_machine_seen,
    record_machine_suspended,
    record_machines_gone,
)
from django_flyworkers.ledger.pruning import (
    prunable,
    prune,
    prune_runs,
)
from django_flyworkers.ledger.settle import (
    RQ_STATUS,
    SETTLE_LIMIT,
    TRACEBACK_KEY,
    Settled,
    failure_reason,
    settle_from_rq,
    settle_queue,
)
from django_flyworkers.ledger.settle import _settle as _settle  # tests check a settle's guard

__all__ = [
    "ERROR_MAX_CHARS",
    "EXIT_SLACK",
    "FINAL",
    "RAN",
    "REVIVABLE",
    "RQ_STATUS",
    "RUN_END_STATES",
    "SETTLE_LIMIT",
    "TRACEBACK_KEY",
    "UPSERT_BATCH",
    "UPSERT_ROWS",
    "WAITING",
    "JobRun",
    "Notice",
    "Settled",
    "Status",
    "delete_job",
    "failure_reason",
    "notices",
    "prunable",
    "prune",
    "prune_runs",
    "record_attempt",
    "record_ended",
    "record_enqueue_failed",
    "record_enqueued",
    "record_event",
    "record_job_machine",
    "record_machine_boot",
    "record_machine_exit",
    "record_machine_resumed",
    "record_machine_seen",
    "record_machine_suspended",
    "record_machines_gone",
    "record_reaped",
    "record_run_booted",
    "record_run_ended",
    "record_run_started",
    "record_runs",
    "record_runs_seen",
    "record_scale_event",
    "record_started",
    "record_user_event",
    "settle_from_rq",
    "settle_queue",
    "truncate_error",
    "write_notices",
]
