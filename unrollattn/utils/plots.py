"""The one plot helper: matplotlib on the Agg backend (no display needed), series drawn as lines, points or bars
with optional error bars, and figures written atomically as PNG."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from .io import atomic_write

__all__ = ["Series", "draw_series", "new_figure", "save_figure", "series_figure"]

SERIES_KINDS = ("line", "points", "bar")


@dataclasses.dataclass(frozen=True)
class Series:
    """One labelled series: ``y`` against ``x``, drawn as a ``kind`` ("line", "points" or "bar"); ``yerr`` (one
    per point) adds error bars; ``style`` is passed to matplotlib (color, linestyle, marker, linewidth, ...)."""

    x: Sequence[float]
    y: Sequence[float]
    label: str | None = None
    kind: str = "line"
    yerr: Sequence[float] | None = None
    style: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in SERIES_KINDS:
            raise ValueError(f"Series kind: expected one of {SERIES_KINDS}, got {self.kind!r}")
        if len(self.x) != len(self.y):
            raise ValueError(f"Series {self.label!r}: x has {len(self.x)} values but y has {len(self.y)}")
        if self.yerr is not None and len(self.yerr) != len(self.y):
            raise ValueError(f"Series {self.label!r}: yerr has {len(self.yerr)} values, expected one per y "
                             f"({len(self.y)})")


def new_figure(rows: int = 1, cols: int = 1, *, figsize: tuple[float, float] = (6, 4)) -> tuple[Any, Any]:
    """``(figure, axes)`` on the Agg backend; ``axes`` is the ``rows`` x ``cols`` array of Axes (also for 1 x 1)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=figsize, squeeze=False)


def draw_series(ax: Any, series: Sequence[Series], *, xlabel: str | None = None, ylabel: str | None = None,
                title: str | None = None, log_x: bool = False, log_y: bool = False, legend: bool = True) -> None:
    """Draw every series on ``ax`` (bars of several series side by side), then labels, grid and legend."""
    bars = [s for s in series if s.kind == "bar"]
    for s in series:
        style = dict(s.style)
        if s.kind == "bar":
            width = style.pop("width", 0.8 / len(bars))
            offset = (bars.index(s) - (len(bars) - 1) / 2) * width
            ax.bar([x + offset for x in s.x], s.y, width=width, yerr=s.yerr, capsize=3 if s.yerr is not None else 0,
                   label=s.label, **style)
        elif s.yerr is not None:
            fmt = "o" if s.kind == "points" else "-"
            ax.errorbar(s.x, s.y, yerr=s.yerr, fmt=style.pop("fmt", fmt), capsize=3, label=s.label, **style)
        elif s.kind == "points":
            ax.plot(s.x, s.y, linestyle="none", marker=style.pop("marker", "o"), label=s.label, **style)
        else:
            ax.plot(s.x, s.y, label=s.label, **style)
    if log_x:
        ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if legend and any(s.label for s in series):
        ax.legend(fontsize=7)


def series_figure(series: Sequence[Series], out_png: str | os.PathLike, *, figsize: tuple[float, float] = (6, 4),
                  dpi: int = 110, **labels: Any) -> Path:
    """One-panel figure of ``series`` (``labels``: the keyword arguments of :func:`draw_series`) saved to
    ``out_png``."""
    if not series:
        raise ValueError("series_figure: expected at least one Series")
    fig, axes = new_figure(figsize=figsize)
    draw_series(axes[0, 0], series, **labels)
    fig.tight_layout()
    return save_figure(fig, out_png, dpi=dpi)


def save_figure(fig: Any, out_png: str | os.PathLike, *, dpi: int = 110) -> Path:
    """Write ``fig`` to ``out_png`` atomically (readers never see half a PNG) and close it."""
    import matplotlib.pyplot as plt

    out_png = Path(out_png)
    try:
        atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)
    return out_png
