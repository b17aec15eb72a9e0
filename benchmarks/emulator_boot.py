"""What a worker Machine's boot costs on the emulator: a new interpreter, or a fork of the zygote.

    .venv/bin/python benchmarks/emulator_boot.py [--rounds 10]

The emulator starts a Machine's ``python <script>`` command either as a new interpreter (the
default, like a real boot) or, with ``Emulator(preload=True)`` as the pytest plugin and
``make demo`` use, by forking a zygote that imported Django, rq, redis and httpx once
(``django_flyworkers/emulator/zygote.py``). This runs the product's worker command for an
empty queue both ways, on real parts (a redis-server, a fresh SQLite database): the worker
boots, finds no job and exits (``--burst``). Rounds alternate which way goes first.

For each boot it prints the wall time from launch to the exit the emulator reaps, and the CPU
time the Machine's process used (``benchmarks/_stamp.py`` records it at exit), as medians and
as zygote/exec ratios. The ratios are what to compare: this machine is noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _harness as h

STAMP = Path(__file__).resolve().parent / "_stamp.py"
QUEUE = "boot"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="counted boots each way")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    bench = h.prepare({QUEUE: {}}, wake_mode="off", prefix="emulator-boot")
    stamps = bench.tmp / "stamps"
    stamps.mkdir()
    os.environ["FLYWORKERS_BENCH_STAMPS"] = str(stamps)
    from django_flyworkers.conf import get_settings
    from django_flyworkers.emulator.runner import ProcessRunner
    from django_flyworkers.emulator.zygote import DEFAULT_PRELOAD

    profile = get_settings().profile(QUEUE)
    assert profile is not None
    command = profile.worker_command()
    argv = [command[0], str(STAMP), *command[1:]]  # python _stamp.py manage.py rqworker ...
    exits: dict[str, float] = {}
    exited = threading.Condition()

    def on_exit(run_id: int, code: int) -> None:
        with exited:
            exits[str(run_id)] = time.time()
            exited.notify_all()

    ways = {
        name: ProcessRunner(
            workdir=h.WORKDIR,
            log_dir=bench.tmp / "logs",
            base_env=dict(os.environ),
            on_exit=on_exit,
            preload=preload,
        )
        for name, preload in (("exec", ()), ("zygote", DEFAULT_PRELOAD))
    }
    if not ways["zygote"].zygote_ready(timeout=120):
        raise SystemExit("the zygote did not get ready")
    walls: dict[str, list[float]] = {name: [] for name in ways}
    cpus: dict[str, list[float]] = {name: [] for name in ways}
    run_id = 0
    try:
        with h.redis_server(bench):
            for number in range(args.rounds + 1):  # round 0 warms up (and starts the zygote)
                order = list(ways) if number % 2 else list(reversed(ways))
                for name in order:
                    run_id += 1
                    machine_id = f"{name}-{run_id}"
                    started = time.time()
                    ways[name].launch(machine_id, run_id, argv, {"FLY_MACHINE_ID": machine_id})
                    with exited:
                        if not exited.wait_for(lambda key=str(run_id): key in exits, timeout=120):
                            raise SystemExit(f"{machine_id} did not exit; see {bench.tmp}/logs")
                    cpu = _exit_cpu(stamps / f"{machine_id}.jsonl")
                    if number:
                        walls[name].append(exits[str(run_id)] - started)
                        cpus[name].append(cpu)
                print(f"\r  round {number + 1}/{args.rounds + 1}", end="", file=sys.stderr)
            print(file=sys.stderr)
    finally:
        for runner in ways.values():
            runner.shutdown()
    _report(walls, cpus)
    h.cleanup(bench)


def _exit_cpu(path: Path) -> float:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return float(next(line["cpu"] for line in reversed(lines) if "cpu" in line))


def _report(walls: dict[str, list[float]], cpus: dict[str, list[float]]) -> None:
    print("\n== a worker Machine's boot on the emulator, empty queue (medians)")
    rows = [
        [
            name,
            h.seconds(statistics.median(walls[name]), 3),
            h.seconds(statistics.median(cpus[name]), 3),
        ]
        for name in walls
    ]
    print(h.table(["started as", "launch to exit", "CPU"], rows))
    wall = statistics.median(walls["zygote"]) / statistics.median(walls["exec"])
    cpu = statistics.median(cpus["zygote"]) / statistics.median(cpus["exec"])
    print(f"zygote/exec: wall {wall:.2f}x, CPU {cpu:.2f}x ({len(cpus['exec'])} boots each)")


if __name__ == "__main__":
    main()
