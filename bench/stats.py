"""Percentiles, ratios and the readable table of a benchmark result."""

from __future__ import annotations

import math
import statistics
from typing import Any


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(values: list[float], digits: int = 2) -> dict[str, Any]:
    p50, p99 = percentile(values, 50), percentile(values, 99)
    return {"p50": _round(p50, digits), "p99": _round(p99, digits), "n": len(values)}


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None, digits: int = 2) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, digits)


def per(total: float | None, count: int, digits: int = 3) -> float | None:
    return None if total is None or count == 0 else round(total / count, digits)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def render(rows: list[tuple[str, Any, Any, Any]], title: str) -> str:
    """A plain-text table: figure | agent | baseline | ratio."""
    header = ("figure", "agent", "baseline", "ratio")
    cells = [header] + [(name, _fmt(a), _fmt(b), _fmt(r)) for name, a, b, r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(4)]
    lines = [title, ""]
    for n, row in enumerate(cells):
        lines.append("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                               for i, cell in enumerate(row)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
