"""Shared matplotlib/seaborn helpers so every figure of the book looks alike, and its tables."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

if TYPE_CHECKING:
    import pandas as pd
    from pandas.io.formats.style import Styler

_PALETTE = sns.color_palette("colorblind", 10)
# what is not a merge method; methods bring their own label and colour from the registry
COLORS = {"target": (0.1, 0.1, 0.1), "base": _PALETTE[7]}
LABELS = {"target": "all-data target", "base": "base model"}


def style() -> None:
    """The book's figure style (call once per notebook)."""
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    plt.rcParams.update({"figure.dpi": 90, "savefig.dpi": 90, "figure.figsize": (6.0, 4.0)})


def figure(ncols: int = 1, width: float = 5.0, height: float = 4.0, **kw):
    """fig, axes with `ncols` panels of the given size each."""
    return plt.subplots(1, ncols, figsize=(width * ncols, height), **kw)


def grid(xlim: Sequence[float], ylim: Sequence[float], n: int = 120) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Meshgrid over a box; returns X, Y and the (n, n, 2) stacked points."""
    xs, ys = np.meshgrid(np.linspace(*xlim, n), np.linspace(*ylim, n))
    return xs, ys, np.stack([xs, ys], -1)


def contours(ax, f: Callable[[np.ndarray], np.ndarray], xlim, ylim, *, color=None, levels: int = 8,
             label: str | None = None, filled: bool = False, n: int = 120, **kw) -> None:
    """Loss contours of f (a function of (..., 2) points) on a box; levels spaced in log(f - min)."""
    xs, ys, pts = grid(xlim, ylim, n)
    z = f(pts)
    z = np.log1p(z - z.min())
    if filled:
        ax.contourf(xs, ys, z, levels=levels, cmap="Greys", alpha=0.35, **kw)
    ax.contour(xs, ys, z, levels=levels, colors=[color if color is not None else "0.45"],
                    linewidths=1.0, **kw)
    if label is not None:
        ax.plot([], [], color=color if color is not None else "0.45", label=label)


def point(ax, xy, label: str, color=None, marker: str = "o", size: float = 70, **kw) -> None:
    ax.scatter([xy[0]], [xy[1]], s=size, marker=marker, color=color, label=label,
               edgecolor="black", linewidth=0.8, zorder=5, **kw)


def method_color(name: str):
    """A method's colour from the registry (`toolkit.merge.register(color=...)`), else the book's own."""
    from .merge import METHODS
    return METHODS[name].color if name in METHODS else COLORS.get(name)


def method_label(name: str) -> str:
    """A method's label from the registry, else the book's own, else the name."""
    from .merge import METHODS
    return METHODS[name].label if name in METHODS else LABELS.get(name, name)


def glue_figure(name: str, fig) -> None:
    """Glue `fig` for a {glue:figure} directive and close it, so it is shown only where glued."""
    from myst_nb import glue

    glue(name, fig, display=False)
    plt.close(fig)


def legend_outside(ax, **kw) -> None:
    """Legend to the right of the axes, so it never hides a point."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, **kw)


def table(df: pd.DataFrame, digits: int = 3, **names: str) -> Styler:
    """A results table as the book shows it: numbers to `digits` decimals, a dash where a value does
    not apply or cannot be computed (NaN: a knob a method lacks, the spread of a single seed), and
    columns renamed by `names` (code_name="shown name"); a cell never wraps ("0.979 ± 0.003" stays one
    line, wide tables scroll)."""
    return (df.rename(columns=names).style.format(precision=digits, na_rep="\u2013")
            .set_table_styles([{"selector": "td", "props": "white-space: nowrap;"}]))


def glue_all(values, prefix: str = "") -> None:
    """Glue every entry of a mapping (or a pandas Series) as `prefix + key`, displaying nothing:
    one call for the numbers a chapter's prose quotes."""
    from myst_nb import glue

    for key, value in dict(values).items():
        glue(f"{prefix}{key}", value, display=False)
