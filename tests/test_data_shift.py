"""Tests of the generated covariate-shift populations of bncourse.data (chapter 1)."""

from __future__ import annotations

import numpy as np
import pytest

from bncourse.data import (
    SHIFT_LOCATION,
    SHIFT_SCALE,
    SHIFTS,
    ShiftData,
    make_shift_data,
    shift_labels,
)


def _standardize(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(axis=0)) / x.std(axis=0)


@pytest.mark.parametrize("shift", SHIFTS)
def test_shapes_dtypes_and_seeding(shift):
    data = make_shift_data(shift, n_source=50, n_shifted=30, seed=3)
    assert isinstance(data, ShiftData)
    assert data.x_source.shape == (50, 2) and data.x_shifted.shape == (30, 2)
    assert data.y_source.shape == (50,) and data.y_shifted.shape == (30,)
    assert data.z_shifted.shape == (30, 2)
    assert data.x_source.dtype == np.float64 and data.y_source.dtype == np.int64
    assert set(np.unique(data.y_source)) <= {0, 1}
    again = make_shift_data(shift, n_source=50, n_shifted=30, seed=3)
    for a, b in zip(data, again, strict=True):
        np.testing.assert_array_equal(a, b)
    other = make_shift_data(shift, n_source=50, n_shifted=30, seed=4)
    assert not np.array_equal(data.x_source, other.x_source)


def test_source_is_the_same_for_every_shift():
    sources = [make_shift_data(shift, seed=1).x_source for shift in SHIFTS]
    for source in sources[1:]:
        np.testing.assert_array_equal(source, sources[0])


@pytest.mark.parametrize("shift", SHIFTS)
def test_labels_follow_the_latent_rule_and_are_balanced(shift):
    data = make_shift_data(shift, n_source=4000, n_shifted=4000, seed=0)
    np.testing.assert_array_equal(data.y_source, shift_labels(data.x_source))
    np.testing.assert_array_equal(data.y_shifted, shift_labels(data.z_shifted))
    assert abs(data.y_source.mean() - 0.5) < 0.03 and abs(data.y_shifted.mean() - 0.5) < 0.03


def test_location_scale_shift_is_affine_and_undone_by_standardising():
    data = make_shift_data("location_scale", n_source=20000, n_shifted=20000, seed=0)
    np.testing.assert_allclose(data.x_shifted, SHIFT_SCALE * data.z_shifted + SHIFT_LOCATION)
    np.testing.assert_allclose(data.x_shifted.mean(axis=0), SHIFT_LOCATION, atol=0.05)
    np.testing.assert_allclose(data.x_shifted.std(axis=0), SHIFT_SCALE, rtol=0.03)
    # Standardised with its own statistics, the shifted population is the standardised latent.
    np.testing.assert_allclose(_standardize(data.x_shifted), _standardize(data.z_shifted))


def test_shape_shift_is_monotone_bimodal_and_not_undone_by_standardising():
    data = make_shift_data("shape", n_source=20000, n_shifted=20000, seed=0)
    for j in range(2):
        order = np.argsort(data.z_shifted[:, j])
        assert np.all(np.diff(data.x_shifted[order, j]) >= 0)  # monotone: no information lost
    standardized = _standardize(data.x_shifted)
    source = _standardize(data.x_source)
    np.testing.assert_allclose(standardized.mean(axis=0), 0.0, atol=1e-9)
    np.testing.assert_allclose(standardized.std(axis=0), 1.0, rtol=1e-9)
    # Bimodal: a gap in the middle where the source has its mode.
    bins = np.linspace(-3, 3, 31)
    for j in range(2):
        shifted_density, _ = np.histogram(standardized[:, j], bins=bins, density=True)
        source_density, _ = np.histogram(source[:, j], bins=bins, density=True)
        assert np.abs(shifted_density - source_density).sum() * (bins[1] - bins[0]) > 0.5


def test_none_is_a_fresh_draw_of_the_source():
    data = make_shift_data("none", n_source=20000, n_shifted=20000, seed=0)
    np.testing.assert_array_equal(data.x_shifted, data.z_shifted)
    np.testing.assert_allclose(data.x_shifted.mean(axis=0), 0.0, atol=0.03)
    np.testing.assert_allclose(data.x_shifted.std(axis=0), 1.0, rtol=0.03)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(shift="rotate"), "shift must be one of"),
        (dict(n_source=0), "n_source must be a positive int"),
        (dict(n_shifted=2.5), "n_shifted must be a positive int"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_shift_data(**kwargs)
