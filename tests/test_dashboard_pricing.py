"""Prices: Fly's published table, the linear rule it follows, and the PRICES override."""

from __future__ import annotations

from typing import Any

import pytest

from django_flyworkers.conf import get_settings
from django_flyworkers.prices import FLY_PRICES, PUBLISHED, SECONDS_PER_30_DAYS
from django_flyworkers.templatetags.flyworkers_dashboard import duration, usd


@pytest.mark.parametrize(("guest", "price"), sorted(PUBLISHED.items()))
def test_the_linear_rule_reproduces_every_published_price(
    guest: tuple[str, int, int], price: float
) -> None:
    assert FLY_PRICES.linear_per_second(*guest) == pytest.approx(price, rel=2e-3)  # Fly rounds


def test_published_prices_win_and_unlisted_guests_use_the_rule() -> None:
    prices = FLY_PRICES
    assert prices.started_per_second("shared", 1, 256) == 0.00000075  # $1.94 a month
    assert prices.started_per_second("shared", 1, 512) == 0.00000123  # not the rule's 1.232e-6
    assert prices.started_per_second("performance", 2, 4096) == 0.00002392
    # 3 GB on a shared-cpu-1x is not in the table: preset + 2.75 GB of RAM at ~$5/30 days.
    unlisted = prices.started_per_second("shared", 1, 3072)
    assert unlisted == pytest.approx(0.00000075 + 2.75 * 5 / (30 * 86400), rel=1e-2)
    # A stopped Machine costs its root filesystem: $0.15 per GB per 30 days.
    assert prices.stopped_per_second == pytest.approx(0.15 / (30 * 86400))


def test_the_prices_setting_overrides_the_table(settings: Any) -> None:
    settings.FLYWORKERS = {
        **settings.FLYWORKERS,
        "PRICES": {  # the README's shape
            "shared": {"cpu_per_second": 0.000001, "memory_gb_per_second": 0.000002},
            "rootfs_gb_per_second": 0.30 / SECONDS_PER_30_DAYS,
        },
    }
    prices = get_settings().prices
    # A listed guest follows the override too: 2 CPUs with 512 MB included + 0.5 GB more.
    assert prices.started_per_second("shared", 2, 1024) == pytest.approx(2e-6 + 0.5 * 2e-6)
    assert prices.stopped_per_second == pytest.approx(0.30 / (30 * 86400))
    # What the override leaves out keeps Fly's figure (by the rule: the table is Fly's).
    assert prices.performance == FLY_PRICES.performance
    assert prices.started_per_second("performance", 2, 4096) == pytest.approx(
        PUBLISHED[("performance", 2, 4096)], rel=2e-3
    )
    assert prices.source == "FLYWORKERS['PRICES']"


def test_no_override_means_the_published_table(settings: Any) -> None:
    settings.FLYWORKERS = {k: v for k, v in settings.FLYWORKERS.items() if k != "PRICES"}
    prices = get_settings().prices
    assert prices == FLY_PRICES
    assert all(prices.started_per_second(*guest) == p for guest, p in PUBLISHED.items())
    assert "fly.io/docs/about/pricing" in prices.source and "2025-08-19" in prices.source


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
