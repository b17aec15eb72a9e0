"""The fixed cost of a cold start on the emulator, phase by phase, and what each cut saves.

    .venv/bin/python benchmarks/cold_start.py [--rounds 12] [--variants default,no-scheduler]
                                              [--importtime-runs 3]

Every variant is a worker command; each gets a queue and a Machine of its own, created
stopped. One round of a variant enqueues one no-op job, then starts its Machine through the
Machines API; the worker runs the job, finds the queue empty and exits (``--burst``), and the
Machine stops. Rounds are interleaved across variants (this machine is noisy: compare the
variants with each other, not with other runs). The first round of each variant is a warm-up
and is not counted.

The phases come from real parts, without a hook in the product. ``benchmarks/_stamp.py`` is
put in front of the command and stamps the first three:

  machine start  the start request -> the worker process exists (``/proc``, +-5 ms)
  interpreter    -> Python runs the command's first line
  django.setup   -> ``django.setup()`` returned
  worker start   -> rq registered the worker (its ``birth`` in Redis): system checks, the
                 command's and the worker's imports, worker init
  first job      -> the first job started (rq's ``started_at``): presence, the ledger's boot row,
                 pubsub, the scheduler's pass, registry maintenance, the dequeue and the fork
  total          the start request -> the first job started
  exit           the job ended -> the Machine stopped (the emulator's exit event)
  billed         Machine-seconds billed for the round (the emulator's stats)

Then ``python -X importtime`` of the default command (run locally, ``--importtime-runs``
times): where the import time goes, by top-level package, and which import brought each in.

Variants (``--variants``, comma-separated; default: all):

  default            the product's command, ``QueueProfile.worker_command()``
  no-scheduler       without ``--with-scheduler``
  skip-checks        with ``--skip-checks`` (Django runs every system check before a command)
  ordered-unsub      a FlyWorker that stops rq's pubsub thread before unsubscribing
                     (``benchmarks/_variants.py``)
  fast-exit          ordered-unsub, and ``os._exit(0)`` once the work loop is over
  lean               no-scheduler + skip-checks + fast-exit
  settings-testing   settings that import ``django_flyworkers.testing`` (as
                     ``tests/settings.py`` does): what that costs each test worker
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _harness as h

STAMP = Path(__file__).resolve().parent / "_stamp.py"
PHASES = ("machine start", "interpreter", "django.setup", "worker start", "first job")
COLUMNS = (*PHASES, "total", "exit", "billed")


@dataclass(frozen=True)
class Variant:
    """A worker command (made from the product's) and extra environment for its Machine."""

    name: str
    describe: str
    command: Callable[[list[str]], list[str]] = lambda cmd: cmd
    env: Mapping[str, str] = field(default_factory=dict)


def _without(flag: str) -> Callable[[list[str]], list[str]]:
    return lambda cmd: [part for part in cmd if part != flag]


def _worker_class(path: str) -> Callable[[list[str]], list[str]]:
    def replace(cmd: list[str]) -> list[str]:
        at = cmd.index("--worker-class") + 1
        return [*cmd[:at], path, *cmd[at + 1 :]]

    return replace


def _chain(*steps: Callable[[list[str]], list[str]]) -> Callable[[list[str]], list[str]]:
    return lambda cmd: functools.reduce(lambda acc, step: step(acc), steps, cmd)


_NO_SCHEDULER = _without("--with-scheduler")
_SKIP_CHECKS: Callable[[list[str]], list[str]] = lambda cmd: [*cmd, "--skip-checks"]  # noqa: E731
_ORDERED = _worker_class("benchmarks._variants.OrderedUnsubscribeWorker")
_FAST_EXIT = _worker_class("benchmarks._variants.FastExitWorker")

VARIANTS = {
    variant.name: variant
    for variant in [
        Variant("default", "the product's worker command"),
        Variant("no-scheduler", "without --with-scheduler", _NO_SCHEDULER),
        Variant("skip-checks", "with --skip-checks", _SKIP_CHECKS),
        Variant("ordered-unsub", "pubsub thread stopped before unsubscribing", _ORDERED),
        Variant("fast-exit", "ordered-unsub, then os._exit(0) after the work loop", _FAST_EXIT),
        Variant(
            "lean",
            "no-scheduler + skip-checks + fast-exit",
            _chain(_NO_SCHEDULER, _SKIP_CHECKS, _FAST_EXIT),
        ),
        Variant(
            "settings-testing",
            "settings import django_flyworkers.testing, as tests/settings.py does",
            env={"FLYWORKERS_BENCH_IMPORT_TESTING": "1"},
        ),
    ]
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12, help="counted rounds per variant")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, from: {', '.join(VARIANTS)}",
    )
    parser.add_argument("--importtime-runs", type=int, default=3, help="0 to skip")
    args = parser.parse_args()
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or not names or args.rounds < 1 or args.importtime_runs < 0:
        parser.error(
            f"unknown variant(s): {', '.join(unknown)}"
            if unknown
            else "need at least one variant, --rounds >= 1 and --importtime-runs >= 0"
        )
    variants = [VARIANTS[name] for name in names]
    queues = {variant.name: f"cold-{i}" for i, variant in enumerate(variants)}
    profiles = {queues[v.name]: _profile(queues[v.name], v) for v in variants}
    bench = h.prepare(profiles, wake_mode="off", prefix="cold-start")
    stamps = bench.tmp / "stamps"
    stamps.mkdir()
    os.environ["FLYWORKERS_BENCH_STAMPS"] = str(stamps)
    complete = False
    try:
        with h.redis_server(bench), h.emulator(bench) as server:
            results = _rounds(bench, server, variants, queues, stamps, args.rounds)
            _report(variants, results, args.rounds)
            if args.importtime_runs:
                _importtime(queues[variants[0].name], args.importtime_runs)
        complete = all(len(results[v.name]) == args.rounds for v in variants)
    finally:
        h.cleanup(bench, keep=not complete)


def _profile(queue: str, variant: Variant) -> dict[str, Any]:
    from django_flyworkers.conf import default_worker_command

    command = variant.command(default_worker_command(queue))
    if command[0] != "python":
        raise SystemExit(f"cannot stamp a command that does not start with python: {command}")
    return {"CMD": ["python", str(STAMP), *command[1:]], "ENV": dict(variant.env)}


@dataclass
class Round:
    """One cold start of one variant: phase -> seconds."""

    values: dict[str, float]


def _rounds(
    bench: h.Bench,
    server: Any,
    variants: Sequence[Variant],
    queues: Mapping[str, str],
    stamps: Path,
    rounds: int,
) -> dict[str, dict[int, Round]]:
    import django_rq

    from django_flyworkers.api import get_client
    from django_flyworkers.conf import get_settings
    from django_flyworkers.emulator import EmulatorControl
    from django_flyworkers.scaling.spec import machine_config, machine_name

    settings = get_settings()
    client = get_client()
    control = EmulatorControl(server.url, bench.token)
    machines: dict[str, str] = {}
    for variant in variants:
        queue = queues[variant.name]
        profile = settings.profile(queue)
        assert profile is not None
        config = machine_config(profile, settings)
        created = client.create(
            config, name=machine_name(queue), region=settings.region, skip_launch=True
        )
        machines[variant.name] = created.id
    conn = django_rq.get_connection(queues[variants[0].name])
    results: dict[str, dict[int, Round]] = {variant.name: {} for variant in variants}
    total = rounds + 1
    for number in range(total):
        for variant in variants:
            measured = _one_round(
                bench, client, control, conn, queues[variant.name], machines[variant.name], stamps
            )
            if number and measured is not None:  # round 0 warms up
                results[variant.name][number] = measured
        print(f"\r  round {number + 1}/{total} done", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    calls = control.stats()
    limited = sum(calls["rate_limited"].values())
    if limited:
        print(f"  note: the emulator answered 429 {limited} times (retried)")
    return results


def _one_round(
    bench: h.Bench,
    client: Any,
    control: Any,
    conn: Any,
    queue: str,
    machine_id: str,
    stamps: Path,
) -> Round | None:
    from rq.job import Job

    from benchmarks.jobs import noop

    job = noop.using(queue=queue).delay()
    billed_before = control.stats()["machines"][machine_id]["billed_seconds"]
    t0 = time.time()
    client.start(machine_id)
    _wait_stopped(control, machine_id, t0)
    stopped_at = _exit_time(bench, machine_id, t0)
    billed = control.stats()["machines"][machine_id]["billed_seconds"] - billed_before
    stamp = _stamp(stamps / f"{machine_id}.jsonl", t0)
    birth = _birth(conn, machine_id, t0)
    fetched = Job.fetch(job.id, connection=conn)
    if stamp is None or birth is None or fetched.started_at is None or stopped_at is None:
        print(f"\n  incomplete round on {machine_id}: see its log in {bench.tmp / 'logs'}")
        return None
    started = fetched.started_at.timestamp()
    ended = fetched.ended_at.timestamp() if fetched.ended_at else started
    marks = [t0, stamp["spawn"], stamp["main"], stamp["setup"], birth, started]
    values = {phase: marks[i + 1] - marks[i] for i, phase in enumerate(PHASES)}
    values.update(total=started - t0, exit=stopped_at - ended, billed=billed)
    return Round(values)


def _wait_stopped(control: Any, machine_id: str, t0: float, timeout: float = 120.0) -> None:
    from django_flyworkers.testing import wait_for

    def stopped() -> bool:
        machine = control.stats()["machines"][machine_id]
        return bool(machine["state"] == "stopped" and machine["starts"] and time.time() > t0)

    wait_for(stopped, timeout, f"Machine {machine_id} to stop", interval=0.02)


def _exit_time(bench: h.Bench, machine_id: str, t0: float) -> float | None:
    """When the emulator saw the worker process exit (its ``exit`` event)."""
    import httpx

    from django_flyworkers.conf import get_settings

    url = f"{bench.api_url}/v1/apps/{get_settings().app_name}/machines/{machine_id}/events"
    headers = {"Authorization": f"Bearer {bench.token}"}
    for attempt in range(20):
        response = httpx.get(url, headers=headers, timeout=10)
        if response.status_code != 429:
            break
        time.sleep(0.2 * (attempt + 1))  # Fly's limit: 1 request/s per action and Machine
    response.raise_for_status()
    exits = [e["timestamp"] / 1000 for e in response.json() if e["type"] == "exit"]
    after = [stamp for stamp in exits if stamp >= t0]
    return min(after) if after else None


def _stamp(path: Path, t0: float) -> dict[str, float] | None:
    if not path.exists():
        return None
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # The kernel's start time has a 10 ms resolution.
    fresh = [s for s in lines if s.get("spawn") is not None and s["spawn"] >= t0 - 0.006]
    return fresh[-1] if fresh else None


def _birth(conn: Any, machine_id: str, t0: float) -> float | None:
    from rq.utils import utcparse

    births = []
    for key in conn.scan_iter(match=f"rq:worker:{machine_id}-*"):
        raw = conn.hget(key, "birth")
        if raw:
            births.append(utcparse(raw.decode()).timestamp())
    after = [birth for birth in births if birth >= t0]
    return max(after) if after else None


STARTUP = ("machine start", "interpreter", "django.setup")
AFTER_SETUP = ("worker start", "first job")
DELTAS = {
    "start-up": STARTUP,
    "worker+job": AFTER_SETUP,
    "exit": ("exit",),
    "billed": ("billed",),
}
"""Paired differences reported per variant: the sum of these phases."""


def _report(
    variants: Sequence[Variant], results: Mapping[str, Mapping[int, Round]], rounds: int
) -> None:
    names = [variant.name for variant in variants]
    print("\n== cold start on the emulator: the start request to the first job, and the exit")
    for variant in variants:
        print(f"  {variant.name:16s} {variant.describe} ({len(results[variant.name])} rounds)")
    for label, q in (("median", 50), ("p95", 95)):
        rows = []
        for column in COLUMNS:
            cells = []
            for name in names:
                values = [r.values[column] for r in results[name].values()]
                cells.append(h.seconds(h.percentile(values, q), 3))
            rows.append([column, *cells])
        print(f"\n{label} of {rounds} rounds")
        print(h.table(["phase", *names], rows))
    slow = [
        f"{name} {sum(r.values['exit'] >= 1.0 for r in results[name].values())}"
        f"/{len(results[name])}"
        for name in names
    ]
    print(f"exits of 1 s or more (rq's pubsub thread join timing out): {', '.join(slow)}")
    base = results[names[0]]
    if len(names) < 2 or not base:
        return
    print(
        f"\n== each variant minus {names[0]}, paired by round: median [p25, p75] of the "
        "differences (negative: faster or cheaper)"
    )
    rows = []
    for name in names[1:]:
        paired = [number for number in results[name] if number in base]
        cells = []
        for columns in DELTAS.values():

            def summed(r: Round, columns: Sequence[str] = columns) -> float:
                return sum(r.values[c] for c in columns)

            diffs = [summed(results[name][n]) - summed(base[n]) for n in paired]
            cells.append(
                f"{h.percentile(diffs, 50):+.3f}s "
                f"[{h.percentile(diffs, 25):+.3f}, {h.percentile(diffs, 75):+.3f}]"
                if diffs
                else "-"
            )
        billed = [results[name][n].values["billed"] - base[n].values["billed"] for n in paired]
        cells.append(f"{statistics.fmean(billed):+.3f}s" if billed else "-")
        rows.append([name, *cells])
    print(h.table(["variant", *DELTAS, "billed (mean)"], rows))
    print(
        "  start-up = machine start + interpreter + django.setup; "
        "worker+job = worker start + first job; the bill is a sum, so its mean counts"
    )


_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)")
OURS = "django_flyworkers"


@dataclass
class Imports:
    """One ``-X importtime`` run, summarized."""

    by_package: dict[str, float]
    """Self time (s) per top-level package."""
    via: dict[str, str]
    """Per package, the imports (closest last) that first brought it in."""
    pulled: dict[str, float]
    """``ours.module -> other.module``: cumulative time (s) of what our modules import."""


def _importtime(queue: str, runs: int) -> None:
    """Where a worker's import time goes, median of ``runs`` local runs of the command."""
    from django_flyworkers.conf import default_worker_command

    command = default_worker_command(queue)
    parsed: list[Imports] = []
    walls: list[float] = []
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-X", "importtime", *command[1:]],
            cwd=h.WORKDIR,
            capture_output=True,
            text=True,
            check=False,
        )
        walls.append(time.perf_counter() - started)
        if done.returncode:
            print(f"  importtime run failed: {done.stderr[-500:]}")
            return
        parsed.append(_parse_importtime(done.stderr))

    def median_of(pick: Callable[[Imports], dict[str, float]]) -> dict[str, float]:
        keys = {key for run in parsed for key in pick(run)}
        return {key: statistics.median(pick(run).get(key, 0.0) for run in parsed) for key in keys}

    packages = median_of(lambda run: run.by_package)
    pulled = median_of(lambda run: run.pulled)
    total = statistics.median(sum(run.by_package.values()) for run in parsed)
    via = parsed[0].via
    print(
        f"\n== imports of `{' '.join(command[:4])} ...`, run locally ({runs} runs, median): "
        f"{total:.3f}s of imports in a {statistics.median(walls):.3f}s run"
    )
    top = sorted(packages.items(), key=lambda item: -item[1])[:15]
    rows = [[p, h.seconds(v, 3), f"{v / total:.0%}", via.get(p, "")] for p, v in top]
    print(h.table(["package", "self time", "share", "first imported by"], rows))
    print(f"\nwhat {OURS} modules import from elsewhere, cumulative (first import only):")
    top = sorted(pulled.items(), key=lambda item: -item[1])[:10]
    print(h.table(["import", "cumulative"], [[k, h.seconds(v, 3)] for k, v in top]))


def _parse_importtime(text: str) -> Imports:
    rows = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if match:
            self_us, cumulative_us, indent, name = match.groups()
            rows.append((int(self_us) / 1e6, int(cumulative_us) / 1e6, len(indent) // 2, name))
    by_package: dict[str, float] = defaultdict(float)
    for self_time, _, _, name in rows:
        by_package[name.split(".")[0]] += self_time

    # importtime prints a module after everything it imported, one level deeper: a module's
    # importer is the next line one level up.
    def importers(index: int) -> list[str]:
        found, want = [], rows[index][2] - 1
        for _, _, level, other in rows[index + 1 :]:
            if want < 0:
                break
            if level == want:
                found.append(other)
                want -= 1
        return found

    via: dict[str, str] = {}
    pulled: dict[str, float] = {}
    for index, (_, cumulative, _, name) in enumerate(rows):
        package = name.split(".")[0]
        above = importers(index)
        if package not in via:
            outside = [m for m in reversed(above) if m.split(".")[0] != package]
            via[package] = " > ".join(outside[-3:]) if outside else "(the command)"
        if above and package != OURS and above[0].split(".")[0] == OURS:
            pulled[f"{above[0]} -> {name}"] = cumulative
    return Imports(dict(by_package), via, pulled)


if __name__ == "__main__":
    main()
