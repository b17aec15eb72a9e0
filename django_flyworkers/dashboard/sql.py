"""SQL the ORM does not write portably: seconds since the epoch, time buckets, percentiles.

Everything here runs inside the database with built-in functions (SQLite's ``julianday``,
PostgreSQL's ``EXTRACT``), so a window of 100,000 jobs never calls a Python function per row
(Django's own date functions do, on SQLite). Counts and sums stay in the database; only the
percentiles read two numbers per row, which sorting in Python beats a window function at.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from django.db import connections, router
from django.db.models import CharField, Expression, F, FloatField, Func, QuerySet, Value
from django.db.models.functions import Cast, Coalesce


class EpochSeconds(Func):
    """A datetime column as seconds since 1970-01-01 UTC (a float; NULL stays NULL)."""

    output_field = FloatField()
    template = "CAST(EXTRACT(EPOCH FROM %(expressions)s) AS DOUBLE PRECISION)"

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        # Django stores aware datetimes as UTC text that julianday() reads.
        template = "((julianday(%(expressions)s) - 2440587.5) * 86400.0)"
        return self.as_sql(compiler, connection, template=template, **extra)

    def as_mysql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        template = "UNIX_TIMESTAMP(%(expressions)s)"
        return self.as_sql(compiler, connection, template=template, **extra)


class Floor(Func):
    """Largest integer not above the value (SQLite has no FLOOR before 3.35's math functions)."""

    output_field = FloatField()
    function = "FLOOR"

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        # Bucket arithmetic only floors non-negative numbers, where CAST truncates the same.
        template = "CAST(%(expressions)s AS INTEGER)"
        return self.as_sql(compiler, connection, template=template, **extra)


def unindexed(column: str) -> Cast:
    """``column`` as an expression no index serves: filtering or grouping on it leaves the
    planner to the time range (an index on ``queue`` would otherwise tempt it into walking
    every row of the table in queue order)."""
    return Cast(F(column), output_field=CharField())


def bucket(column: str, origin: float, width: float) -> Func:
    """Index of the ``width``-second bucket that ``column`` falls in, counted from ``origin``."""
    offset = EpochSeconds(F(column)) - Value(float(origin))
    return Floor(offset / Value(float(width)), output_field=FloatField())


def wait_seconds() -> Expression:
    """Enqueue (or, for a scheduled job, due time) to start, in seconds."""
    since = Coalesce(F("scheduled_for"), F("enqueued_at"))
    return EpochSeconds(F("started_at")) - EpochSeconds(since)  # type: ignore[no-any-return]


def percentiles(
    queryset: QuerySet[Any], value: Expression, group: Any, points: tuple[float, ...]
) -> dict[Any, list[float | None]]:
    """Nearest-rank percentiles of ``value`` per ``group``, in one query.

    The database computes each row's group and value (no Python function per row); Python
    sorts each group's values and picks, per point ``p``, the smallest value whose share of
    the group reaches ``p``. SQLite's ``CUME_DIST()`` window gave the same answer in twice the
    time: 80 ms against 35 ms for the 57,000 waits of the 7-day chart in
    ``benchmarks/dashboard.py``. Only two numbers a row leave the database, in chunks.
    """
    rows = (
        queryset.order_by()
        .annotate(fw_group=group, fw_value=value)
        .filter(fw_value__isnull=False)
        .values_list("fw_group", "fw_value")
    )
    sql, params = rows.query.sql_with_params()
    groups: dict[Any, list[float]] = defaultdict(list)
    # The cursor, not the queryset: Django's per-row converters would cost more than the sort.
    with connections[router.db_for_read(queryset.model)].cursor() as cursor:
        cursor.execute(sql, params)
        while chunk := cursor.fetchmany(10_000):
            for key, found in chunk:
                groups[key].append(float(found))
    return {key: _nearest_ranks(sorted(found), points) for key, found in groups.items()}


def _nearest_ranks(ordered: list[float], points: tuple[float, ...]) -> list[float | None]:
    """Per point ``p``, the smallest value of ``ordered`` with at least a share ``p`` of the
    values at or below it (``CUME_DIST() >= p``, compared as the database would)."""
    n = len(ordered)
    out: list[float | None] = []
    for p in points:
        rank = max(1, math.ceil(p * n))
        while rank > 1 and (rank - 1) / n >= p:  # float rounding in p * n, either way
            rank -= 1
        while rank < n and rank / n < p:
            rank += 1
        out.append(ordered[rank - 1] if n else None)
    return out
