"""The emulator benchmarks run end to end on real parts, and say in one line what a build lacks.

The figures themselves are measured by running the scripts, not here: these tests only hold
the scripts to working (tiny traces, one round) and their helpers to being right.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from django.test import override_settings

from benchmarks import _harness as harness
from benchmarks.cold_start import _parse_importtime
from benchmarks.cost_trace import JOB_SECONDS, QUEUES, STRATEGIES, make_trace
from django_flyworkers.testing import processes

ROOT = Path(__file__).resolve().parent.parent


def run_script(name: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWORKERS_")}
    done = processes.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_trace_is_fixed_by_its_seed() -> None:
    trace = make_trace(6, 30, seed=10)
    assert trace == make_trace(6, 30, seed=10)
    assert trace != make_trace(6, 30, seed=11)
    assert len(trace) == 180
    assert {job.burst for job in trace} == set(range(6))
    assert {job.queue for job in trace} == set(QUEUES)
    assert all(JOB_SECONDS[0] <= job.seconds <= JOB_SECONDS[1] for job in trace)


def test_percentile_interpolates() -> None:
    assert harness.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert harness.percentile([0.0, 10.0], 95) == pytest.approx(9.5)
    assert harness.percentile([4.0], 95) == 4.0


# The system checks it runs ask the database what it supports (JSONField on SQLite), once per
# process: whichever test comes first in an xdist process pays, so this one must be allowed to.
@pytest.mark.django_db
def test_a_profile_this_build_rejects_is_named_in_one_line() -> None:
    bad = {
        "APP_NAME": "bench",
        "API_TOKEN": "t",
        "IMAGE": "img",
        "QUEUES": {"default": {"MAX_MACHINES": 1, "NO_SUCH_KEY": 1}},
    }
    with override_settings(FLYWORKERS=bad):
        reason = harness.unsupported()
    assert reason is not None and "\n" not in reason
    assert reason.startswith("flyworkers.E009") and "NO_SUCH_KEY" in reason
    good = {**bad, "QUEUES": {"default": {"MAX_MACHINES": 1}}}
    with override_settings(FLYWORKERS=good):
        assert harness.unsupported() is None


def test_importtime_is_attributed_to_packages_and_importers() -> None:
    # What `python -X importtime` prints: children first, one level deeper than their importer.
    text = "\n".join(
        [
            "import time: self [us] | cumulative | imported package",
            "import time:       300 |        300 |         h11",
            "import time:      1000 |       1300 |       httpx",
            "import time:       200 |       1500 |     django_flyworkers.machines.client",
            "import time:       100 |       1600 |   django_flyworkers.machines",
            "import time:        50 |       1650 | django_flyworkers.presence",
        ]
    )
    parsed = _parse_importtime(text)
    assert parsed.by_package == pytest.approx(
        {"h11": 0.0003, "httpx": 0.001, "django_flyworkers": 0.00035}
    )
    assert parsed.via["httpx"].endswith("django_flyworkers.machines.client")
    assert parsed.pulled == {"django_flyworkers.machines.client -> httpx": pytest.approx(0.0013)}


@pytest.mark.slow(18)
def test_cost_trace_replays_a_small_trace() -> None:
    strategies = ["stop", "always-on", "suspend", "dedicated"]
    out = run_script(
        "cost_trace.py",
        *("--bursts", "2", "--jobs-per-burst", "3", "--gap", "1"),
        *("--strategies", ",".join(strategies)),
        "--preload",
    )
    for name in strategies:
        row = re.search(rf"^{name} +(\d+\.\d+) .* 6/6$", out, re.M)
        skipped = re.search(
            rf"^{name}: not supported by this build \(flyworkers\.\w+: .+\)$", out, re.M
        )
        # What runs today must run; what this build lacks must say so in one line.
        assert row or (skipped and name not in ("stop", "always-on")), out
        if row:
            assert float(row.group(1)) > 0, out
    assert set(strategies) <= set(STRATEGIES)


@pytest.mark.slow(6)
def test_cold_start_breaks_a_cold_start_into_phases() -> None:
    out = run_script(
        "cold_start.py",
        "--rounds",
        "1",
        "--variants",
        "default,fast-exit",
        "--importtime-runs",
        "1",
    )
    for phase in ("machine start", "interpreter", "django.setup", "worker start", "first job"):
        assert re.search(rf"^{re.escape(phase)} +-?\d+\.\d+s +-?\d+\.\d+s$", out, re.M), out
    total = re.search(r"^total +(\d+\.\d+)s", out, re.M)
    assert total and float(total.group(1)) > 0, out
    assert re.search(r"^fast-exit +[+-]\d", out, re.M), out
    assert re.search(r"^django +\d+\.\d+s", out, re.M), out


def test_emulator_boot_compares_exec_with_the_zygote() -> None:
    out = run_script("emulator_boot.py", "--rounds", "1")
    for way in ("exec", "zygote"):
        assert re.search(rf"^{way} +\d+\.\d+s +\d+\.\d+s$", out, re.M), out
    ratios = re.search(r"^zygote/exec: wall (\d+\.\d+)x, CPU (\d+\.\d+)x", out, re.M)
    assert ratios and float(ratios.group(2)) > 0, out


def test_forked_commands_compares_subprocess_with_forked_popen() -> None:
    out = run_script("forked_commands.py", "--runs", "1")
    assert re.search(r"^zygote ready: \d+\.\d+ s of its own CPU", out, re.M), out
    for way in ("exec", "fork"):
        assert re.search(rf"^  {way} +\d+\.\d+ s CPU +\d+\.\d+ s launch to exit$", out, re.M), out
    ratios = re.search(r"^  fork/exec: CPU (\d+\.\d+), wall (\d+\.\d+);", out, re.M)
    assert ratios and float(ratios.group(1)) > 0, out


def test_readme_commands_name_scripts_and_options_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"python (benchmarks/\S+\.py)((?: --[\w-]+(?: [^\s-]\S*)?)*)", readme)
    assert {"benchmarks/cold_start.py", "benchmarks/cost_trace.py"} <= {c[0] for c in commands}
    for script, options in commands:
        source = (ROOT / script).read_text()
        for option in re.findall(r"--[\w-]+", options):
            assert f'"{option}"' in source, f"{script} has no {option}"
