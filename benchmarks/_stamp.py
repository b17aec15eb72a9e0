"""Run ``python SCRIPT ARGS...`` and stamp when its start-up phases end. Benchmarks only.

``benchmarks/cold_start.py`` puts this file in front of a worker Machine's command
(``python benchmarks/_stamp.py manage.py rqworker ...``), so the product needs no hook. Once
``django.setup()`` returns, it appends one JSON line of Unix times to
``$FLYWORKERS_BENCH_STAMPS/<FLY_MACHINE_ID>.jsonl``:

* ``spawn``: when the kernel created the process (``/proc/self/stat``, +-5 ms);
* ``main``: when this file started to run (the interpreter and ``site`` are up);
* ``setup``: when ``django.setup()`` returned.

At exit (unless the process ends with ``os._exit``) it appends a second line, ``{"pid",
"cpu", "end"}``: the CPU seconds the process and its reaped children used, and when.

Everything after that (rq's worker registration, the first job) is read from Redis.
"""

import time

MAIN = time.time()

import json  # noqa: E402  (after the stamp: only the interpreter's own start-up comes before it)
import os  # noqa: E402
import runpy  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402


def spawned_at() -> float | None:
    """When the kernel created this process, as a Unix time (None off Linux)."""
    try:
        with open("/proc/self/stat") as stat_file:
            stat = stat_file.read()
        # "pid (comm) state ...": field 22, starttime, counts clock ticks since boot.
        ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError, IndexError):
        return None
    # The kernel truncates to a tick: add half of one so the estimate is unbiased.
    return time.time() - age + 0.5 / os.sysconf("SC_CLK_TCK")


def _write(stamps: dict[str, Any]) -> None:
    directory = os.environ.get("FLYWORKERS_BENCH_STAMPS")
    if not directory:
        return
    name = os.environ.get("FLY_MACHINE_ID") or "local"
    with open(os.path.join(directory, f"{name}.jsonl"), "a") as out:
        out.write(json.dumps(stamps) + "\n")


def _install_setup_stamp(spawn: float | None) -> None:
    import django

    real_setup = django.setup

    def setup(*args: Any, **kwargs: Any) -> None:
        real_setup(*args, **kwargs)
        _write({"pid": os.getpid(), "spawn": spawn, "main": MAIN, "setup": time.time()})
        django.setup = real_setup

    django.setup = setup


def _stamp_exit() -> None:
    times = os.times()
    cpu = times.user + times.system + times.children_user + times.children_system
    _write({"pid": os.getpid(), "cpu": cpu, "end": time.time()})


def main() -> None:
    import atexit

    atexit.register(_stamp_exit)
    _install_setup_stamp(spawned_at())
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    # What `python SCRIPT` would have put first on the path, instead of this file's directory.
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
