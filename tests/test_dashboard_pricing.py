"""Prices: Fly's published table, the linear rule it follows, and the PRICES override."""

from __future__ import annotations

from typing import Any

import pytest

from django_flyworkers import pricing
from django_flyworkers.templatetags.flyworkers_dashboard import duration, usd


@pytest.mark.parametrize(("guest", "price"), sorted(pricing.PUBLISHED.items()))
def test_the_linear_rule_reproduces_every_published_price(
    guest: tuple[str, int, int], price: float
) -> None:
    kind, cpus, memory = guest
    linear = cpus * pricing.CPU_PER_SECOND[kind] + memory / 1024 * pricing.MEMORY_GB_PER_SECOND
    assert linear == pytest.approx(price, rel=2e-3)  # Fly rounds to three digits


def test_published_prices_win_and_unlisted_guests_use_the_rule() -> None:
    prices = pricing.DEFAULT
    assert prices.started_per_second("shared", 1, 256) == 0.00000075  # $1.94 a month
    assert prices.started_per_second("performance", 2, 4096) == 0.00002392
    # 3 GB on a shared-cpu-1x is not in the table: preset + 2.75 GB of RAM at ~$5/30 days.
    unlisted = prices.started_per_second("shared", 1, 3072)
    assert unlisted == pytest.approx(0.00000075 + 2.75 * 5 / (30 * 86400), rel=1e-2)
    # A stopped Machine costs its root filesystem: $0.15 per GB per 30 days.
    assert prices.stopped_per_second == pytest.approx(0.15 / (30 * 86400))


def test_the_prices_setting_overrides_the_table(settings: Any) -> None:
    settings.FLYWORKERS = {
        **settings.FLYWORKERS,
        "PRICES": {
            "shared": {"cpu_per_second": 0.000001, "memory_gb_per_second": 0.000002},
            "rootfs_gb_month": 0.30,
            "rootfs_gb": 2,
        },
    }
    prices = pricing.current()
    assert prices.started_per_second("shared", 2, 1024) == pytest.approx(2e-6 + 2e-6)
    assert prices.stopped_per_second == pytest.approx(2 * 0.30 / (30 * 86400))
    # What the override leaves out keeps Fly's figure.
    assert prices.cpu_per_second["performance"] == pricing.CPU_PER_SECOND["performance"]
    assert prices.source == "FLYWORKERS['PRICES']"


def test_no_override_means_the_published_table(settings: Any) -> None:
    settings.FLYWORKERS = {k: v for k, v in settings.FLYWORKERS.items() if k != "PRICES"}
    assert pricing.current() == pricing.DEFAULT
    assert "fly.io/docs/about/pricing" in pricing.current().source


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "\u2013"), (0.4213, "0.42s"), (42, "42s"), (75, "1m 15s"), (7300, "2h 1m"),
     (90000, "1d 1h")],
)  # fmt: skip
def test_durations_read_like_a_person_writes_them(seconds: Any, text: str) -> None:
    assert duration(seconds) == text


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        (0, "$0"),
        (0.000123, "$0.000123"),
        (2.8e-7, "$0.00000028"),
        (1.23456, "$1.2346"),
        (1234.5, "$1,234.50"),
    ],
)
def test_dollars_keep_small_costs_apart(amount: float, text: str) -> None:
    assert usd(amount) == text
