"""ForkedPopen behaves as subprocess.Popen: each check runs a command both ways and compares."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from django_flyworkers.testing import processes, wait_for
from django_flyworkers.testing.processes import ForkedPopen

REPORT = """
import json, os, sys
line = sys.stdin.readline()
print(json.dumps({
    "argv": sys.argv,
    "cwd": os.getcwd(),
    "path0": sys.path[0],
    "marker": os.environ.get("MARKER"),
    "stdin": line,
    "own_session": os.getsid(0) == os.getpid(),
    "name": __name__,
    "encoding": sys.stdout.encoding,
}))
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""

SLEEPER = "import sys, time\nprint('up', flush=True)\ntime.sleep(60)\n"


@pytest.fixture
def scripts(tmp_path: Path) -> Path:
    (tmp_path / "report.py").write_text(REPORT)
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    return tmp_path


def both(argv: list[str], **kwargs: Any) -> dict[str, Any]:
    """What `subprocess.run` and `processes.run` gave, keyed "exec" and "fork"."""
    forked = processes.run(argv, **kwargs)
    started = subprocess.run(argv, **kwargs)
    return {"fork": forked, "exec": started}


@pytest.mark.parametrize("inline", [False, True], ids=["script", "-c"])
def test_a_forked_command_sees_and_ends_as_an_executed_one(
    inline: bool, scripts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MARKER", "from os.environ")
    argv = [sys.executable, *(["-c", REPORT] if inline else ["report.py"]), "3"]
    done = both(argv, cwd=scripts, input="hello\n", capture_output=True, text=True)
    assert done["fork"].returncode == done["exec"].returncode == 3
    assert done["fork"].stderr == done["exec"].stderr == "to stderr\n"
    seen = {way: json.loads(result.stdout) for way, result in done.items()}
    assert seen["fork"] == seen["exec"]
    assert seen["fork"]["argv"] == ["-c", "3"] if inline else ["report.py", "3"]
    assert seen["fork"]["marker"] == "from os.environ"  # env=None: the caller's, as it is now
    assert seen["fork"]["stdin"] == "hello\n"
    assert seen["fork"]["own_session"] is False


def test_a_relative_cwd_is_the_callers(scripts: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(scripts.parent)
    argv = [sys.executable, "report.py", "0"]
    done = both(argv, cwd=scripts.name, input="", capture_output=True, text=True)
    assert done["fork"].returncode == done["exec"].returncode == 0
    assert json.loads(done["fork"].stdout)["cwd"] == str(scripts)


def test_it_is_forked_where_it_can_be_and_executed_elsewhere(scripts: Path) -> None:
    python = sys.executable
    with ForkedPopen([python, "report.py", "0"], cwd=scripts, stdin=subprocess.DEVNULL) as one:
        assert one.forked
    # Not `python <script>` or `-c`, a changed PYTHON* variable, or options fork cannot honour.
    others: list[tuple[list[str], dict[str, Any]]] = [
        ([python, "-m", "report", "0"], {}),
        (["sh", "-c", "exit 0"], {}),
        ([python, "report.py", "0"], {"env": {**os.environ, "PYTHONHASHSEED": "7"}}),
        ([python, "report.py", "0"], {"preexec_fn": os.getpid}),
        ([python, "report.py", "0"], {"pass_fds": (0,)}),
    ]
    for argv, kwargs in others:
        with ForkedPopen(argv, cwd=scripts, stdin=subprocess.DEVNULL, **kwargs) as process:
            assert not process.forked, argv
        assert process.returncode == 0, argv


@pytest.mark.parametrize(
    "ending,code",
    [
        ("import sys; sys.exit('bye')", 1),
        ("raise RuntimeError('boom')", 1),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", -signal.SIGKILL),
        ("raise KeyboardInterrupt", -signal.SIGINT),
        ("import os; os._exit(300)", 300 & 0xFF),
    ],
)
def test_the_status_is_the_one_exec_gives(ending: str, code: int) -> None:
    done = both([sys.executable, "-c", ending], capture_output=True, text=True)
    assert done["fork"].returncode == done["exec"].returncode == code
    assert done["fork"].stderr.splitlines()[-1:] == done["exec"].stderr.splitlines()[-1:]


def test_wait_poll_signals_and_timeouts(scripts: Path) -> None:
    sleeper = [sys.executable, "sleeper.py"]
    process = ForkedPopen(sleeper, cwd=scripts, stdout=subprocess.PIPE, text=True)
    assert process.forked
    assert process.stdout is not None and process.stdout.readline() == "up\n"
    assert process.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        process.wait(timeout=0.2)
    process.terminate()
    assert process.wait(timeout=10) == -signal.SIGTERM
    assert process.poll() == -signal.SIGTERM
    process.stdout.close()

    # run(timeout=...) kills what outlives it, as subprocess.run does.
    with pytest.raises(subprocess.TimeoutExpired):
        processes.run(sleeper, cwd=scripts, stdout=subprocess.DEVNULL, timeout=0.5)

    # A session of its own when asked, so the whole group can be signalled.
    leader = ForkedPopen(
        sleeper, cwd=scripts, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert leader.stdout is not None and leader.stdout.readline() == "up\n"
    assert os.getsid(leader.pid) == leader.pid
    os.killpg(leader.pid, signal.SIGKILL)
    assert leader.wait(timeout=10) == -signal.SIGKILL
    leader.stdout.close()


def test_a_command_it_starts_inherits_its_streams(tmp_path: Path) -> None:
    # dup2 onto 0, 1 and 2 leaves them inheritable, as exec leaves them.
    code = "import subprocess; subprocess.run(['sh', '-c', 'echo from-grandchild; echo e >&2'])"
    done = both([sys.executable, "-c", code], capture_output=True, text=True)
    assert done["fork"].stdout == done["exec"].stdout == "from-grandchild\n"
    assert done["fork"].stderr == done["exec"].stderr == "e\n"
    merged = processes.run(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert sorted(merged.stdout.split()) == [b"e", b"from-grandchild"]


def test_check_raises_with_the_output() -> None:
    with pytest.raises(subprocess.CalledProcessError) as failed:
        processes.run(
            [sys.executable, "-c", "print('out'); raise SystemExit(4)"],
            capture_output=True,
            text=True,
            check=True,
        )
    assert (failed.value.returncode, failed.value.stdout) == (4, "out\n")


def test_a_dead_zygote_kills_what_it_forked_and_the_next_command_gets_a_new_one(
    scripts: Path,
) -> None:
    process = ForkedPopen([sys.executable, "sleeper.py"], cwd=scripts, stdout=subprocess.PIPE)
    assert process.forked and process.stdout is not None
    assert process.stdout.readline() == b"up\n"
    dead = processes.zygote()
    os.kill(dead._popen.pid, signal.SIGKILL)
    assert process.wait(timeout=10) == -signal.SIGKILL
    process.stdout.close()
    wait_for(lambda: dead.closed, timeout=10, what="the zygote's death to be seen")

    report = [sys.executable, "report.py", "0"]
    with ForkedPopen(report, cwd=scripts, stdin=subprocess.DEVNULL) as again:
        assert again.forked
    assert again.returncode == 0
    assert processes.zygote() is not dead


def test_unwaited_lists_a_forked_command_until_its_status_is_collected(scripts: Path) -> None:
    process = ForkedPopen([sys.executable, "sleeper.py"], cwd=scripts, stdout=subprocess.DEVNULL)
    assert process in processes.unwaited()
    process.kill()
    assert process.wait(timeout=10) == -signal.SIGKILL
    assert process not in processes.unwaited()
