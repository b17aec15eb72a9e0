"""What a ``manage.py`` command started by a test costs: `subprocess` or `ForkedPopen`.

    .venv/bin/python benchmarks/forked_commands.py [--runs 10]

Tests start ``manage.py`` commands and scripts as real processes. `subprocess.run` starts a
new interpreter each time; ``django_flyworkers.testing.processes.run`` forks the command from
a zygote that imported Django, rq, redis and httpx once. This runs ``tests/manage.py check``
both ways, alternating which goes first, and prints per command the wall time from launch to
exit and the CPU the command's process used (``benchmarks/_stamp.py`` records it at exit: a
fork counts only what it did after the fork), as medians and fork/exec ratios, and the
zygote's own start-up CPU, paid once per process that uses it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAMP = ROOT / "benchmarks" / "_stamp.py"
COMMAND = [sys.executable, str(STAMP), str(ROOT / "tests" / "manage.py"), "check"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="commands each way")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    from django_flyworkers.testing import processes

    began = time.process_time()
    zygote = processes.zygote()  # started and waited for here, not inside the first run
    zygote_cpu = _cpu_of(zygote._popen.pid)
    print(f"zygote ready: {zygote_cpu:.2f} s of its own CPU, once (this process: "
          f"{time.process_time() - began:.2f} s)")  # fmt: skip
    runners: dict[str, Any] = {"exec": subprocess.run, "fork": processes.run}
    wall: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    with tempfile.TemporaryDirectory(prefix="flyworkers-forked-") as stamps:
        for number in range(args.runs):
            order = ["exec", "fork"] if number % 2 == 0 else ["fork", "exec"]
            for name in order:
                machine = f"{name}-{number}"
                env = {**os.environ, "FLYWORKERS_BENCH_STAMPS": stamps, "FLY_MACHINE_ID": machine}
                started = time.monotonic()
                done = runners[name](COMMAND, env=env, capture_output=True, text=True, cwd=ROOT)
                wall[name].append(time.monotonic() - started)
                assert done.returncode == 0, done.stderr
                cpu[name].append(_stamped_cpu(Path(stamps, f"{machine}.jsonl")))
            print(
                f"  run {number + 1:2d}: exec {cpu['exec'][-1]:.3f} s CPU "
                f"{wall['exec'][-1]:.3f} s wall, fork {cpu['fork'][-1]:.3f} s CPU "
                f"{wall['fork'][-1]:.3f} s wall",
                flush=True,
            )
    median = {name: (statistics.median(cpu[name]), statistics.median(wall[name])) for name in cpu}
    print(f"\n== tests/manage.py check, median of {args.runs} each way")
    for name, (cpu_s, wall_s) in median.items():
        print(f"  {name:5s} {cpu_s:6.3f} s CPU  {wall_s:6.3f} s launch to exit")
    print(
        f"  fork/exec: CPU {median['fork'][0] / median['exec'][0]:.2f}, "
        f"wall {median['fork'][1] / median['exec'][1]:.2f}; the zygote pays for itself after "
        f"{zygote_cpu / max(1e-9, median['exec'][0] - median['fork'][0]):.1f} commands"
    )


def _stamped_cpu(path: Path) -> float:
    """The CPU the command recorded at exit (the last line `_stamp.py` wrote)."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return float(next(line["cpu"] for line in reversed(lines) if "cpu" in line))


def _cpu_of(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
