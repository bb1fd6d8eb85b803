"""Shared pieces of the reproduction sections: sizes, results, markdown tables, figures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "SCALES",
    "Section",
    "fit_loglog_slope",
    "fmt",
    "markdown_table",
    "pyplot",
]

#: Sizes a section can run at: ``full`` (what docs/results.md shows), ``quick`` (a few
#: minutes on 2 cores in total) and ``tiny`` (internal: the test suite's smoke run).
SCALES = ("full", "quick", "tiny")


@dataclass
class Section:
    """What one section produced.

    Attributes:
        name: the section's key (``toy``, ``rates``, ...).
        title: the heading in results.md.
        markdown: the section's body (tables, figure links relative to the output folder,
            reading).
        images: PNG paths relative to the output folder.
        wall_time_s: seconds the section took.
        data: machine-readable numbers (written to ``<name>.json``).
    """

    name: str
    title: str
    markdown: str
    images: list[str] = field(default_factory=list)
    wall_time_s: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)


def fmt(value: float | None, digits: int = 3) -> str:
    """A compact number for tables: ``—`` for None, ``inf``/``nan`` spelled out."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e4:
        return f"{value:.{digits}g}"
    return f"{value:.{max(1, digits - 1)}e}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are formatted with :func:`fmt` unless strings."""
    if not header:
        raise ValueError("markdown_table needs at least one column")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row has {len(row)} cells, header has {len(header)}")
        cells = [c if isinstance(c, str) else fmt(c) for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def fit_loglog_slope(ks: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log(values) against log(ks) (positive finite points only).

    Returns NaN when fewer than two usable points remain.
    """
    xs, ys = [], []
    for k, v in zip(ks, values):
        if k > 0 and v > 0 and math.isfinite(k) and math.isfinite(v):
            xs.append(math.log(k))
            ys.append(math.log(v))
    if len(xs) < 2:
        return math.nan
    mx = sum(xs) / len(xs)
    my = sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return math.nan
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, out: Path, name: str, dpi: int) -> str:
    """Save ``fig`` as ``out/img/<name>.png``; return the path relative to ``out``."""
    img = out / "img"
    img.mkdir(parents=True, exist_ok=True)
    fig.savefig(img / f"{name}.png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return f"img/{name}.png"
