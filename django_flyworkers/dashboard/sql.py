"""SQL the ORM does not write portably: seconds since the epoch, time buckets, percentiles.

Everything here runs inside the database with built-in functions (SQLite's ``julianday``,
PostgreSQL's ``EXTRACT``), so aggregating a window of 100,000 jobs never ships them to Python
nor calls a Python function per row (Django's own date functions do, on SQLite).
"""

from __future__ import annotations

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

    The database ranks rows with ``CUME_DIST()`` (SQLite >= 3.25, PostgreSQL); the outer query
    keeps, per group and per point ``p``, the smallest value whose cumulative share reaches
    ``p``. Nothing but one row per group leaves the database.
    """
    inner = (
        queryset.order_by()
        .annotate(fw_group=group, fw_value=value)
        .filter(fw_value__isnull=False)
        .values_list("fw_group", "fw_value")
    )
    sql, params = inner.query.sql_with_params()
    using = router.db_for_read(queryset.model)
    connection = connections[using]
    g, v = connection.ops.quote_name("fw_group"), connection.ops.quote_name("fw_value")
    # A fence keeps the planner from merging the filtered rows into the ranking, where SQLite
    # would rather walk the whole table in partition order than sort the few rows it needs.
    fence = {"sqlite": " LIMIT -1 OFFSET 0", "postgresql": " OFFSET 0"}.get(connection.vendor, "")
    picks = ", ".join("MIN(CASE WHEN r.fw_rank >= %s THEN r.fw_value END)" for _ in points)
    outer = (
        f"SELECT r.fw_group, {picks} FROM ("
        f"SELECT b.{g} AS fw_group, b.{v} AS fw_value, "
        f"CUME_DIST() OVER (PARTITION BY b.{g} ORDER BY b.{v}) AS fw_rank "
        f"FROM ({sql}{fence}) b) r GROUP BY r.fw_group"
    )
    with connection.cursor() as cursor:
        cursor.execute(outer, [*points, *params])
        return {row[0]: [_float(v) for v in row[1:]] for row in cursor.fetchall()}


def _float(value: Any) -> float | None:
    return None if value is None else float(value)
