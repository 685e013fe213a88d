"""Checks of the coding exercises of chapter 1 (covariate shift and internal covariate shift).

* :func:`check_batch_statistics` (ex-1-2): per-feature mean and biased variance of a mini-batch.
* :func:`check_standardize_with_training_statistics` (ex-1-3): standardise new data with the
  training split's statistics, leaving features that are constant on it unscaled.
* :func:`check_spread_of_batch_means` (ex-1-4): the standard deviation of the batch means across
  consecutive mini-batches.
"""

from __future__ import annotations

import numpy as np

from bncourse import numpy_bn
from bncourse.exercises._common import assert_close, exercise_check

__all__ = [
    "reference_standardize_with_training_statistics",
    "reference_spread_of_batch_means",
    "check_batch_statistics",
    "check_standardize_with_training_statistics",
    "check_spread_of_batch_means",
]

MIN_STD = 1e-6
"""Training standard deviations below this count as zero (a constant feature): divide by 1."""


def reference_standardize_with_training_statistics(
    x_train: np.ndarray, x_new: np.ndarray
) -> np.ndarray:
    """Standardise ``x_new`` (M, D) with the per-feature mean and std of ``x_train`` (N, D).

    Features whose training std is below :data:`MIN_STD` are only centred (divided by 1).
    """
    x_train, x_new = np.asarray(x_train, dtype=np.float64), np.asarray(x_new, dtype=np.float64)
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.where(std < MIN_STD, 1.0, std)
    return (x_new - mean) / std


def reference_spread_of_batch_means(x: np.ndarray, batch_size: int) -> np.ndarray:
    """Std across consecutive batches of ``batch_size`` rows of ``x`` (N, D) of the batch means.

    The last ``N % batch_size`` rows are dropped; returns shape (D,).
    """
    x = np.asarray(x, dtype=np.float64)
    num_batches = x.shape[0] // batch_size
    batches = x[: num_batches * batch_size].reshape(num_batches, batch_size, x.shape[1])
    return batches.mean(axis=1).std(axis=0)


def _batches() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [
        rng.normal(0.0, 1.0, size=(16, 3)),
        rng.normal([5.0, -2.0, 0.0, 100.0], [0.1, 3.0, 1.0, 20.0], size=(7, 4)),
        rng.exponential(2.0, size=(2, 5)),  # the smallest batch with a variance
        np.hstack([np.full((10, 1), 4.0), rng.normal(size=(10, 2))]),  # a constant feature
        rng.normal(size=(64, 1)),
    ]


@exercise_check("ex-1-2")
def check_batch_statistics(batch_statistics) -> None:
    """``batch_statistics(x)`` returns the per-feature mean and biased variance of (N, D) ``x``."""
    for x in _batches():
        result = batch_statistics(x.copy())
        assert isinstance(result, tuple) and len(result) == 2, (
            "batch_statistics(x) must return a tuple (mean, var)"
        )
        mean, var = result
        expected_mean, expected_var = numpy_bn.batch_statistics(x)
        assert_close(mean, expected_mean, f"the mean of a batch of shape {x.shape}")
        unbiased = x.var(axis=0, ddof=1)
        if np.shape(var) == unbiased.shape and np.allclose(var, unbiased) and x.shape[0] > 1:
            raise AssertionError(
                "the variance divides by N - 1 (unbiased); batch norm uses the biased variance, "
                "dividing by N (np.var's default ddof=0)"
            )
        assert_close(var, expected_var, f"the variance of a batch of shape {x.shape}")


@exercise_check("ex-1-3")
def check_standardize_with_training_statistics(standardize_with_training_statistics) -> None:
    """``standardize_with_training_statistics(x_train, x_new)`` uses the training statistics."""
    rng = np.random.default_rng(2)
    cases = [
        (rng.normal(3.0, 2.0, size=(50, 3)), rng.normal(3.0, 2.0, size=(20, 3))),
        (rng.normal(0.0, 1.0, size=(40, 2)), rng.normal([4.0, -1.0], [0.5, 3.0], size=(9, 2))),
        (rng.normal(size=(30, 4)), rng.normal(size=(1, 4))),  # a single new example
    ]
    x_train = rng.normal(size=(25, 3))
    x_train[:, 1] = 7.0  # constant on the training split
    cases.append((x_train, rng.normal(7.0, 1.0, size=(6, 3))))
    for x_train, x_new in cases:
        result = standardize_with_training_statistics(x_train.copy(), x_new.copy())
        expected = reference_standardize_with_training_statistics(x_train, x_new)
        own = (x_new - x_new.mean(axis=0)) / np.where(x_new.std(axis=0) > 0, x_new.std(axis=0), 1)
        if (
            len(x_new) > 1
            and np.shape(result) == expected.shape
            and np.allclose(result, own)
            and not np.allclose(own, expected)
        ):
            raise AssertionError(
                "the new data were standardised with their own mean and std; use the mean and "
                "std of x_train"
            )
        if np.shape(result) == expected.shape and not np.all(np.isfinite(result)):
            raise AssertionError(
                "the result holds inf or NaN: a feature that is constant on x_train has std 0; "
                "divide it by 1 instead"
            )
        assert_close(
            result,
            expected,
            f"the standardised x_new (x_train {x_train.shape}, x_new {x_new.shape})",
        )


@exercise_check("ex-1-4")
def check_spread_of_batch_means(spread_of_batch_means) -> None:
    """``spread_of_batch_means(x, batch_size)``: std over consecutive batches of the batch means."""
    rng = np.random.default_rng(3)
    x = rng.exponential(1.0, size=(1000, 3))
    for batch_size in (1, 4, 10, 64, 999, 1000):
        result = spread_of_batch_means(x.copy(), batch_size)
        expected = reference_spread_of_batch_means(x, batch_size)
        if batch_size == 64 and np.shape(result) == expected.shape:
            with_remainder = np.array(
                [x[start : start + 64].mean(axis=0) for start in range(0, 1000, 64)]
            ).std(axis=0)
            if np.allclose(result, with_remainder):
                raise AssertionError(
                    "the last, incomplete batch (1000 % 64 = 40 rows) was kept; drop it"
                )
        assert_close(result, expected, f"spread_of_batch_means(x, batch_size={batch_size})")
    small = rng.normal(size=(6, 2))
    assert_close(
        spread_of_batch_means(small.copy(), 2),
        reference_spread_of_batch_means(small, 2),
        "spread_of_batch_means on a (6, 2) input with batch_size=2",
    )
