"""What an operator can do from the dashboard, through the code paths the commands use.

This is the one module between the dashboard's views and the scaler, the reaper and the
Machines API. Every operation checks its input first and raises :class:`Refused` (nothing
changed) when it is wrong; otherwise it acts, records a ``ScaleEvent`` naming the user, and
returns a :class:`Done` saying what happened. API failures come back as ``Done(ok=False)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rq.job import Job
from rq.worker import Worker

from django_flyworkers import ledger
from django_flyworkers.api import get_client
from django_flyworkers.conf import get_settings
from django_flyworkers.exceptions import NotConfigured
from django_flyworkers.machines import Machine, MachinesAPIError, MachinesClient
from django_flyworkers.models import FlyJob, WorkerMachine
from django_flyworkers.queue import get_queue
from django_flyworkers.scaling import actions

REASON = "dashboard"


class Refused(Exception):
    """Bad input or a refused action: nothing was changed. The message says why."""


@dataclass(frozen=True)
class Done:
    """What an operation did."""

    ok: bool
    message: str


def known_queue(name: str) -> str:
    """``name`` if flyworkers manages that queue; else Refused."""
    if get_settings().profile(name) is None:
        raise Refused(f"Unknown queue {name!r}.")
    return name


def _record(queue: str, action: str, user: str, done: Done, *, machine_id: str = "",
            reason: str = "", began: float | None = None) -> Done:  # fmt: skip
    elapsed = int((time.monotonic() - began) * 1000) if began is not None else 0
    ledger.record_user_event(
        queue, action, user=user, machine_id=machine_id, reason=reason or f"{REASON}: {action}",
        outcome="ok" if done.ok else "error", detail=done.message, duration_ms=elapsed,
    )  # fmt: skip
    return done


# -- per queue ---------------------------------------------------------------------------------


def wake(queue: str, *, user: str) -> Done:
    """Reconcile ``queue`` now (what ``flyworkers_scale`` does): start Machines for its work."""
    from django_flyworkers.scaling import scaler

    queue, began = known_queue(queue), time.monotonic()
    try:
        result = scaler.reconcile(queue, reason=f"{REASON}: wake now", user=user)
    except (MachinesAPIError, NotConfigured) as exc:
        return _record(queue, "wake", user, Done(False, str(exc)), began=began)
    actions, errors = list(result.actions), list(result.errors)
    if errors:
        done = Done(False, f"Wake {queue}: " + "; ".join(errors))
    elif actions:
        done = Done(True, f"Woke {queue}: " + ", ".join(actions) + ".")
    else:
        done = Done(True, f"Nothing to start for {queue}: {result.plan.reason or 'no backlog'}.")
    return _record(queue, "wake", user, done, began=began)


def parse_count(text: Any, queue: str) -> int:
    """A pool size for ``queue``: a whole number from 0 to its MAX_MACHINES."""
    profile = get_settings().profile(known_queue(queue))
    assert profile is not None
    try:
        count = int(str(text).strip())
    except ValueError:
        raise Refused(f"Pool size must be a whole number, got {text!r}.") from None
    if not 0 <= count <= profile.max_machines:
        raise Refused(
            f"Pool size {count} is outside 0..{profile.max_machines} (MAX_MACHINES of {queue!r})."
        )
    return count


def set_pool(queue: str, count: Any, *, user: str) -> Done:
    """Make ``queue``'s pool ``count`` Machines, as ``flyworkers_scale --count`` does."""
    from django_flyworkers.scaling import scaler

    count, began = parse_count(count, queue), time.monotonic()
    try:
        result = scaler.resize(queue, count, user=user)
    except ValueError as exc:
        raise Refused(str(exc)) from None
    actions, errors = list(result.actions), list(result.errors)
    if errors:
        done = Done(False, f"Pool of {queue}: " + "; ".join(errors))
    else:
        did = ", ".join(actions) if actions else "nothing to change"
        done = Done(True, f"Pool of {queue} set to {count}: {did}.")
    return _record(queue, "resize", user, done, reason=f"{REASON}: pool size {count}", began=began)


def reap(queue: str, *, user: str) -> Done:
    """What ``flyworkers_reap`` does, for ``queue``."""
    from django_flyworkers import reaper

    queue, began = known_queue(queue), time.monotonic()
    report = reaper.reap([queue], user=user)
    item = report.queues[0]
    errors = [*report.errors, *item.errors]
    said = [
        f"{len(item.synced)} synced",
        f"{len(item.recovered)} jobs recovered",
        f"{len(item.stopped)} stopped",
        f"{len(item.destroyed)} destroyed",
    ]
    message = f"Reaped {queue}: " + ", ".join(said) + "."
    done = Done(not errors, message + (" Errors: " + "; ".join(errors) if errors else ""))
    return _record(queue, "reap", user, done, began=began)


# -- per failed job ----------------------------------------------------------------------------


def failed_job(job_id: str) -> tuple[FlyJob, Any]:
    """The ledger row and the rq queue of a failed job; else Refused."""
    row = FlyJob.objects.filter(job_id=str(job_id)).first()
    if row is None:
        raise Refused(f"Unknown job {job_id!r}.")
    if row.status != FlyJob.Status.FAILED:
        raise Refused(f"Job {job_id} is {row.status}, not failed.")
    return row, get_queue(known_queue(row.queue))


def retry_job(job_id: str, *, user: str) -> Done:
    """Requeue a failed job through FlyQueue: its row goes back to queued and a Machine wakes."""
    row, queue = failed_job(job_id)
    registry = queue.failed_job_registry
    if queue.connection.zscore(registry.key, row.job_id) is None:
        raise Refused(f"Job {row.job_id} is no longer in rq's failed registry: nothing to retry.")
    job = Job.fetch(row.job_id, connection=queue.connection, serializer=queue.serializer)
    if not queue.connection.zrem(registry.key, job.id):
        raise Refused(f"Job {row.job_id} was retried or deleted meanwhile.")
    job.started_at = job.ended_at = None
    queue._enqueue_job(job)  # FlyQueue: job_enqueued revives the row and wakes a Machine
    done = Done(True, f"Job {row.job_id} requeued on {row.queue}.")
    return _record(row.queue, "retry", user, done, reason=f"{REASON}: retry job {row.job_id}")


def delete_job(job_id: str, *, user: str) -> Done:
    """Delete a failed job from rq (data, registries) and from the ledger."""
    row, queue = failed_job(job_id)
    try:
        job = Job.fetch(row.job_id, connection=queue.connection, serializer=queue.serializer)
    except Exception:  # its data expired or cannot be read: forget the row all the same
        job = None
    if job is not None:
        job.delete()
    queue.connection.zrem(queue.failed_job_registry.key, row.job_id)
    ledger.delete_job(row.job_id)
    done = Done(True, f"Job {row.job_id} deleted.")
    return _record(row.queue, "delete", user, done, reason=f"{REASON}: delete job {row.job_id}")


# -- per Machine -------------------------------------------------------------------------------


def machine_row(machine_id: str) -> WorkerMachine:
    """The ledger row of a Machine; else Refused."""
    row = WorkerMachine.objects.filter(machine_id=str(machine_id)).first()
    if row is None:
        raise Refused(f"Unknown Machine {machine_id!r}.")
    return row


def busy_jobs(machine: WorkerMachine) -> list[str]:
    """Jobs ``machine`` runs now, by the ledger or by rq's workers (whichever knows first)."""
    running = set(
        FlyJob.objects.filter(machine=machine, status=FlyJob.Status.STARTED).values_list(
            "job_id", flat=True
        )
    )
    for name in {q for q in machine.queue.split(",") if get_settings().profile(q)}:
        queue = get_queue(name)
        for worker in Worker.all(queue=queue):
            if worker.name.startswith(f"{machine.machine_id}-"):
                current = worker.get_current_job_id()
                if current:
                    running.add(current)
    return sorted(running)


def _api(call: Callable[[], Any]) -> tuple[Any, str]:
    try:
        return call(), ""
    except (MachinesAPIError, NotConfigured) as exc:
        return None, str(exc)


def stop_machine(machine_id: str, *, user: str, force: bool = False) -> Done:
    """Stop a Machine (its worker finishes the job it runs, up to STOP_TIMEOUT). Refused while
    it runs a job, unless ``force``."""
    row = machine_row(machine_id)
    busy = busy_jobs(row)
    if busy and not force:
        raise Refused(
            f"Machine {row.machine_id} is running {', '.join(busy)}: not stopped. "
            "Tick 'force' to stop it anyway."
        )
    queue = row.queue.split(",")[0]
    reason = f"{REASON}: stop" + (" (forced)" if busy else "")
    # actions.stop records the ScaleEvent (with the user), as every Machine action does.
    result = actions.stop(
        _client(), queue, row.machine_id, reason=reason, signal="SIGTERM",
        timeout=get_settings().stop_timeout, user=user,
    )  # fmt: skip
    if not result.ok:
        return Done(False, f"Stop {row.machine_id} failed: {result.detail}")
    ledger.record_machine_seen(row.machine_id, queue=queue, state="stopping")
    forced = f" (forced while running {', '.join(busy)})" if busy else ""
    return Done(True, f"Machine {row.machine_id} is stopping{forced}.")


NOT_RUNNING = frozenset({"stopped", "created", "suspended", "failed"})
"""States a Machine may be destroyed from: stopped, or never started (a pool Machine)."""


def destroy_machine(machine_id: str, *, user: str) -> Done:
    """Destroy a Machine that is not running; refused while it runs or changes state."""
    row = machine_row(machine_id)
    queue = row.queue.split(",")[0]
    machine, error = _api(lambda: get_client().get(row.machine_id))
    if error:
        return Done(False, f"Could not read Machine {row.machine_id}: {error}")
    if machine.state not in NOT_RUNNING:
        raise Refused(
            f"Machine {row.machine_id} is {machine.state}: only a stopped Machine can be "
            "destroyed. Stop it first."
        )
    result = actions.destroy(
        _client(), queue, row.machine_id, reason=f"{REASON}: destroy", user=user
    )
    if not result.ok:
        return Done(False, f"Destroy {row.machine_id} failed: {result.detail}")
    ledger.record_machine_seen(row.machine_id, queue=queue, state="destroyed")
    ledger.record_run_ended(row.machine_id, state="destroyed")
    return Done(True, f"Machine {row.machine_id} destroyed.")


def _client() -> MachinesClient:
    try:
        return get_client()
    except NotConfigured as exc:
        raise Refused(str(exc)) from None


def refresh_machine(machine_id: str) -> tuple[Machine | None, str]:
    """Read a Machine from the API and write what it says to the ledger."""
    row = machine_row(machine_id)
    machine, error = _api(lambda: get_client().get(row.machine_id))
    if machine is None:
        return None, error
    queue = row.queue
    ledger.record_machine_seen(
        machine.id, queue=queue, state=machine.state, name=machine.name, region=machine.region,
        image=machine.image, instance_id=machine.instance_id,
        guest=machine.config.get("guest") or None, last_exit_code=machine.last_exit_code,
    )  # fmt: skip
    exits = [(e.timestamp, e.exit_code) for e in machine.events if e.type == "exit" and e.timestamp]
    ledger.record_runs_seen([(machine.id, machine.state, exits)])
    return machine, ""
