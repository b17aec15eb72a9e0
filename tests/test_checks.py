"""System checks: every bad setting gets a stable id and a useful message."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError

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
