"""The book's plot style and plotting helpers.

Plotting is kept apart from computing: the helpers take plain data (arrays, dicts of arrays) and
draw on a Matplotlib ``Axes`` they return. The first helper called applies the book style
(:func:`use_book_style`), so every figure of the book looks alike; call it yourself before
``plt.subplots`` to style figures you draw by hand.

Figures are drawn for the book's text column (about 690 CSS px on a desktop, 360 px on a
phone): :data:`FIGURE_WIDTH` inches wide at most, with every text at least 11 pt, saved at
:data:`DPI` dots per inch (twice the 96 px of a CSS inch, so they stay sharp on high-density
screens). A figure that fills the column then shows its smallest text at about 16 CSS px on a
desktop and 8.5 px on a phone. :func:`subplots` caps the width at :data:`FIGURE_WIDTH`; put at
most two panels side by side and stack the others (``subplots(2, 1)``).

Colours are fixed for the comparisons the book makes again and again (:data:`COLORS`): a curve
labelled ``"no BN"`` is always vermilion, ``"BN"`` blue and ``"BN (no affine)"`` green; other
labels take the colours of :data:`CYCLE` in order. Both come from the Okabe-Ito palette, which
stays distinguishable with colour-vision deficiencies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = [
    "FIGURE_WIDTH",
    "PANEL_HEIGHT",
    "DPI",
    "COLORS",
    "CYCLE",
    "BOOK_STYLE",
    "use_book_style",
    "color_for",
    "label_axes",
    "subplots",
    "plot_curves",
    "plot_percentile_band",
    "plot_histograms",
]

COLORS: dict[str, str] = {
    "no BN": "#D55E00",  # vermilion
    "BN": "#0072B2",  # blue
    "BN (no affine)": "#009E73",  # bluish green
}
"""Fixed colours of the labels the book compares throughout."""

CYCLE: tuple[str, ...] = (
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#CC79A7",  # reddish purple
    "#000000",  # black
    "#999999",  # grey
    "#0072B2",  # blue
    "#D55E00",  # vermilion
    "#009E73",  # bluish green
)
"""Colours, in order, of the labels that have no fixed colour (also Matplotlib's default cycle)."""

FIGURE_WIDTH = 6.4
"""Width of a figure that fills the text column, in inches (the widest :func:`subplots`)."""

PANEL_HEIGHT = 3.4
"""The default height of one row of panels, in inches."""

DPI = 192
"""Dots per inch of the figures (the notebook's inline PNGs use ``figure.dpi``)."""

BOOK_STYLE: dict[str, object] = {
    "figure.figsize": (FIGURE_WIDTH, PANEL_HEIGHT),
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "savefig.bbox": "tight",
    "figure.facecolor": "white",
    "figure.constrained_layout.use": True,
    "axes.facecolor": "white",
    "axes.edgecolor": "#333333",
    "axes.labelcolor": "#222222",
    "axes.titlesize": 12,
    "axes.titleweight": "normal",
    "axes.labelsize": 11,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "axes.prop_cycle": mpl.cycler(color=list(CYCLE)),
    "grid.color": "#cccccc",
    "grid.linewidth": 0.6,
    "grid.alpha": 0.7,
    "font.size": 11,
    "font.family": "sans-serif",
    "xtick.labelsize": 11,
    "ytick.labelsize": 11,
    "xtick.color": "#333333",
    "ytick.color": "#333333",
    "legend.fontsize": 11,
    "legend.handlelength": 1.6,
    "legend.borderaxespad": 0.3,
    "legend.frameon": False,
    "lines.linewidth": 1.8,
    "image.cmap": "viridis",
}
"""The rcParams that :func:`use_book_style` applies."""

_style_applied = False


def use_book_style() -> None:
    """Apply the book's Matplotlib style (:data:`BOOK_STYLE`) to the current session.

    White background (the site keeps it white in its dark theme too), text of 11 pt and more, a
    light grid, no top/right spines, figures of :data:`FIGURE_WIDTH` x :data:`PANEL_HEIGHT`
    inches at :data:`DPI` dots per inch. The plotting helpers call it automatically the first
    time one is used.
    """
    global _style_applied
    mpl.rcParams.update(BOOK_STYLE)
    _style_applied = True


def _ensure_style() -> None:
    if not _style_applied:
        use_book_style()


def color_for(label: str, index: int = 0) -> str:
    """The colour of ``label``: its fixed colour in :data:`COLORS`, else ``CYCLE[index]``."""
    if label in COLORS:
        return COLORS[label]
    return CYCLE[index % len(CYCLE)]


def _colors_for(
    labels: Sequence[str], overrides: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Fixed colours where defined; the others take the cycle colours not already in use; then
    the colours of ``overrides`` (label to colour) replace those."""
    used = {COLORS[label] for label in labels if label in COLORS}
    free = [c for c in CYCLE if c not in used] or list(CYCLE)
    colors, next_free = {}, 0
    for label in labels:
        if label in COLORS:
            colors[label] = COLORS[label]
        else:
            colors[label] = free[next_free % len(free)]
            next_free += 1
    if overrides:
        colors.update(overrides)
    return colors


def label_axes(ax: Axes, xlabel: str, ylabel: str, title: str | None = None) -> Axes:
    """Set the axis labels (and the title, if given) of ``ax`` and return it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    return ax


def subplots(
    nrows: int = 1, ncols: int = 1, *, height: float | None = None, **kwargs
) -> tuple[Figure, Axes | np.ndarray]:
    """``plt.subplots`` in the book style, as wide as the text column.

    Parameters
    ----------
    nrows, ncols : int
        The grid of panels. Put at most two panels side by side; stack more (``nrows``).
    height : float, optional
        Height of the figure in inches; default :data:`PANEL_HEIGHT` per row (a little less per
        row when there are several).
    **kwargs
        Passed to ``plt.subplots``. A ``figsize`` wider than :data:`FIGURE_WIDTH` is narrowed to
        it (its height is kept), so that the figure is not shrunk into the column on the page.

    Returns
    -------
    fig : Figure
    axes : Axes or np.ndarray of Axes, shape (nrows, ncols) squeezed as ``plt.subplots`` does
    """
    import matplotlib.pyplot as plt

    _ensure_style()
    if "figsize" in kwargs:
        width, fig_height = kwargs["figsize"]
        kwargs["figsize"] = (min(float(width), FIGURE_WIDTH), float(fig_height))
    else:
        per_row = PANEL_HEIGHT if nrows == 1 else 0.85 * PANEL_HEIGHT
        kwargs["figsize"] = (FIGURE_WIDTH, height if height is not None else per_row * nrows)
    if height is not None:
        kwargs["figsize"] = (kwargs["figsize"][0], height)
    return plt.subplots(nrows, ncols, **kwargs)


def plot_curves(
    ax: Axes,
    steps: np.ndarray | Mapping[str, np.ndarray],
    curves: Mapping[str, np.ndarray],
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    colors: Mapping[str, str] | None = None,
    **line_kwargs,
) -> Axes:
    """Draw one line per entry of ``curves`` against ``steps``, with labels and a legend.

    Parameters
    ----------
    ax : Axes
        Where to draw.
    steps : array, shape (T,), or dict of label to array
        The x values, shared by all curves or given per label.
    curves : dict of label to array, each shape (T,)
        The y values; the label goes in the legend and picks the colour (:func:`color_for`).
    xlabel, ylabel : str
        Axis labels (with units where there are any).
    title : str, optional
        Axes title.
    colors : dict of label to colour, optional
        Colours overriding the book's.
    **line_kwargs
        Passed to ``ax.plot`` (e.g. ``linestyle``, ``marker``).

    Returns
    -------
    Axes
    """
    _ensure_style()
    if not curves:
        raise ValueError("plot_curves: curves is empty; give at least one label -> array")
    palette = _colors_for(list(curves), colors)
    for label, values in curves.items():
        x = steps[label] if isinstance(steps, Mapping) else steps
        x, values = np.asarray(x), np.asarray(values)
        if x.shape != values.shape:
            raise ValueError(
                f"plot_curves: curve {label!r} has shape {values.shape} but its steps have "
                f"shape {x.shape}"
            )
        ax.plot(x, values, label=label, color=palette[label], **line_kwargs)
    label_axes(ax, xlabel, ylabel, title)
    ax.legend()
    return ax


def plot_percentile_band(
    ax: Axes,
    steps: np.ndarray,
    percentiles: np.ndarray,
    label: str,
    color: str | None = None,
    xlabel: str = "training step",
    ylabel: str = "input to the nonlinearity",
    title: str | None = None,
    alpha: float = 0.25,
) -> Axes:
    """Median line and a shaded band between the outer percentiles, over training.

    This is the plot of Ioffe & Szegedy (2015), Figure 1(b, c): the 15th, 50th and 85th
    percentiles of one sigmoid's input as training goes on.

    Parameters
    ----------
    ax : Axes
        Where to draw.
    steps : np.ndarray, shape (T,)
        Training steps of the records.
    percentiles : np.ndarray, shape (T, P), P odd and >= 3, levels in increasing order
        E.g. ``record.unit_percentiles(unit)`` of an :class:`~bncourse.training.ActivationRecord`;
        the middle column is drawn as a line, the band spans the first and last columns.
    label : str
        Legend label; it also picks the colour (:func:`color_for`) unless ``color`` is given.
    color : str, optional
        Colour of the line and band.
    xlabel, ylabel : str
        Axis labels.
    title : str, optional
        Axes title.
    alpha : float, default 0.25
        Opacity of the band.

    Returns
    -------
    Axes
    """
    _ensure_style()
    steps, percentiles = np.asarray(steps), np.asarray(percentiles)
    if percentiles.ndim != 2 or percentiles.shape[1] < 3 or percentiles.shape[1] % 2 == 0:
        raise ValueError(
            f"plot_percentile_band: percentiles must have shape (T, P) with P odd and >= 3 "
            f"(e.g. the 15th, 50th and 85th), got {percentiles.shape}"
        )
    if len(steps) != len(percentiles):
        raise ValueError(
            f"plot_percentile_band: {len(steps)} steps but {len(percentiles)} rows of percentiles"
        )
    color = color or color_for(label, len(ax.get_lines()))
    middle = percentiles.shape[1] // 2
    ax.fill_between(
        steps, percentiles[:, 0], percentiles[:, -1], color=color, alpha=alpha, linewidth=0
    )
    ax.plot(steps, percentiles[:, middle], color=color, label=label)
    label_axes(ax, xlabel, ylabel, title)
    ax.legend()
    return ax


def plot_histograms(
    ax: Axes,
    samples: Mapping[str, np.ndarray],
    bins: int | Sequence[float] | np.ndarray = 50,
    xlabel: str = "value",
    ylabel: str = "density",
    title: str | None = None,
    density: bool = True,
    colors: Mapping[str, str] | None = None,
) -> Axes:
    """Overlaid histograms, one per entry of ``samples``, on common bins.

    Parameters
    ----------
    ax : Axes
        Where to draw.
    samples : dict of label to array (any shape; flattened)
        The values to histogram.
    bins : int or array of bin edges, default 50
        An int gives that many equal bins spanning all samples together, so the histograms are
        comparable.
    xlabel, ylabel : str
        Axis labels.
    title : str, optional
        Axes title.
    density : bool, default True
        Normalise each histogram to unit area (otherwise counts).
    colors : dict of label to colour, optional
        Colours overriding the book's.

    Returns
    -------
    Axes
    """
    _ensure_style()
    if not samples:
        raise ValueError("plot_histograms: samples is empty; give at least one label -> array")
    values = {label: np.asarray(v, dtype=float).ravel() for label, v in samples.items()}
    if isinstance(bins, (int, np.integer)):
        finite = np.concatenate([v[np.isfinite(v)] for v in values.values()])
        low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
        if low == high:
            low, high = low - 0.5, high + 0.5
        bins = np.linspace(low, high, int(bins) + 1)
    palette = _colors_for(list(values), colors)
    for label, v in values.items():
        color = palette[label]
        ax.hist(v, bins=bins, density=density, color=color, alpha=0.35, label=label)
        ax.hist(v, bins=bins, density=density, color=color, histtype="step", linewidth=1.5)
    label_axes(ax, xlabel, ylabel, title)
    ax.legend()
    return ax
