"""Server-rendered SVG: the charts and the Machine timeline.

SVG drawn on the server needs no JavaScript, no CDN and no build step, reads the admin's CSS
variables (so dark mode just works), and is what the live refresh swaps in. Every shape has a
``<title>`` (the browser's tooltip) and a class the stylesheet colours.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from datetime import datetime, tzinfo

from django.urls import reverse
from django.utils import timezone
from django.utils.safestring import SafeString, mark_safe

from django_flyworkers.dashboard.queries import Charts, Span, TimelineRow


def escape(text: object) -> str:
    """HTML-escaped ``str(text)``: what ``django.utils.html.escape`` returns, without its lazy
    string check, which cost more than the escaping in a timeline of thousands of jobs."""
    return html.escape(str(text))


WIDTH, HEIGHT = 420, 170
LEFT, RIGHT, TOP, BOTTOM = 40, 8, 16, 20
PLOT_W, PLOT_H = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
TIMELINE_W, ROW_H, LABEL_W = 1100, 24, 180
"""The timeline spans the page; its view box is about as wide as it is drawn."""


def _n(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _time(epoch: float, window: Span, zone: tzinfo | None = None) -> str:
    """``epoch`` in the current time zone (``zone``, when the caller already looked it up)."""
    local = datetime.fromtimestamp(epoch, zone or timezone.get_current_timezone())
    return local.strftime("%a %H:%M" if window.seconds > 86400 else "%H:%M")


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    exponent = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exponent:
            return step * exponent
    return 10 * exponent


def _frame(window: Span, top: float, unit: Callable[[float], str], kind: str) -> list[str]:
    """Grid lines with y labels, and time labels along the x axis."""
    parts = [
        f'<svg class="fw-chart fw-{kind}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" data-chart="{kind}">'
    ]
    for i in range(3):
        value = top * i / 2
        y = TOP + PLOT_H - PLOT_H * i / 2
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y}" y2="{y}"/>')
        parts.append(
            f'<text class="axis" x="{LEFT - 4}" y="{y + 3}" text-anchor="end">'
            f"{escape(unit(value))}</text>"
        )
    ticks = 4
    for i in range(ticks + 1):
        epoch = window.origin + window.seconds * i / ticks
        x = LEFT + PLOT_W * i / ticks
        anchor = "start" if i == 0 else "end" if i == ticks else "middle"
        parts.append(
            f'<text class="axis" x="{x:.1f}" y="{HEIGHT - 5}" text-anchor="{anchor}">'
            f"{escape(_time(epoch, window))}</text>"
        )
    return parts


def _x(window: Span, index: float) -> float:
    return LEFT + PLOT_W * index / window.count


def _markers(data: Charts) -> list[str]:
    """Scaling events as Judoscale draws them: a mark over the bucket they happened in."""
    parts = []
    for index, counts in sorted(data.events.items()):
        x = _x(data.span, index + 0.5)
        said = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
        title = f"{_time(data.span.origin + index * data.span.width, data.span)}: {said}"
        kind = "error" if counts["error"] else "up" if counts["up"] >= counts["down"] else "down"
        shape = {
            "up": f"M{x - 4:.1f},{TOP - 2} L{x + 4:.1f},{TOP - 2} L{x:.1f},{TOP - 9} Z",
            "down": f"M{x - 4:.1f},{TOP - 9} L{x + 4:.1f},{TOP - 9} L{x:.1f},{TOP - 2} Z",
            "error": f"M{x - 4:.1f},{TOP - 10} L{x + 4:.1f},{TOP - 2} "
            f"M{x + 4:.1f},{TOP - 10} L{x - 4:.1f},{TOP - 2}",
        }[kind]
        parts.append(
            f'<g class="marker {kind}"><title>{escape(title)}</title>'
            f'<line class="event-line" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + PLOT_H}"/>'
            f'<path d="{shape}"/></g>'
        )
    return parts


def jobs_chart(data: Charts) -> SafeString:
    """Stacked bars: jobs finished (bottom) and failed (top) per bucket."""
    window = data.span
    totals = [ok + bad for ok, bad in zip(data.finished, data.failed, strict=True)]
    top = _nice_max(max(totals, default=0))
    parts = _frame(window, top, lambda v: _n(v), "jobs")
    slot = PLOT_W / window.count
    bar_w = max(1.0, slot * 0.8)
    for i, (ok, bad) in enumerate(zip(data.finished, data.failed, strict=True)):
        base = float(TOP + PLOT_H)
        when = _time(window.origin + i * window.width, window)
        for count, kind in ((ok, "finished"), (bad, "failed")):
            if not count:
                continue
            h = PLOT_H * count / top
            base -= h
            parts.append(
                f'<rect class="bar {kind}" x="{LEFT + i * slot + (slot - bar_w) / 2:.1f}" '
                f'y="{base:.1f}" width="{bar_w:.1f}" height="{h:.1f}">'
                f"<title>{escape(when)}: {count} {kind}</title></rect>"
            )
    parts += [*_markers(data), "</svg>"]
    return mark_safe("".join(parts))


def _line(window: Span, values: Sequence[float | None], top: float, kind: str,
          fmt: Callable[[float], str], label: str, points_when: Callable[[float], bool]
          ) -> list[str]:  # fmt: skip
    segments: list[list[tuple[float, float]]] = [[]]
    dots = []
    for i, value in enumerate(values):
        if value is None:
            if segments[-1]:
                segments.append([])
            continue
        x, y = _x(window, i + 0.5), TOP + PLOT_H - PLOT_H * min(value, top) / top
        segments[-1].append((x, y))
        if points_when(value):
            when = _time(window.origin + i * window.width, window)
            dots.append(
                f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="2.5">'
                f"<title>{escape(when)}: {escape(fmt(value))} {label}</title></circle>"
            )
    paths = [
        f'<path class="line {kind}" d="'
        + " ".join(f"{'M' if j == 0 else 'L'}{x:.1f},{y:.1f}" for j, (x, y) in enumerate(seg))
        + '"/>'
        for seg in segments
        if seg
    ]
    return paths + dots


def _seconds(value: float) -> str:
    if value >= 3600:
        return f"{_n(value / 3600)}h"
    if value >= 60:
        return f"{_n(value / 60)}m"
    return f"{_n(value)}s"


def wait_chart(data: Charts) -> SafeString:
    """Wait p95 (enqueue to start) per bucket: a point per bucket where jobs started."""
    top = _nice_max(max((v for v in data.wait_p95 if v is not None), default=0))
    parts = _frame(data.span, top, _seconds, "wait")
    parts += _line(data.span, data.wait_p95, top, "wait", _seconds, "p95 wait", lambda v: True)
    parts += [*_markers(data), "</svg>"]
    return mark_safe("".join(parts))


def machines_chart(data: Charts) -> SafeString:
    """Machines running (average over each bucket); a point where any ran."""
    top = _nice_max(max(data.running, default=0))
    parts = _frame(data.span, top, _n, "machines")
    values: list[float | None] = list(data.running)
    parts += _line(data.span, values, top, "machines", lambda v: f"{v:.2f}", "Machines running",
                   lambda v: v > 0)  # fmt: skip
    parts += [*_markers(data), "</svg>"]
    return mark_safe("".join(parts))


def timeline_svg(window: Span, rows: Sequence[TimelineRow]) -> SafeString:
    """One row per Machine, a bar per run, its jobs drawn inside; jobs link to their detail."""
    height = TOP + ROW_H * max(1, len(rows)) + BOTTOM
    plot_w = TIMELINE_W - LABEL_W - RIGHT
    parts = [
        f'<svg class="fw-chart fw-timeline" viewBox="0 0 {TIMELINE_W} {height}" role="img" '
        f'data-chart="timeline">'
    ]
    ticks = 8
    for i in range(ticks + 1):
        x = LABEL_W + plot_w * i / ticks
        epoch = window.origin + window.seconds * i / ticks
        anchor = "start" if i == 0 else "end" if i == ticks else "middle"
        parts.append(
            f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{height - BOTTOM}"/>'
            f'<text class="axis" x="{x:.1f}" y="{height - 5}" text-anchor="{anchor}">'
            f"{escape(_time(epoch, window))}</text>"
        )

    def x_of(epoch: float) -> float:
        share = (min(max(epoch, window.origin), window.end) - window.origin) / window.seconds
        return LABEL_W + plot_w * share

    zone = timezone.get_current_timezone()
    # One reverse() per page, not per job: a timeline can draw thousands of them.
    job_url = reverse("admin:django_flyworkers_flyjob_change", args=[0]).replace("/0/", "/{}/")
    for r, row in enumerate(rows):
        y = TOP + r * ROW_H
        url = reverse("admin:django_flyworkers_workermachine_change", args=[row.pk])
        parts.append(
            f'<g class="machine-row" data-machine="{escape(row.machine_id)}">'
            f'<a href="{escape(url)}"><text class="label" x="4" y="{y + ROW_H / 2 + 4}">'
            f"{escape(row.machine_id)}</text></a>"
            f'<text class="label sub" x="{LABEL_W - 6}" y="{y + ROW_H / 2 + 4}" '
            f'text-anchor="end">{escape(row.queue)}</text>'
        )
        for began, ended, running in row.runs:
            x0, x1 = x_of(began), x_of(ended)
            cls = "run running" if running else "run"
            until = "now" if running else _time(ended, window, zone)
            title = f"run {_time(began, window, zone)} to {until}"
            parts.append(
                f'<rect class="{cls}" x="{x0:.1f}" y="{y + 3}" width="{max(1.5, x1 - x0):.1f}" '
                f'height="{ROW_H - 6}" rx="3"><title>{escape(title)}</title></rect>'
            )
        for began, ended, pk, func, status in row.jobs:
            x0, x1 = x_of(began), x_of(ended)
            title = f"{func or 'job'} ({status}) {ended - began:.1f}s"
            parts.append(
                f'<a href="{job_url.format(pk)}" class="job-link">'
                f'<rect class="job {escape(status)}" x="{x0:.1f}" y="{y + 7}" '
                f'width="{max(1.5, x1 - x0):.1f}" height="{ROW_H - 14}">'
                f"<title>{escape(title)}</title></rect></a>"
            )
        parts.append("</g>")
    parts.append("</svg>")
    return mark_safe("".join(parts))
