"""Charts as inline SVG built on the server: no JavaScript chart library, nothing from a CDN.

A chart is a <figure> holding an SVG (scaled by its viewBox, so it fits a phone) and an HTML
legend (which wraps). `data-points` and `data-last-x` on the figure say what it shows, for tests
and for anyone reading the page source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777",
           "#4b5563", "#65a30d")
W, H = 480, 220
LEFT, RIGHT, TOP, BOTTOM = 52, 12, 12, 26
MAX_POINTS = 400

Point = tuple[float, float | None]


@dataclass
class Series:
    name: str
    points: list[Point]
    color: str | None = None


def fmt(v: float) -> str:
    """Short tick label: 3 significant digits, scientific only for very small or large values."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return f"{v:.2e}"
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def tick_labels(ticks: list[float]) -> list[str]:
    """Labels with just enough decimals to tell neighbouring ticks apart (1.00, 1.02, 1.04)."""
    big = max((abs(t) for t in ticks), default=0.0)
    if big >= 1e7 or 0 < big < 1e-3:
        for p in range(1, 8):
            labels = ["0" if t == 0 else f"{t:.{p}e}" for t in ticks]
            exact = all(abs(float(lb) - t) <= 1e-9 * max(abs(t), 1e-300) for lb, t in zip(labels, ticks))
            if exact and len(set(labels)) == len(labels):
                return labels
    for p in range(0, 10):
        labels = [f"{t:.{p}f}" for t in ticks]
        exact = all(abs(float(lb) - t) <= 1e-9 * max(1.0, abs(t)) for lb, t in zip(labels, ticks))
        if exact and len(set(labels)) == len(labels):
            return labels
    return [fmt(t) for t in ticks]


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _thin(points: list[Point]) -> list[Point]:
    # Keep charts light on long runs: every k-th point, always the last one.
    if len(points) <= MAX_POINTS:
        return points
    k = math.ceil(len(points) / MAX_POINTS)
    out = points[::k]
    if out[-1] is not points[-1]:
        out.append(points[-1])
    return out


def _y_range(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi == lo:
        pad = abs(lo) * 0.1 or 0.5
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def _frame(chart_id: str, title: str, inner: str, legend: list[tuple[str, str]], n_points: int,
           last_x: float | None, empty: bool) -> Markup:
    legend_html = "".join(
        f'<li><span class="swatch" style="background:{escape(color)}"></span>{escape(name)}</li>'
        for name, color in legend
    )
    last = "" if last_x is None else fmt(last_x)
    body = inner if not empty else (
        f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" class="empty">no data yet</text>')
    return Markup(
        f'<figure class="chart" id="{escape(chart_id)}" data-points="{n_points}" data-last-x="{escape(last)}">'
        f"<figcaption>{escape(title)}</figcaption>"
        f'<svg viewBox="0 0 {W} {H}" role="img" aria-label="{escape(title)}" '
        f'xmlns="http://www.w3.org/2000/svg">{body}</svg>'
        f'<ul class="legend">{legend_html}</ul></figure>'
    )


def _axes(x0: float, x1: float, y0: float, y1: float, sx, sy) -> str:
    parts = []
    y_ticks = nice_ticks(y0, y1)
    for t, label in zip(y_ticks, tick_labels(y_ticks)):
        y = sy(t)
        parts.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{LEFT - 4}" y="{y + 3:.1f}" text-anchor="end" class="tick">{escape(label)}</text>')
    # x is the step number: integer ticks only
    for t in nice_ticks(x0, x1, 6):
        if abs(t - round(t)) > 1e-9:
            continue
        x = sx(t)
        parts.append(f'<text x="{x:.1f}" y="{H - BOTTOM + 14}" text-anchor="middle" class="tick">'
                     f"{int(round(t))}</text>")
    parts.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{H - BOTTOM}" y2="{H - BOTTOM}" class="axis"/>'
                 f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{H - BOTTOM}" class="axis"/>')
    return "".join(parts)


def _scales(x0: float, x1: float, y0: float, y1: float):
    xs = (W - LEFT - RIGHT) / ((x1 - x0) or 1.0)
    ys = (H - TOP - BOTTOM) / ((y1 - y0) or 1.0)

    def sx(x: float) -> float:
        return LEFT + ((x - x0) * xs if x1 > x0 else (W - LEFT - RIGHT) / 2)

    def sy(y: float) -> float:
        return H - BOTTOM - (y - y0) * ys

    return sx, sy


def line_chart(chart_id: str, title: str, series: list[Series]) -> Markup:
    """One line per series over the step axis; a missing value (None) breaks the line."""
    series = [Series(s.name, _thin(s.points), s.color or PALETTE[i % len(PALETTE)]) for i, s in enumerate(series)]
    xs = [x for s in series for x, y in s.points if y is not None]
    ys = [y for s in series for _, y in s.points if y is not None]
    n_points = max((len(s.points) for s in series), default=0)
    legend = [(s.name, s.color or "") for s in series]
    if not ys:
        return _frame(chart_id, title, "", legend, n_points, None, empty=True)
    x0, x1 = min(xs), max(xs)
    y0, y1 = _y_range(ys)
    sx, sy = _scales(x0, x1, y0, y1)
    parts = [_axes(x0, x1, y0, y1, sx, sy)]
    for s in series:
        runs: list[list[str]] = [[]]
        for x, y in s.points:
            if y is None:
                runs.append([])
            else:
                runs[-1].append(f"{sx(x):.1f},{sy(y):.1f}")
        for run in runs:
            if len(run) > 1:
                parts.append(f'<polyline fill="none" stroke="{s.color}" stroke-width="1.8" points="{" ".join(run)}"/>')
        last = next(((x, y) for x, y in reversed(s.points) if y is not None), None)
        if last:
            parts.append(f'<circle cx="{sx(last[0]):.1f}" cy="{sy(last[1]):.1f}" r="2.6" fill="{s.color}">'
                         f"<title>{escape(s.name)} @ {escape(fmt(last[0]))}: {escape(fmt(last[1]))}</title></circle>")
    return _frame(chart_id, title, "".join(parts), legend, n_points, max(xs), empty=False)


def stacked_bars(chart_id: str, title: str, series: list[Series]) -> Markup:
    """Bars per step stacked from the series (e.g. the parts of a step's wall time)."""
    series = [Series(s.name, _thin(s.points), s.color or PALETTE[i % len(PALETTE)]) for i, s in enumerate(series)]
    by_x: dict[float, list[float]] = {}
    for i, s in enumerate(series):
        for x, y in s.points:
            by_x.setdefault(x, [0.0] * len(series))[i] = max(0.0, y or 0.0)
    legend = [(s.name, s.color or "") for s in series]
    if not by_x:
        return _frame(chart_id, title, "", legend, 0, None, empty=True)
    xs = sorted(by_x)
    top = max(sum(v) for v in by_x.values()) or 1.0
    x0, x1 = xs[0] - 0.5, xs[-1] + 0.5
    sx, sy = _scales(x0, x1, 0.0, top * 1.05)
    bar_w = max(1.0, (W - LEFT - RIGHT) / len(xs) * 0.8)
    parts = [_axes(x0, x1, 0.0, top * 1.05, sx, sy)]
    for x in xs:
        base = 0.0
        for i, v in enumerate(by_x[x]):
            if v <= 0:
                continue
            y_top, y_bot = sy(base + v), sy(base)
            parts.append(f'<rect x="{sx(x) - bar_w / 2:.1f}" y="{y_top:.1f}" width="{bar_w:.1f}" '
                         f'height="{max(0.5, y_bot - y_top):.1f}" fill="{series[i].color}">'
                         f"<title>step {escape(fmt(x))} {escape(series[i].name)}: {escape(fmt(v))} s</title></rect>")
            base += v
    return _frame(chart_id, title, "".join(parts), legend, len(xs), xs[-1], empty=False)
