"""Machines forked from the emulator's zygote behave as Machines started with exec.

Each test runs the same script under a `ProcessRunner` that forks from a zygote and under one
that starts a new interpreter, and compares what the processes saw and how they ended.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from django_flyworkers.emulator.runner import ProcessRunner, group_members
from django_flyworkers.emulator.zygote import DEFAULT_PRELOAD, same_interpreter
from django_flyworkers.testing import wait_for
from tests.procfs import proc_state

REPORT = """
import atexit, json, os, sys, threading, time

def later():
    time.sleep(0.2)
    with open("thread-" + os.environ["FLY_MACHINE_ID"], "w") as f:
        f.write("done")

threading.Thread(target=later).start()  # not a daemon: the interpreter waits for it
atexit.register(lambda: print("atexit ran", flush=True))
report = {
    "argv": sys.argv,
    "cwd": os.getcwd(),
    "path0": sys.path[0],
    "machine": os.environ.get("FLY_MACHINE_ID"),
    "secret": os.environ.get("SECRET"),
    "own_session": os.getsid(0) == os.getpid(),
    "stdin": os.read(0, 10).decode(),
    "name": __name__,
    "preloaded": "rq.worker" in sys.modules,
}
with open("report-" + os.environ["FLY_MACHINE_ID"], "w") as f:
    json.dump(report, f)
print("to stdout")
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""

ENDINGS = {
    "falls off the end": "pass",
    "sys.exit(7)": "import sys; sys.exit(7)",
    "sys.exit with a message": "import sys; sys.exit('goodbye')",
    "an uncaught exception": "raise RuntimeError('boom')",
    "SIGKILL": "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
    "KeyboardInterrupt": "raise KeyboardInterrupt",
}


class Runs:
    """A ProcessRunner in `workdir` that collects each run's return code."""

    def __init__(self, workdir: Path, preload: tuple[str, ...], **env: str) -> None:
        self.codes: dict[int, int] = {}
        self.done = threading.Condition()
        self.runner = ProcessRunner(
            workdir=workdir,
            log_dir=workdir / "logs",
            base_env={**os.environ, "SECRET": "s3", **env},
            on_exit=self._exited,
            preload=preload,
        )

    def _exited(self, run_id: int, code: int) -> None:
        with self.done:
            self.codes[run_id] = code
            self.done.notify_all()

    def run(self, machine_id: str, run_id: int, argv: list[str], **env: str) -> int:
        self.runner.launch(machine_id, run_id, argv, {"FLY_MACHINE_ID": machine_id, **env})
        with self.done:
            assert self.done.wait_for(lambda: run_id in self.codes, timeout=30), "no exit"
        return self.codes[run_id]

    def log(self, machine_id: str) -> str:
        return self.runner.log_path(machine_id).read_text()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "report.py").write_text(REPORT)
    for number, source in enumerate(ENDINGS.values()):
        (tmp_path / f"ending{number}.py").write_text(source)
    return tmp_path


@pytest.fixture
def forked(workdir: Path) -> Iterator[Runs]:
    runs = Runs(workdir, ("rq.worker",))
    assert runs.runner.zygote_ready(timeout=60)
    yield runs
    runs.runner.shutdown()
    assert group_members(runs.runner.all_pgids()) == []


@pytest.fixture
def execed(workdir: Path) -> Iterator[Runs]:
    runs = Runs(workdir, ())
    yield runs
    runs.runner.shutdown()


@pytest.mark.parametrize("inline", [False, True], ids=["script", "-c"])
def test_a_forked_machine_sees_what_a_new_interpreter_sees(
    inline: bool, forked: Runs, execed: Runs, workdir: Path
) -> None:
    command = ["python", "-c", REPORT, "3"] if inline else ["python", "report.py", "3"]
    assert forked.run("fork", 1, command) == 3
    assert execed.run("exec", 1, command) == 3

    seen = {m: json.loads((workdir / f"report-{m}").read_text()) for m in ("fork", "exec")}
    assert seen["fork"].pop("preloaded") is True  # it did come from the zygote
    assert seen["exec"].pop("preloaded") is False
    seen["exec"]["machine"] = "fork"
    assert seen["fork"] == seen["exec"]
    assert seen["fork"] == {
        "argv": ["-c", "3"] if inline else ["report.py", "3"],
        "cwd": str(workdir),
        "path0": "" if inline else str(workdir),
        "machine": "fork",
        "secret": "s3",
        "own_session": True,
        "stdin": "",
        "name": "__main__",
    }
    for machine in ("fork", "exec"):
        # Non-daemon threads were waited for, atexit ran, both streams reached the log.
        assert (workdir / f"thread-{machine}").read_text() == "done"
        log = (forked if machine == "fork" else execed).log(machine)
        assert "to stdout" in log and "to stderr" in log and "atexit ran" in log


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_a_forked_machine_ends_with_the_status_exec_would_give(
    ending: str, forked: Runs, execed: Runs
) -> None:
    script = f"ending{list(ENDINGS).index(ending)}.py"
    code = forked.run("fork", 1, ["python", script])
    assert code == execed.run("exec", 1, ["python", script])
    if ending == "an uncaught exception":
        assert "RuntimeError: boom" in forked.log("fork")
    if ending == "sys.exit with a message":
        assert "goodbye" in forked.log("fork")


def test_what_a_fork_cannot_reproduce_starts_with_exec(forked: Runs, workdir: Path) -> None:
    def preloaded(machine_id: str) -> bool:
        return bool(json.loads((workdir / f"report-{machine_id}").read_text())["preloaded"])

    assert forked.run("plain", 1, ["python", "report.py", "0"]) == 0
    assert preloaded("plain")
    # Another PYTHON* variable changes how an interpreter starts: that one is started anew.
    assert forked.run("warned", 2, ["python", "report.py", "0"], PYTHONWARNINGS="error") == 0
    assert not preloaded("warned")
    # So are commands that are neither a script nor -c: -m, other programs, missing files.
    assert forked.run("module", 3, ["python", "-m", "report"]) == 1
    assert not preloaded("module")
    assert forked.run("shell", 4, ["sh", "-c", "exit 6"]) == 6
    assert forked.run("missing", 5, ["python", "missing.py"]) == 2


def test_a_variable_read_at_import_is_the_zygotes_or_the_command_starts_anew(
    workdir: Path,
) -> None:
    # rq 3 reads RQ_KEY_PREFIX at import: a fork would keep the zygote's prefix.
    (workdir / "envreader.py").write_text("import os\nVALUE = os.environ.get('ENVREADER', '-')\n")
    (workdir / "seen.py").write_text(
        "import json, os, sys\n"
        "preloaded = 'envreader' in sys.modules\n"
        "import envreader\n"
        "with open('seen-' + os.environ['FLY_MACHINE_ID'], 'w') as f:\n"
        "    json.dump([preloaded, envreader.VALUE], f)\n"
    )
    runs = Runs(workdir, ("envreader",), PYTHONPATH=str(workdir), ENVREADER="zygote's")
    try:
        assert runs.runner.zygote_ready(timeout=60)
        zygote: Any = runs.runner._zygote
        assert "ENVREADER" in zygote.read_at_import
        assert runs.run("same", 1, ["python", "seen.py"]) == 0
        assert runs.run("other", 2, ["python", "seen.py"], ENVREADER="mine") == 0
    finally:
        runs.runner.shutdown()
    seen = {m: json.loads((workdir / f"seen-{m}").read_text()) for m in ("same", "other")}
    assert seen == {"same": [True, "zygote's"], "other": [False, "mine"]}


def test_machines_start_with_exec_until_the_zygote_has_done_its_imports(workdir: Path) -> None:
    # The emulator launches Machines under its lock: a boot must not wait for the imports.
    (workdir / "slow_import.py").write_text("import time\ntime.sleep(2)\n")
    (workdir / "which.py").write_text(
        "import sys\nsys.exit(10 if 'slow_import' in sys.modules else 20)\n"
    )
    runs = Runs(workdir, ("slow_import",), PYTHONPATH=str(workdir))
    try:
        assert runs.run("early", 1, ["python", "which.py"]) == 20  # started with exec
        assert runs.runner.zygote_ready(timeout=60)
        assert runs.run("later", 2, ["python", "which.py"]) == 10  # forked from the zygote
    finally:
        runs.runner.shutdown()


def test_same_interpreter_compares_python_variables_and_the_locale() -> None:
    zygote_env = {"PATH": "/bin", "PYTHONHASHSEED": "0"}
    argv = [sys.executable, "manage.py", "rqworker"]
    assert same_interpreter(argv, {"PATH": "/usr/bin", "PYTHONHASHSEED": "0"}, zygote_env)
    assert not same_interpreter(argv, {"PYTHONHASHSEED": "1"}, zygote_env)
    assert not same_interpreter(argv, {"PYTHONPATH": "/x", "PYTHONHASHSEED": "0"}, zygote_env)
    assert not same_interpreter(["/usr/bin/python3.9", "manage.py"], {}, {})
    assert not same_interpreter([sys.executable, "-m", "rq"], {}, {})
    assert same_interpreter([sys.executable, "-c", "pass"], {}, {})
    assert not same_interpreter([sys.executable, "-c"], {}, {})
    # What the zygote's imports read, as the zygote reports it.
    assert same_interpreter(argv, {"RQ_KEY_PREFIX": "app"}, {}, ())
    assert not same_interpreter(argv, {"RQ_KEY_PREFIX": "app"}, {}, {"RQ_KEY_PREFIX"})
    # The locale too: an interpreter picks its stdio encoding from it.
    assert not same_interpreter(argv, {"LC_ALL": "C"}, {"LC_ALL": "C.UTF-8"})


def test_a_dead_zygote_kills_its_machines_and_later_boots_use_exec(
    forked: Runs, workdir: Path
) -> None:
    (workdir / "sleep.py").write_text("import time\ntime.sleep(60)\n")
    forked.runner.launch("sleeper", 1, ["python", "sleep.py"], {"FLY_MACHINE_ID": "sleeper"})
    pid = forked.runner.pid(1)
    assert pid is not None
    zygote: Any = forked.runner._zygote
    # At once: the Machine may not have its own session yet, and must die all the same.
    os.kill(zygote._popen.pid, signal.SIGKILL)

    with forked.done:
        assert forked.done.wait_for(lambda: 1 in forked.codes, timeout=10)
    assert forked.codes[1] == -signal.SIGKILL
    wait_for(lambda: proc_state(pid) in ("", "Z"), timeout=10, what="the orphan to die")
    assert forked.run("after", 2, ["python", "report.py", "0"]) == 0
    assert json.loads((workdir / "report-after").read_text())["preloaded"] is False


def test_the_default_preload_list_imports_without_settings() -> None:
    # A module that reads Django settings at import would fail here, in a process with no
    # DJANGO_SETTINGS_MODULE, as it would fail (and be skipped) in the zygote.
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)"
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    modules = [name for name in DEFAULT_PRELOAD if name != "psycopg"]
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", code, *modules], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_ps_shows_the_machine_command_for_a_forked_process(
    forked: Runs, execed: Runs, workdir: Path
) -> None:
    # GET .../ps reads /proc, where a fork shows the zygote's command line.
    (workdir / "sleep.py").write_text("import time\nprint('up', flush=True)\ntime.sleep(60)\n")
    commands = {}
    for name, runs in (("fork", forked), ("exec", execed)):
        runs.runner.launch(name, 1, ["python", "sleep.py", "x"], {"FLY_MACHINE_ID": name})
        log = runs.runner.log_path(name)
        wait_for(lambda: "up" in log.read_text(), timeout=30, what="the sleeper")  # noqa: B023
        commands[name] = [stat["command"] for stat in runs.runner.processes(1)]
        runs.runner.kill([1])
    assert commands["fork"] == commands["exec"] == [f"{sys.executable} sleep.py x"]
