"""fly.toml, the Dockerfile and the sandbox settings agree with each other and with the README.

No Docker engine or Fly account here: the files are parsed and cross-checked, and the sandbox
settings are loaded the way each kind of Machine on Fly would load them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from django_flyworkers.testing import processes

ROOT = Path(__file__).resolve().parent.parent
SANDBOX = ROOT / "sandbox_project"
FLY_TOML = ROOT / "fly.toml"
DOCKERFILE = ROOT / "Dockerfile"
SECRETS = ("FLY_API_TOKEN", "REDIS_URL", "DATABASE_URL", "DJANGO_SECRET_KEY")


@cache
def fly() -> dict[str, Any]:
    return tomllib.loads(FLY_TOML.read_text())


@cache
def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def dockerfile(word: str) -> list[str]:
    return [rest for name, rest in instructions() if name == word]


def cmd() -> list[str]:
    [raw] = dockerfile("CMD")
    value = json.loads(raw)  # exec form: no shell between Fly's init and gunicorn
    assert isinstance(value, list)
    return value


PROBE = """
import json
import os
import django
from django.conf import settings
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sandbox.settings")  # as manage.py does
database = {k: settings.DATABASES["default"].get(k) for k in ("ENGINE", "NAME", "HOST", "PORT")}
# psycopg is installed in the image only; nothing here connects anyway.
settings.DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
django.setup()
from django_flyworkers.conf import get_settings
from gallery import jobs
fw = get_settings()
print(json.dumps({
    "wsgi": settings.WSGI_APPLICATION,
    "database": database,
    "debug": settings.DEBUG,
    "api_url": fw.api_url,
    "app_name": fw.app_name,
    "image": fw.image,
    "stop_timeout": fw.stop_timeout,
    "queues": {name: p.max_machines for name, p in fw.queues.items()},
    "timeouts": [f.flyjob.options.get("timeout") for f in
                 (jobs.make_thumbnail, jobs.send_receipt, jobs.publish_digest)],
}))
"""


def sandbox(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run python in sandbox_project with exactly ``env`` on top of a clean environment."""
    base = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("FLYWORKERS_", "FLY_", "DJANGO_"))
        and key not in ("REDIS_URL", "DATABASE_URL")
    }
    return processes.run(
        [sys.executable, *args],
        cwd=SANDBOX,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


FLY_RUNTIME = {  # what Fly sets on every Machine of the app, plus the secrets
    "FLY_APP_NAME": "flyworkers-sandbox",
    "FLY_IMAGE_REF": "registry.fly.io/flyworkers-sandbox:deployment-1",
    "FLY_REGION": "ord",
    "FLY_API_TOKEN": "FlyV1 not-a-real-token",
    "DJANGO_SECRET_KEY": "not-secret-either",
    "REDIS_URL": "redis://127.0.0.1:1/0",
    "DATABASE_URL": "postgres://u:p@127.0.0.1:1/sandbox",
}


def probe(env: dict[str, str]) -> dict[str, Any]:
    result = sandbox("-c", PROBE, env=env)
    assert result.returncode == 0, result.stderr
    value: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return value


def test_fly_toml_web_process_port_and_lifecycle() -> None:
    config = fly()
    assert set(config["processes"]) == {"web", "scaler"}
    service = config["http_service"]
    assert service["processes"] == ["web"]
    assert service["internal_port"] == 8000
    assert service["auto_stop_machines"] in ("stop", "suspend")
    assert service["auto_start_machines"] is True
    assert service["min_machines_running"] == 0
    assert config["kill_signal"] == "SIGTERM"
    assert "manage.py migrate" in config["deploy"]["release_command"]
    assert {vm["processes"][0] for vm in config["vm"]} == {"web", "scaler"}


def test_fly_toml_env_holds_no_secret_and_comments_name_them() -> None:
    env = fly()["env"]
    assert env["DJANGO_SETTINGS_MODULE"] == "sandbox.settings"
    assert not set(SECRETS) & set(env)
    text = FLY_TOML.read_text()
    assert "fly tokens create deploy" in text
    for secret in SECRETS:
        assert re.search(rf"^#.*\b{secret}\b", text, re.M), f"{secret} is not explained"
    assert re.search(r"^#.*Worker Machines are NOT a process group", text, re.M)


def test_scaler_process_runs_an_existing_command() -> None:
    args = shlex.split(fly()["processes"]["scaler"])
    assert args[:3] == ["python", "manage.py", "flyworkers_scale"]
    assert (ROOT / "django_flyworkers/management/commands/flyworkers_scale.py").is_file()
    assert args[3:] == ["--watch", "30"]


def test_dockerfile_cmd_is_the_web_process_and_the_sandbox_wsgi_app() -> None:
    command = cmd()
    assert command == shlex.split(fly()["processes"]["web"])
    assert command[0] == "gunicorn"
    module, _, attr = command[1].partition(":")
    settings = probe(FLY_RUNTIME)
    assert settings["wsgi"] == f"{module}.{attr}" == "sandbox.wsgi.application"
    assert (SANDBOX / Path(*module.split("."))).with_suffix(".py").is_file()
    assert (
        command[command.index("--bind") + 1] == f"0.0.0.0:{fly()['http_service']['internal_port']}"
    )
    assert dockerfile("EXPOSE") == [str(fly()["http_service"]["internal_port"])]


def test_dockerfile_slim_base_non_root_and_static_files() -> None:
    [base] = dockerfile("FROM")
    assert re.fullmatch(r"python:3\.1[1-9]-slim", base)
    names = [name for name, _ in instructions()]
    [user] = dockerfile("USER")
    assert user not in ("root", "0")
    # The user switch comes after everything that needs root, right before the command.
    assert names.index("USER") > max(i for i, name in enumerate(names) if name == "RUN")
    runs = " ".join(dockerfile("RUN"))
    assert "useradd" in runs
    assert "pip install . -r sandbox_project/requirements.txt" in runs
    assert "collectstatic --noinput" in runs
    requirements = (SANDBOX / "requirements.txt").read_text()
    assert re.search(r"^gunicorn\b", requirements, re.M)
    # Worker Machines run `python manage.py rqworker ...` from the image's last WORKDIR.
    assert dockerfile("WORKDIR")[-1] == "/app/sandbox_project"
    assert "COPY sandbox_project ./sandbox_project" in [f"COPY {r}" for r in dockerfile("COPY")]
    assert (SANDBOX / "manage.py").is_file()
    # gunicorn must not be a dependency of the library itself.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert not any("gunicorn" in dep for dep in pyproject["project"]["dependencies"])


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for pattern in (".git", ".venv", "**/*.sqlite3*", "**/.emulator"):
        assert pattern in ignored


def test_kill_timeout_fits_the_jobs_and_the_workers_stop_timeout() -> None:
    settings = probe(FLY_RUNTIME)
    kill_timeout = fly()["kill_timeout"]
    assert kill_timeout <= 300  # Fly's maximum
    assert kill_timeout >= max(t for t in settings["timeouts"] if t)
    assert settings["stop_timeout"] == kill_timeout


@pytest.mark.parametrize(
    ("machine", "env", "api_url"),
    [
        # Web and scaler Machines: fly.toml's [env] plus the secrets.
        ("web", {**FLY_RUNTIME, **fly()["env"]}, "http://_api.internal:4280"),
        # Worker Machines: only the secrets and Fly's variables (no [env]).
        ("worker", {**FLY_RUNTIME, "FLYWORKERS_QUEUE": "images"}, "https://api.machines.dev"),
    ],
)
def test_settings_on_fly_machines(machine: str, env: dict[str, str], api_url: str) -> None:
    settings = probe(env)
    assert settings["debug"] is False
    assert settings["api_url"] == api_url
    assert settings["app_name"] == "flyworkers-sandbox"
    assert settings["image"] == FLY_RUNTIME["FLY_IMAGE_REF"]
    assert settings["queues"] == {"default": 2, "images": 3}
    assert settings["database"] == {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "sandbox",
        "HOST": "127.0.0.1",
        "PORT": "1",
    }
    # System checks as on Fly (SQLite instead of Postgres: psycopg is in the image only).
    env = {**env, "DATABASE_URL": "sqlite:///:memory:"}
    check = sandbox("manage.py", "check", "--fail-level", "WARNING", env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert not (SANDBOX / ":memory:").exists()  # an in-memory database, not a file


def test_settings_refuse_to_run_without_a_secret_key_in_production() -> None:
    env = {key: value for key, value in FLY_RUNTIME.items() if key != "DJANGO_SECRET_KEY"}
    result = sandbox("manage.py", "check", env=env)
    assert result.returncode != 0
    assert "Set DJANGO_SECRET_KEY" in result.stderr


def test_locally_without_a_token_the_api_is_the_emulator() -> None:
    settings = probe({"DJANGO_DEBUG": "1"})
    assert settings["api_url"] == "http://127.0.0.1:4280"
    assert settings["app_name"] == "flyworkers-sandbox"
    assert settings["database"]["ENGINE"] == "django.db.backends.sqlite3"
    assert settings["database"]["NAME"] == str(SANDBOX / "db.sqlite3")


def test_readme_promises_what_the_files_say() -> None:
    readme = (ROOT / "README.md").read_text()
    config = fly()
    assert f"internal_port = {config['http_service']['internal_port']}" in readme
    for name in (*config["processes"], "kill_timeout", "release_command", "auto_stop_machines"):
        assert name in readme, name
    assert "fly tokens create deploy" in readme
    for secret in SECRETS:
        assert secret in readme
    assert "sandbox.wsgi:application" in readme
