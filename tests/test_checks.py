"""System checks: every bad setting gets a stable id and a useful message."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from django_flyworkers import conf
from django_flyworkers.checks import check_settings

GOOD = {
    "API_URL": "https://api.machines.dev",
    "API_TOKEN": "secret-token-value",
    "APP_NAME": "app",
    "IMAGE": "registry.fly.io/app:v1",
    "QUEUES": {"default": {"MAX_MACHINES": 2}},
}


def ids(settings: Any, **overrides: Any) -> list[str]:
    settings.FLYWORKERS = {**GOOD, **overrides}
    return sorted(message.id for message in check_settings())


@pytest.fixture(autouse=True)
def only_default_queue(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.RQ_QUEUES = {"default": {"URL": "redis://127.0.0.1:1/0"}}
    for env in ("FLY_API_TOKEN", "FLY_APP_NAME", "FLY_IMAGE_REF", "FLYWORKERS_API_URL"):
        monkeypatch.delenv(env, raising=False)


def test_good_settings_pass(settings: Any) -> None:
    assert ids(settings) == []


def test_missing_token_app_image(settings: Any) -> None:
    assert ids(settings, API_TOKEN=None, APP_NAME=None, IMAGE=None) == [
        "flyworkers.E002",
        "flyworkers.E003",
        "flyworkers.E004",
    ]


def test_missing_values_fine_when_wake_mode_off(settings: Any) -> None:
    assert ids(settings, API_TOKEN=None, APP_NAME=None, IMAGE=None, WAKE_MODE="off") == []


def test_env_fallbacks(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLY_API_TOKEN", "t")
    monkeypatch.setenv("FLY_APP_NAME", "a")
    monkeypatch.setenv("FLY_IMAGE_REF", "i")
    assert ids(settings, API_TOKEN=None, APP_NAME=None, IMAGE=None) == []


def test_queue_missing_from_rq_queues(settings: Any) -> None:
    assert ids(settings, QUEUES={"default": {}, "ghost": {}}) == ["flyworkers.E005"]


def test_rq_queue_not_managed_is_a_warning(settings: Any) -> None:
    settings.RQ_QUEUES = {"default": {}, "local": {}}
    assert ids(settings) == ["flyworkers.W002"]


def test_django_rq_not_installed(settings: Any) -> None:
    settings.INSTALLED_APPS = [app for app in settings.INSTALLED_APPS if app != "django_rq"]
    assert "flyworkers.E006" in ids(settings)


def test_queue_class_must_be_flyqueue(settings: Any) -> None:
    settings.RQ = {}
    assert ids(settings) == ["flyworkers.E007"]
    settings.RQ = {"QUEUE_CLASS": "django_rq.queues.DjangoRQ"}
    assert ids(settings) == ["flyworkers.E007"]


def test_machine_bounds(settings: Any) -> None:
    assert ids(settings, QUEUES={"default": {"MAX_MACHINES": 0}}) == ["flyworkers.E008"]
    assert ids(settings, QUEUES={"default": {"MAX_MACHINES": 2, "MIN_MACHINES": 3}}) == [
        "flyworkers.E008"
    ]


def test_unknown_keys(settings: Any) -> None:
    assert ids(settings, QUEUES={"default": {"MAX_MACHNES": 2}}) == ["flyworkers.E009"]
    assert ids(settings, TOKEN="x") == ["flyworkers.E009"]
    assert ids(settings, QUEUES={"default": {"GUEST": {"cpu": 2}}}) == ["flyworkers.E010"]


def test_bad_types_and_wake_mode(settings: Any) -> None:
    assert ids(settings, QUEUES={"default": {"MAX_MACHINES": "lots"}}) == ["flyworkers.E001"]
    assert ids(settings, WAKE_MODE="async") == ["flyworkers.E011"]


def test_plain_http_warning(settings: Any) -> None:
    settings.DEBUG = False
    assert ids(settings, API_URL="http://api.example.com") == ["flyworkers.W001"]
    assert ids(settings, API_URL="http://127.0.0.1:4280") == []
    assert ids(settings, API_URL="http://_api.internal:4280") == []
    settings.DEBUG = True
    assert ids(settings, API_URL="http://api.example.com") == []


@pytest.mark.django_db  # Django 6's check command also runs database checks
def test_check_command_fails_on_errors(settings: Any) -> None:
    settings.FLYWORKERS = {**GOOD, "QUEUES": {"default": {"MAX_MACHINES": 0}}}
    with pytest.raises(SystemCheckError, match=r"flyworkers.E008"):
        call_command("check")


def test_token_never_in_check_messages(settings: Any) -> None:
    settings.FLYWORKERS = {**GOOD, "QUEUES": {"default": {"MAX_MACHINES": 0}}, "WAKE_MODE": "x"}
    text = " ".join(str(m) for m in check_settings())
    assert "secret-token-value" not in text


# -- every bad value: its check id, a message naming the key, never an exception ---------------


def queue(**profile: Any) -> dict[str, Any]:
    return {"QUEUES": {"default": {"MAX_MACHINES": 2, **profile}}}


def guest(**values: Any) -> dict[str, Any]:
    return queue(GUEST=values)


INF, NAN = float("inf"), float("nan")
BAD_VALUES: list[tuple[str, Any, str, str]] = [
    # (case, FLYWORKERS overrides (or a whole non-dict value), check id, the key it names)
    ("not a dict", ["QUEUES"], "E001", "FLYWORKERS"),
    ("a string", "FLYWORKERS", "E001", "FLYWORKERS"),
    ("unknown key", {"TOKEN": "x"}, "E009", "TOKEN"),
    ("unknown lowercase key", {"queues": {}}, "E009", "queues"),
    ("API_URL not a url", {"API_URL": "not a url"}, "E001", "API_URL"),
    ("API_URL a number", {"API_URL": 4280}, "E001", "API_URL"),
    ("API_URL ftp", {"API_URL": "ftp://api.machines.dev"}, "E001", "API_URL"),
    ("API_URL no host", {"API_URL": "https://"}, "E001", "API_URL"),
    ("API_TOKEN a number", {"API_TOKEN": 12345678}, "E001", "API_TOKEN"),
    ("API_TOKEN with a space", {"API_TOKEN": "secret token-value"}, "E001", "API_TOKEN"),
    ("API_TOKEN with a newline", {"API_TOKEN": "secret-token-value\n"}, "E001", "API_TOKEN"),
    ("API_TOKEN scheme only", {"API_TOKEN": "FlyV1 "}, "E001", "API_TOKEN"),
    ("API_TOKEN two macaroons split", {"API_TOKEN": "FlyV1 fm2_a, fm2_b"}, "E001", "API_TOKEN"),
    ("APP_NAME a number", {"APP_NAME": 5}, "E001", "APP_NAME"),
    ("APP_NAME with a space", {"APP_NAME": "my app"}, "E001", "APP_NAME"),
    ("APP_NAME upper case", {"APP_NAME": "MyApp"}, "E001", "APP_NAME"),
    ("APP_NAME a path", {"APP_NAME": "app/../other"}, "E001", "APP_NAME"),
    ("IMAGE a list", {"IMAGE": ["registry.fly.io/app:v1"]}, "E001", "IMAGE"),
    ("IMAGE with a space", {"IMAGE": "registry.fly.io/app v1"}, "E001", "IMAGE"),
    ("REGION a number", {"REGION": 1}, "E001", "REGION"),
    ("REGION a city", {"REGION": "Chicago!"}, "E001", "REGION"),
    ("WAKE_MODE unknown", {"WAKE_MODE": "async"}, "E011", "WAKE_MODE"),
    ("WAKE_MODE None", {"WAKE_MODE": None}, "E011", "WAKE_MODE"),
    ("WAKE_MODE a bool", {"WAKE_MODE": False}, "E011", "WAKE_MODE"),
    ("GLOBAL_MAX_MACHINES 0", {"GLOBAL_MAX_MACHINES": 0}, "E001", "GLOBAL_MAX_MACHINES"),
    ("GLOBAL_MAX_MACHINES 2.5", {"GLOBAL_MAX_MACHINES": 2.5}, "E001", "GLOBAL_MAX_MACHINES"),
    ("GLOBAL_MAX_MACHINES a str", {"GLOBAL_MAX_MACHINES": "5"}, "E001", "GLOBAL_MAX_MACHINES"),
    ("GLOBAL_MAX_MACHINES True", {"GLOBAL_MAX_MACHINES": True}, "E001", "GLOBAL_MAX_MACHINES"),
    ("HTTP_TIMEOUT fast", {"HTTP_TIMEOUT": "fast"}, "E001", "HTTP_TIMEOUT"),
    ("HTTP_TIMEOUT 0", {"HTTP_TIMEOUT": 0}, "E001", "HTTP_TIMEOUT"),
    ("HTTP_TIMEOUT negative", {"HTTP_TIMEOUT": -1.5}, "E001", "HTTP_TIMEOUT"),
    ("HTTP_TIMEOUT inf", {"HTTP_TIMEOUT": INF}, "E001", "HTTP_TIMEOUT"),
    ("HTTP_TIMEOUT nan", {"HTTP_TIMEOUT": NAN}, "E001", "HTTP_TIMEOUT"),
    ("HTTP_TIMEOUT a tuple", {"HTTP_TIMEOUT": (5, 30)}, "E001", "HTTP_TIMEOUT"),
    ("API_RETRY_SECONDS -5", {"API_RETRY_SECONDS": -5}, "E001", "API_RETRY_SECONDS"),
    ("API_RETRY_SECONDS None", {"API_RETRY_SECONDS": None}, "E001", "API_RETRY_SECONDS"),
    ("BOOT_TIMEOUT 0", {"BOOT_TIMEOUT": 0}, "E001", "BOOT_TIMEOUT"),
    ("BOOT_TIMEOUT 1e308", {"BOOT_TIMEOUT": 1e308}, "E001", "BOOT_TIMEOUT"),
    ("STOP_TIMEOUT 0", {"STOP_TIMEOUT": 0}, "E001", "STOP_TIMEOUT"),
    ("STOP_TIMEOUT 1.5", {"STOP_TIMEOUT": 1.5}, "E001", "STOP_TIMEOUT"),
    ("WORKER_TTL 0", {"WORKER_TTL": 0}, "E001", "WORKER_TTL"),
    ("WORKER_TTL a str", {"WORKER_TTL": "90"}, "E001", "WORKER_TTL"),
    ("STUCK_AFTER -1", {"STUCK_AFTER": -1}, "E001", "STUCK_AFTER"),
    ("PRUNE_AFTER_DAYS -1", {"PRUNE_AFTER_DAYS": -1}, "E001", "PRUNE_AFTER_DAYS"),
    ("PRUNE_AFTER_DAYS huge", {"PRUNE_AFTER_DAYS": 10**9}, "E001", "PRUNE_AFTER_DAYS"),
    ("PRICES a list", {"PRICES": [0.1]}, "E001", "PRICES"),
    ("PRICES unknown kind", {"PRICES": {"gpu": {}}}, "E009", "gpu"),
    ("PRICES kind a number", {"PRICES": {"performance": 5}}, "E001", "performance"),
    ("PRICES unknown price", {"PRICES": {"shared": {"cpu": 1e-6}}}, "E009", "cpu"),
    (
        "PRICES negative",
        {"PRICES": {"shared": {"cpu_per_second": -1e-6}}},
        "E001",
        "cpu_per_second",
    ),
    ("PRICES rootfs a str", {"PRICES": {"rootfs_gb_per_second": "cheap"}}, "E001", "rootfs"),
    ("QUEUES a list", {"QUEUES": ["default"]}, "E001", "QUEUES"),
    ("profile a list", {"QUEUES": {"default": ["MAX_MACHINES"]}}, "E001", "default"),
    ("queue name a number", {"QUEUES": {"default": {}, 5: {}}}, "E001", "QUEUES"),
    ("unknown profile key", queue(MAX_MACHNES=2), "E009", "MAX_MACHNES"),
    ("MAX_MACHINES 0", queue(MAX_MACHINES=0), "E008", "MAX_MACHINES"),
    ("MAX_MACHINES negative", queue(MAX_MACHINES=-3), "E008", "MAX_MACHINES"),
    ("MAX_MACHINES 2.5", queue(MAX_MACHINES=2.5), "E001", "MAX_MACHINES"),
    ("MAX_MACHINES lots", queue(MAX_MACHINES="lots"), "E001", "MAX_MACHINES"),
    ("MIN_MACHINES above MAX", queue(MIN_MACHINES=3), "E008", "MIN_MACHINES"),
    ("MIN_MACHINES negative", queue(MIN_MACHINES=-1), "E008", "MIN_MACHINES"),
    ("MIN_MACHINES 0.5", queue(MIN_MACHINES=0.5), "E001", "MIN_MACHINES"),
    ("JOBS_PER_MACHINE 0", queue(JOBS_PER_MACHINE=0), "E001", "JOBS_PER_MACHINE"),
    ("JOBS_PER_MACHINE -4", queue(JOBS_PER_MACHINE=-4), "E001", "JOBS_PER_MACHINE"),
    ("JOBS_PER_MACHINE a str", queue(JOBS_PER_MACHINE="10"), "E001", "JOBS_PER_MACHINE"),
    ("profile REGION empty", queue(REGION=""), "E001", "REGION"),
    ("profile REGION a list", queue(REGION=["ord"]), "E001", "REGION"),
    ("IDLE_TIMEOUT -1", queue(IDLE_TIMEOUT=-1), "E001", "IDLE_TIMEOUT"),
    ("IDLE_TIMEOUT a str", queue(IDLE_TIMEOUT="30"), "E001", "IDLE_TIMEOUT"),
    ("IDLE_TIMEOUT inf", queue(IDLE_TIMEOUT=INF), "E001", "IDLE_TIMEOUT"),
    ("IDLE_ACTION unknown", queue(IDLE_ACTION="sleep"), "E001", "IDLE_ACTION"),
    ("MODE unknown", queue(MODE="solo"), "E001", "MODE"),
    ("CMD a number", queue(CMD=5), "E001", "CMD"),
    ("CMD with a number", queue(CMD=["python", 5]), "E001", "CMD"),
    ("CMD empty", queue(CMD=[]), "E001", "CMD"),
    ("CMD unbalanced quote", queue(CMD="python -c 'print(1)"), "E001", "CMD"),
    ("ENV a list", queue(ENV=["A=1"]), "E001", "ENV"),
    ("ENV value a number", queue(ENV={"A": 1}), "E001", "ENV"),
    ("ENV bad name", queue(ENV={"1A": "x"}), "E001", "ENV"),
    ("ENV reserved name", queue(ENV={"FLYWORKERS_QUEUE": "x"}), "E001", "FLYWORKERS_QUEUE"),
    ("GUEST a string", queue(GUEST="big"), "E001", "GUEST"),
    ("GUEST unknown key", guest(cpu=2), "E010", "cpu"),
    ("cpu_kind unknown", guest(cpu_kind="dedicated"), "E001", "cpu_kind"),
    ("cpus 3", guest(cpus=3), "E001", "cpus"),
    ("cpus 0", guest(cpus=0), "E001", "cpus"),
    ("cpus a str", guest(cpus="2"), "E001", "cpus"),
    ("performance cpus 32", guest(cpu_kind="performance", cpus=32), "E001", "cpus"),
    ("memory_mb not a multiple", guest(memory_mb=300), "E001", "memory_mb"),
    ("memory_mb too small", guest(memory_mb=128), "E001", "memory_mb"),
    ("memory_mb above shared max", guest(memory_mb=4096), "E001", "memory_mb"),
    ("memory_mb below perf min", guest(cpu_kind="performance", memory_mb=1024), "E001", "memory"),
    ("gpus 0", guest(gpus=0), "E001", "gpus"),
    ("gpu_kind empty", guest(gpu_kind=""), "E001", "gpu_kind"),
    ("kernel_args a str", guest(kernel_args="quiet"), "E001", "kernel_args"),
    ("max_memory_mb below memory", guest(max_memory_mb=256), "E001", "max_memory_mb"),
    (
        "suspend with 4 GB",
        queue(IDLE_ACTION="suspend", GUEST={"cpus": 2, "memory_mb": 4096}),
        "E012",
        "memory_mb",
    ),
    (
        "suspend with a GPU",
        queue(
            IDLE_ACTION="suspend",
            GUEST={"cpu_kind": "performance", "cpus": 1, "gpus": 1, "gpu_kind": "a10"},
        ),
        "E012",
        "GPU",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "check_id", "key"),
    [pytest.param(o, i, k, id=case) for case, o, i, k in BAD_VALUES],
)
def test_every_bad_value_is_reported_with_its_id_and_key(
    settings: Any, overrides: Any, check_id: str, key: str
) -> None:
    settings.FLYWORKERS = {**GOOD, **overrides} if isinstance(overrides, dict) else overrides
    messages = check_settings()  # must not raise, whatever the value
    assert [m.id for m in messages] == [f"flyworkers.{check_id}"], messages
    assert key in messages[0].msg
    assert "secret-token-value" not in messages[0].msg + str(messages[0].hint)


def test_the_table_is_large_and_covers_every_key() -> None:
    assert len(BAD_VALUES) >= 60
    named = " ".join(key for *_, key in BAD_VALUES)
    for key in [*conf.TOP_LEVEL_DEFAULTS, *conf.PROFILE_DEFAULTS]:
        assert key in named, key


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        ("FLY_API_TOKEN", "secret-token-value\n", "API_TOKEN"),
        ("FLYWORKERS_API_URL", "nope", "API_URL"),
        ("FLY_APP_NAME", "My App", "APP_NAME"),
        ("FLY_REGION", "o r d", "REGION"),
    ],
)
def test_bad_values_from_the_environment_name_key_and_variable(
    settings: Any, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, key: str
) -> None:
    monkeypatch.setenv(variable, value)
    settings.FLYWORKERS = {k: v for k, v in GOOD.items() if k != key}
    messages = check_settings()
    assert [m.id for m in messages] == ["flyworkers.E001"]
    assert key in messages[0].msg and variable in messages[0].msg
    assert "secret-token-value" not in messages[0].msg


@pytest.mark.parametrize(
    "overrides",
    [
        {"HTTP_TIMEOUT": "fast"},
        {"QUEUES": {"default": {"ENV": ["A=1"]}}},
        {"QUEUES": {"default": {"GUEST": "big"}}},
        {"QUEUES": {"default": {"CMD": 5}}},
    ],
    ids=["HTTP_TIMEOUT", "ENV", "GUEST", "CMD"],
)
@pytest.mark.django_db  # Django 6's check command also runs database checks
def test_check_command_reports_wrong_types_instead_of_crashing(
    settings: Any, overrides: dict[str, Any]
) -> None:
    settings.FLYWORKERS = {**GOOD, **overrides}
    with pytest.raises(SystemCheckError, match=r"flyworkers\.E001"):
        call_command("check")


def test_get_settings_raises_the_first_problem(settings: Any) -> None:
    settings.FLYWORKERS = {**GOOD, "GLOBAL_MAX_MACHINES": 0, "API_RETRY_SECONDS": -5}
    with pytest.raises(ImproperlyConfigured, match=r"GLOBAL_MAX_MACHINES'\] must be at least 1"):
        conf.get_settings()
    settings.FLYWORKERS = GOOD
    assert conf.get_settings().global_max_machines == 20


def test_suspend_within_fly_limits_passes(settings: Any) -> None:
    assert ids(settings, QUEUES={"default": {"IDLE_ACTION": "suspend"}}) == []
    suspend_2gb = {"IDLE_ACTION": "suspend", "GUEST": {"cpus": 1, "memory_mb": 2048}}
    assert ids(settings, QUEUES={"default": suspend_2gb}) == []
