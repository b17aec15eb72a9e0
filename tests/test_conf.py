"""conf: what the parsed settings hold (CMD split like a shell, Fly's guest rules, prices,
the new profile keys), and the errors and version that belong to the package as a whole."""

from __future__ import annotations

import importlib.metadata
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

import django_flyworkers
from django_flyworkers import conf
from django_flyworkers.exceptions import NotConfigured
from django_flyworkers.guest import Guest, validate_guest
from django_flyworkers.machines import DEFAULT_BASE_URL
from django_flyworkers.prices import FLY_PRICES, SECONDS_PER_30_DAYS

BASE = {"API_TOKEN": "t", "APP_NAME": "app", "IMAGE": "img"}


@pytest.fixture(autouse=True)
def no_fly_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in conf.ENV_DEFAULTS.values():  # other tests point these at the emulator
        monkeypatch.delenv(variable, raising=False)


def profile(**values: Any) -> conf.QueueProfile:
    return conf.parse({**BASE, "QUEUES": {"q": values}}).queues["q"]


def test_a_string_cmd_is_split_like_a_shell_command_line() -> None:
    cmd = "python manage.py rqworker 'my queue' --name \"a b\""
    assert profile(CMD=cmd).worker_command() == [
        "python",
        "manage.py",
        "rqworker",
        "my queue",
        "--name",
        "a b",
    ]
    assert profile(CMD=("python", "-m", "worker")).cmd == ("python", "-m", "worker")


def test_new_profile_keys_default_and_parse() -> None:
    default = profile()
    assert (default.idle_action, default.mode) == ("stop", "pool")
    chosen = profile(IDLE_ACTION="suspend", MODE="dedicated")
    assert (chosen.idle_action, chosen.mode) == ("suspend", "dedicated")


def test_guest_is_validated_and_reads_like_the_api_object() -> None:
    assert dict(profile().guest) == {"cpu_kind": "shared", "cpus": 1, "memory_mb": 512}
    assert profile().guest == {"cpu_kind": "shared", "cpus": 1, "memory_mb": 512}
    big = profile(GUEST={"cpu_kind": "performance", "cpus": 2, "kernel_args": ["quiet"]})
    # memory left out: the least two performance CPUs allow, as Fly sizes them
    assert dict(big.guest) == {
        "cpu_kind": "performance",
        "cpus": 2,
        "memory_mb": 4096,
        "kernel_args": ["quiet"],
    }
    assert (big.guest.cpus, big.guest.memory_mb, big.guest.has_gpu) == (2, 4096, False)


@pytest.mark.parametrize(
    ("override", "base", "expected"),
    [
        ({"cpus": 8, "memory_mb": 16384}, None, (("shared", 8, 16384))),
        ({"cpus": 4}, None, ("shared", 4, 1024)),
        ({"memory_mb": 1024}, {"cpu_kind": "shared", "cpus": 2}, ("shared", 2, 1024)),
        ({"cpus": 8}, Guest("performance", 2, 4096), ("performance", 8, 16384)),
        ({}, Guest("performance", 16, 131072), ("performance", 16, 131072)),
    ],
)
def test_validate_guest_accepts_what_fly_accepts(
    override: dict[str, Any], base: Any, expected: tuple[str, int, int]
) -> None:
    guest = conf.validate_guest(override, base=base)
    assert (guest.cpu_kind, guest.cpus, guest.memory_mb) == expected


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"cpus": 8, "memory_mb": 32768}, "memory_mb must be between 2048 and 16384"),
        ({"cpus": 5}, "cpus must be one of 1, 2, 4, 6, 8"),
        ({"cpu_kind": "performance", "memory_mb": 512}, "between 2048 and 8192"),
        ({"memory_mb": 1000}, "multiple of 256"),
        ({"ram": 1024}, "unknown guest key 'ram'"),
        ("shared-cpu-1x", "the guest must be a dict"),
    ],
)
def test_validate_guest_rejects_what_fly_rejects(override: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_guest(override)


def test_prices_default_to_flys_and_merge_an_override() -> None:
    assert conf.parse(BASE).prices == FLY_PRICES
    # Fly's published table first: shared-cpu-1x with 512 MB, performance-2x.
    assert FLY_PRICES.machine_per_second(Guest()) == 0.00000123
    perf_2x = {"cpu_kind": "performance", "cpus": 2, "memory_mb": 4096}
    assert FLY_PRICES.machine_per_second(perf_2x) == 0.00002392
    # The rule for guests the table does not list: preset ($1.94 per 30 days) + memory above.
    shared_1x_512 = FLY_PRICES.linear_per_second("shared", 1, 512)
    assert shared_1x_512 == pytest.approx((1.944 + 0.25 * 5.00) / SECONDS_PER_30_DAYS)
    perf_2x_rule = FLY_PRICES.linear_per_second("performance", 2, 4096)
    assert perf_2x_rule == pytest.approx(2 * 31.0 / SECONDS_PER_30_DAYS, rel=1e-4)
    assert FLY_PRICES.rootfs_per_second(2) == pytest.approx(0.30 / SECONDS_PER_30_DAYS)

    prices = conf.parse({**BASE, "PRICES": {"shared": {"cpu_per_second": 1e-6}}}).prices
    assert prices.shared.cpu_per_second == 1e-6
    assert prices.shared.memory_gb_per_second == FLY_PRICES.shared.memory_gb_per_second
    assert prices.performance == FLY_PRICES.performance


def test_get_settings_raises_improperly_configured_naming_the_key(settings: Any) -> None:
    settings.FLYWORKERS = {**BASE, "API_RETRY_SECONDS": -5}
    with pytest.raises(ImproperlyConfigured, match=r"API_RETRY_SECONDS.*at least 0, got -5"):
        conf.get_settings()


def test_validate_collects_every_problem_in_one_pass() -> None:
    _, problems = conf.validate(
        {**BASE, "HTTP_TIMEOUT": "fast", "WAKE_MODE": "x", "QUEUES": {"q": {"CMD": 5}}}
    )
    assert [(p.id, p.key) for p in problems] == [
        ("E011", "FLYWORKERS['WAKE_MODE']"),
        ("E001", "FLYWORKERS['HTTP_TIMEOUT']"),
        ("E001", "FLYWORKERS['QUEUES']['q']['CMD']"),
    ]


def test_the_token_is_never_echoed_even_when_malformed() -> None:
    _, problems = conf.validate({**BASE, "API_TOKEN": "FlyV1 fm2_secret\n"})
    assert problems and all("fm2_secret" not in f"{p.message} {p.hint}" for p in problems)
    assert "fm2_secret" not in repr(conf.parse({**BASE, "API_TOKEN": "FlyV1 fm2_secret"}))


def test_one_default_api_url() -> None:
    assert conf.DEFAULT_API_URL is DEFAULT_BASE_URL
    assert conf.parse(BASE).api_url == DEFAULT_BASE_URL


def test_not_configured_is_improperly_configured() -> None:
    assert issubclass(NotConfigured, ImproperlyConfigured)


def test_the_version_has_one_source() -> None:
    assert importlib.metadata.version("django-flyworkers") == django_flyworkers.__version__
