"""Charts of a run's rounds as self-contained SVG, drawn in Python (no JS library).

Four charts, by name: ``accuracy`` (central and federated), ``loss`` (central,
federated and train), ``clients`` (accepted / rejected / failed replies per
round, stacked) and ``privacy`` (the cumulative epsilon after each round).
Every chart has a title, labelled axes with round-number ticks and a legend;
each point carries a ``<title>`` tooltip. :func:`comparison_chart` draws one
line per compared run, against round or wall time, its legend below.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

WIDTH, HEIGHT = 420, 250
LEFT, RIGHT, TOP, BOTTOM = 52, 14, 38, 42
FONT = "-apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"
BLUE, GREEN, AMBER, RED, GREY = "#2563eb", "#16a34a", "#d97706", "#dc2626", "#9ca3af"
CHARTS = ("accuracy", "loss", "clients", "privacy")
MAX_MARKED_POINTS = 60
# One colour per compared run (cycled); the first ones are the single-run colours.
PALETTE = (BLUE, GREEN, AMBER, RED, "#7c3aed", "#0891b2", "#db2777", "#65a30d", "#4b5563")
LEGEND_ROW = 16
# Comparison charts: x axis -> (title, axis label, tooltip unit).
COMPARISON_AXES = {
    "round": ("Central accuracy per round", "round", "round"),
    "time": ("Central accuracy over wall time", "seconds in rounds", "s"),
}


@dataclass(frozen=True)
class Series:
    """One line: a label for the legend, its colour and its (round, value) points."""

    label: str
    color: str
    points: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Frame:
    """The plot area and the data ranges it maps."""

    x_max: float
    y_min: float
    y_max: float

    def x(self, value: float) -> float:
        """Pixel column of round ``value``."""
        return LEFT + (WIDTH - LEFT - RIGHT) * value / self.x_max

    def y(self, value: float) -> float:
        """Pixel row of ``value``."""
        span = self.y_max - self.y_min
        return HEIGHT - BOTTOM - (HEIGHT - TOP - BOTTOM) * (value - self.y_min) / span


def nice_ticks(high: float, count: int = 5, integer: bool = False) -> list[float]:
    """Ticks from 0 to at least ``high`` at a 1-2-5 step, about ``count`` of them.

    A ``high`` that is not finite gives the ticks of 1; one beyond 1e300 those of
    1e300 (its steps would overflow).
    """
    high = min(max(high, 1e-9), 1e300) if math.isfinite(high) else 1.0
    raw = high / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    if integer:
        step = max(1.0, float(math.ceil(step)))
    ticks = [0.0]
    while ticks[-1] < high - 1e-12:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def render_chart(name: str, rows: Sequence[dict[str, object]], num_rounds: int) -> str:
    """The SVG of chart ``name`` (one of :data:`CHARTS`) for these round rows."""
    if name == "accuracy":
        series = _series(rows, (("central_accuracy", "central", BLUE),))
        series += _series(rows, (("federated_accuracy", "federated", GREEN),))
        return line_chart("Accuracy", "accuracy", series, num_rounds, y_max=1.0)
    if name == "loss":
        keys = (
            ("central_loss", "central", BLUE),
            ("federated_loss", "federated", GREEN),
            ("train_loss", "train", AMBER),
        )
        return line_chart("Loss", "loss", _series(rows, keys), num_rounds)
    if name == "clients":
        return clients_chart(rows, num_rounds)
    if name == "privacy":
        return privacy_chart(rows, num_rounds)
    raise ValueError(f"unknown chart {name!r}; charts: {', '.join(CHARTS)}")


def line_chart(
    title: str, y_label: str, series: list[Series], num_rounds: int, y_max: float | None = None
) -> str:
    """A line chart of ``series`` over rounds 0..``num_rounds``."""
    values = [value for line in series for _, value in line.points]
    last_round = max((x for line in series for x, _ in line.points), default=0)
    y_ticks = nice_ticks(y_max or max(values, default=1.0), 6)
    frame = Frame(max(num_rounds, last_round, 1), 0.0, y_ticks[-1])
    parts = [*_axes(frame, y_ticks, title, y_label), *_legend([(s.label, s.color) for s in series])]
    for line in series:
        parts.extend(_polyline(frame, line))
    if not values:
        parts.append(_empty_note())
    return _svg(title, parts)


def clients_chart(rows: Sequence[dict[str, object]], num_rounds: int) -> str:
    """Stacked bars per round: accepted, rejected and failed replies."""
    trained = [row for row in rows if _int(row["round"]) > 0]
    stacks = (("accepted", GREEN), ("rejected", RED), ("failed", GREY))
    totals = [sum(_int(row[key]) for key, _ in stacks) for row in trained]
    y_ticks = nice_ticks(max(totals, default=1), 5, integer=True)
    frame = Frame(max(num_rounds, len(trained), 1) + 0.5, 0.0, y_ticks[-1])
    parts = [*_axes(frame, y_ticks, "Clients per round", "replies"), *_legend(list(stacks))]
    bar = max(1.5, min(18.0, 0.7 * (frame.x(1) - frame.x(0))))
    for row in trained:
        server_round, base = _int(row["round"]), 0
        for key, color in stacks:
            count = _int(row[key])
            if count:
                top, bottom = frame.y(base + count), frame.y(base)
                parts.append(
                    f'<rect x="{frame.x(server_round) - bar / 2:.1f}" y="{top:.1f}" '
                    f'width="{bar:.1f}" height="{bottom - top:.1f}" fill="{color}">'
                    f"<title>round {server_round}: {count} {key}</title></rect>"
                )
            base += count
    if not trained:
        parts.append(_empty_note())
    return _svg("Clients per round", parts)


def privacy_chart(rows: Sequence[dict[str, object]], num_rounds: int) -> str:
    """The run's cumulative epsilon after each round; a note when it is infinite (no noise)."""
    epsilons = [(row["round"], row.get("epsilon")) for row in rows]
    points = tuple(
        (float(_int(r)), float(e))  # type: ignore[arg-type]
        for r, e in epsilons
        if _int(r) > 0 and isinstance(e, int | float) and math.isfinite(e)
    )
    title = "Privacy spent (epsilon)"
    svg = line_chart(title, "epsilon", [Series("epsilon", RED, points)], num_rounds)
    if points or not any(isinstance(e, float) and math.isinf(e) for _, e in epsilons):
        return svg
    note = "epsilon = inf: no noise, not differentially private"
    return svg.replace("no rounds yet", escape(note))


def comparison_chart(axis: str, curves: Sequence[tuple[str, Sequence[tuple[float, float]]]]) -> str:
    """Central accuracy of compared runs against ``round`` or wall ``time``; legend below.

    ``curves`` holds one ``(label, [(x, accuracy), ...])`` per run, in the order
    of the comparison table, whose colours follow :data:`PALETTE`.
    """
    title, x_label, unit = COMPARISON_AXES[axis]
    series = [
        Series(label, PALETTE[i % len(PALETTE)], tuple(p for p in points if _finite_point(p)))
        for i, (label, points) in enumerate(curves)
    ]
    height = HEIGHT + 10 + LEGEND_ROW * len(series)
    x_high = max((x for line in series for x, _ in line.points), default=0.0)
    x_max = max(x_high, 1.0) if axis == "round" else nice_ticks(max(x_high, 1.0), 6)[-1]
    frame = Frame(x_max, 0.0, 1.0)
    parts = _axes(frame, nice_ticks(1.0, 6), title, "central accuracy", x_label)
    for row, line in enumerate(series):
        y = HEIGHT + 10 + LEGEND_ROW * row
        parts.append(
            f'<rect x="{LEFT}" y="{y - 9}" width="10" height="10" rx="2" fill="{line.color}"/>'
        )
        parts.append(f'<text x="{LEFT + 14}" y="{y}" class="legend">{escape(line.label)}</text>')
        parts.extend(_polyline(frame, line, unit))
    if not any(line.points for line in series):
        parts.append(_empty_note())
    return _svg(title, parts, height)


def _finite_point(point: tuple[float, float]) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) for v in point)


def _series(
    rows: Sequence[dict[str, object]], keys: Sequence[tuple[str, str, str]]
) -> list[Series]:
    lines = []
    for key, label, color in keys:
        points = tuple(
            (float(_int(row["round"])), float(row[key]))  # type: ignore[arg-type]
            for row in rows
            if isinstance(row[key], int | float) and math.isfinite(float(row[key]))  # type: ignore[arg-type]
        )
        lines.append(Series(label, color, points))
    return lines


def _axes(
    frame: Frame, y_ticks: list[float], title: str, y_label: str, x_label: str = "round"
) -> list[str]:
    bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
    parts = [f'<text x="{LEFT}" y="20" class="title">{escape(title)}</text>']
    for tick in y_ticks:
        y = frame.y(tick)
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" class="tick end">{_label(tick)}</text>')
    rounds = x_label == "round"
    x_ticks = nice_ticks(frame.x_max - (frame.x_max % 1 if rounds else 0), 8, integer=rounds)
    for tick in x_ticks:
        if tick <= frame.x_max + 1e-9:
            x = frame.x(tick)
            parts.append(
                f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}" class="axis"/>'
            )
            parts.append(f'<text x="{x:.1f}" y="{bottom + 16}" class="tick mid">{tick:.0f}</text>')
    parts.append(f'<line x1="{LEFT}" y1="{bottom}" x2="{right}" y2="{bottom}" class="axis"/>')
    parts.append(f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{bottom}" class="axis"/>')
    middle_x, middle_y = (LEFT + right) / 2, (TOP + bottom) / 2
    parts.append(
        f'<text x="{middle_x:.1f}" y="{HEIGHT - 6}" class="label mid">{escape(x_label)}</text>'
    )
    parts.append(
        f'<text x="14" y="{middle_y:.1f}" class="label mid" '
        f'transform="rotate(-90 14 {middle_y:.1f})">{escape(y_label)}</text>'
    )
    return parts


def _legend(entries: Sequence[tuple[str, str]]) -> list[str]:
    parts, x = [], WIDTH - RIGHT
    for label, color in reversed(entries):
        x -= 12 + 7 * len(label)
        parts.append(f'<rect x="{x}" y="12" width="10" height="10" rx="2" fill="{color}"/>')
        parts.append(f'<text x="{x + 14}" y="21" class="legend">{escape(label)}</text>')
        x -= 10
    return parts


def _polyline(frame: Frame, line: Series, x_unit: str = "round") -> list[str]:
    if not line.points:
        return []
    coords = " ".join(f"{frame.x(x):.1f},{frame.y(y):.1f}" for x, y in line.points)
    parts = [f'<polyline points="{coords}" fill="none" stroke="{line.color}" stroke-width="2"/>']
    radius = 2.6 if len(line.points) <= MAX_MARKED_POINTS else 0.0
    for x, y in line.points:
        parts.append(
            f'<circle cx="{frame.x(x):.1f}" cy="{frame.y(y):.1f}" r="{radius}" '
            f'fill="{line.color}"><title>{_x_text(x, x_unit)}: {escape(line.label)} {y:.4f}</title>'
            "</circle>"
        )
    return parts


def _x_text(x: float, unit: str) -> str:
    return f"round {x:.0f}" if unit == "round" else f"{x:.1f} {unit}"


def _empty_note() -> str:
    x, y = (LEFT + WIDTH - RIGHT) / 2, (TOP + HEIGHT - BOTTOM) / 2
    return f'<text x="{x:.1f}" y="{y:.1f}" class="label mid">no rounds yet</text>'


def _svg(title: str, parts: list[str], height: float = HEIGHT) -> str:
    style = (
        f"text{{font-family:{FONT};fill:#374151}}"
        ".title{font-size:13px;font-weight:600;fill:#111827}"
        ".tick{font-size:10px;fill:#6b7280}.label{font-size:11px;fill:#4b5563}"
        ".legend{font-size:11px}.end{text-anchor:end}.mid{text-anchor:middle}"
        ".grid{stroke:#e5e7eb;stroke-width:1}.axis{stroke:#9ca3af;stroke-width:1}"
    )
    body = "\n".join(parts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height:g}" '
        f'width="{WIDTH}" height="{height:g}" role="img" aria-label="{escape(title)}">\n'
        f"<title>{escape(title)}</title><style>{style}</style>\n"
        f'<rect width="{WIDTH}" height="{height:g}" fill="#ffffff"/>\n{body}\n</svg>\n'
    )


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _int(value: object) -> int:
    """A stored count or round as a non-negative int; 0 for anything else (NaN, text)."""
    if isinstance(value, float) and not math.isfinite(value):
        return 0
    return max(0, int(value)) if isinstance(value, int | float) else 0
