"""Smoke tests of bncourse.plotting with the Agg backend: helpers draw, label and add legends."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from bncourse import plotting  # noqa: E402
from bncourse.plotting import (  # noqa: E402
    COLORS,
    CYCLE,
    color_for,
    label_axes,
    plot_curves,
    plot_histograms,
    plot_percentile_band,
    subplots,
    use_book_style,
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _legend_labels(ax):
    legend = ax.get_legend()
    assert legend is not None, "the axes have no legend"
    return [text.get_text() for text in legend.get_texts()]


def test_style_is_applied_on_first_use():
    plotting._style_applied = False
    matplotlib.rcParams["axes.spines.top"] = True
    fig, ax = plt.subplots()
    plot_curves(ax, np.arange(3), {"BN": np.ones(3)}, "step", "loss")
    assert matplotlib.rcParams["axes.spines.top"] is False
    assert matplotlib.rcParams["figure.dpi"] == plotting.DPI
    assert tuple(matplotlib.rcParams["figure.figsize"]) == (plotting.FIGURE_WIDTH, 3.4)
    assert matplotlib.rcParams["axes.grid"] is True


def test_use_book_style():
    matplotlib.rcParams["axes.spines.right"] = True
    use_book_style()
    assert matplotlib.rcParams["axes.spines.right"] is False
    assert matplotlib.rcParams["font.size"] >= 10


def test_colors():
    assert set(COLORS) >= {"no BN", "BN", "BN (no affine)"}
    assert len(set(COLORS.values())) == len(COLORS)
    assert color_for("BN") == COLORS["BN"]
    assert color_for("lr = 0.1", 2) == CYCLE[2]


def test_label_axes():
    fig, ax = plt.subplots()
    assert label_axes(ax, "step", "accuracy", title="Test") is ax
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("step", "accuracy", "Test")


def test_plot_curves():
    fig, ax = plt.subplots()
    steps = np.arange(0, 100, 10)
    curves = {"no BN": np.linspace(0.1, 0.8, 10), "BN": np.linspace(0.1, 0.95, 10), "x": steps}
    assert plot_curves(ax, steps, curves, "training step", "test accuracy") is ax
    assert ax.get_xlabel() == "training step" and ax.get_ylabel() == "test accuracy"
    assert _legend_labels(ax) == ["no BN", "BN", "x"]
    colors = [to_hex(line.get_color()) for line in ax.get_lines()]
    assert colors[0] == COLORS["no BN"].lower() and colors[1] == COLORS["BN"].lower()
    assert colors[2] not in colors[:2]  # other labels avoid the fixed colours in use
    fig.canvas.draw()


def test_plot_curves_with_steps_per_label_and_errors():
    fig, ax = plt.subplots()
    plot_curves(
        ax, {"a": np.arange(3), "b": np.arange(5)}, {"a": np.ones(3), "b": np.zeros(5)}, "x", "y"
    )
    assert _legend_labels(ax) == ["a", "b"]
    with pytest.raises(ValueError, match="shape"):
        plot_curves(ax, np.arange(3), {"a": np.ones(4)}, "x", "y")
    with pytest.raises(ValueError, match="empty"):
        plot_curves(ax, np.arange(3), {}, "x", "y")


def test_plot_percentile_band():
    fig, ax = plt.subplots()
    steps = np.arange(0, 200, 10)
    rng = np.random.default_rng(0)
    median = np.cumsum(rng.normal(size=20))
    percentiles = np.stack([median - 1, median, median + 1], axis=1)
    assert plot_percentile_band(ax, steps, percentiles, "no BN") is ax
    plot_percentile_band(ax, steps, percentiles + 2, "BN", title="Sigmoid input")
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title() == "Sigmoid input"
    assert _legend_labels(ax) == ["no BN", "BN"]
    np.testing.assert_array_equal(ax.get_lines()[0].get_ydata(), median)
    assert len(ax.collections) == 2  # one band each
    assert to_hex(ax.get_lines()[1].get_color()) == COLORS["BN"].lower()
    five = np.sort(rng.normal(size=(20, 5)), axis=1)
    plot_percentile_band(ax, steps, five, "five levels", color="black")
    with pytest.raises(ValueError, match="P odd"):
        plot_percentile_band(ax, steps, percentiles[:, :2], "bad")
    with pytest.raises(ValueError, match="steps"):
        plot_percentile_band(ax, steps[:5], percentiles, "bad")
    fig.canvas.draw()


def test_plot_histograms():
    fig, ax = plt.subplots()
    rng = np.random.default_rng(0)
    samples = {
        "unimodal": rng.normal(size=500),
        "bimodal": np.r_[rng.normal(-2, 0.5, 250), rng.normal(2, 0.5, 250)],
    }
    assert plot_histograms(ax, samples, bins=30) is ax
    assert ax.get_xlabel() == "value" and ax.get_ylabel() == "density"
    assert _legend_labels(ax) == ["unimodal", "bimodal"]
    plot_histograms(ax, {"constant": np.ones(10)}, bins=np.linspace(0, 2, 5), xlabel="x")
    assert ax.get_xlabel() == "x"
    with pytest.raises(ValueError, match="empty"):
        plot_histograms(ax, {})
    fig.canvas.draw()


def test_subplots_fit_the_text_column():
    fig, ax = subplots()
    assert tuple(fig.get_size_inches()) == (plotting.FIGURE_WIDTH, plotting.PANEL_HEIGHT)
    fig, axes = subplots(1, 2)
    assert axes.shape == (2,) and fig.get_size_inches()[0] == plotting.FIGURE_WIDTH
    fig, axes = subplots(2, 1)
    assert axes.shape == (2,) and fig.get_size_inches()[1] > plotting.PANEL_HEIGHT
    fig, ax = subplots(figsize=(12, 3.0))  # too wide for the column: narrowed, height kept
    assert tuple(fig.get_size_inches()) == (plotting.FIGURE_WIDTH, 3.0)
    fig, ax = subplots(figsize=(4, 4), height=2.5)
    assert tuple(fig.get_size_inches()) == (4.0, 2.5)


def test_every_text_of_the_style_is_at_least_11_points():
    use_book_style()
    keys = ["font.size", "axes.labelsize", "xtick.labelsize", "ytick.labelsize"]
    keys += ["legend.fontsize", "axes.titlesize"]
    sizes = {key: matplotlib.rcParams[key] for key in keys}
    assert min(sizes.values()) >= 11, sizes
    # on a phone the column is about 358 CSS px: text of 11 pt in a figure filling it
    assert 11 / 72 * 358 / plotting.FIGURE_WIDTH >= 8.0
