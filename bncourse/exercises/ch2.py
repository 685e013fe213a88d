"""Checks for the coding exercises of chapter 2 (the BN transform).

* :func:`check_forward` (exercise ex-2-1): ``bn_forward(x, gamma, beta, eps) -> y`` for an input
  of shape (N, C).
* :func:`check_backward` (exercise ex-2-2): ``bn_backward(dy, x, gamma, eps) -> (dx, dgamma,
  dbeta)``, the compact closed form.

Both compare the learner's function with :mod:`bncourse.numpy_bn` on several inputs (different
shapes, a batch of two, a large offset, a feature with a tiny spread) and, when the answer is
wrong, try to name the usual mistake.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bncourse import numpy_bn
from bncourse.exercises._common import assert_close, exercise_check

__all__ = ["check_forward", "check_backward"]


def _cases() -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, float]]:
    """(description, x, gamma, beta, eps) test cases, float64, shape (N, C)."""
    rng = np.random.default_rng(2)
    cases = []
    x = rng.normal(0.0, 1.0, size=(16, 3))
    cases.append(("a (16, 3) standard normal batch", x, np.ones(3), np.zeros(3), 1e-5))
    x = rng.normal([5.0, -2.0, 0.0, 100.0], [3.0, 0.1, 1.0, 20.0], size=(32, 4))
    gamma, beta = rng.normal(1.0, 0.5, size=4), rng.normal(0.0, 1.0, size=4)
    cases.append(("a (32, 4) batch with different means and spreads", x, gamma, beta, 1e-5))
    x = rng.normal(0.0, 1.0, size=(2, 5))
    gamma, beta = rng.uniform(0.5, 2.0, size=5), rng.normal(0.0, 1.0, size=5)
    cases.append(("a batch of only 2 examples", x, gamma, beta, 1e-5))
    x = rng.normal(0.0, 1e-3, size=(8, 2))
    cases.append(
        (
            "features with a tiny spread and eps = 1e-3",
            x,
            np.array([2.0, 0.5]),
            np.array([0.0, 1.0]),
            1e-3,
        )
    )
    x = 1e3 + rng.normal(0.0, 1.0, size=(10, 3))
    gamma, beta = rng.uniform(0.5, 2.0, size=3), rng.normal(0.0, 1.0, size=3)
    cases.append(("a batch with mean 1000", x, gamma, beta, 1e-5))
    return cases


def _copies(*arrays: np.ndarray) -> list[np.ndarray]:
    """Fresh copies, so that a learner's function that writes into its inputs harms nothing."""
    return [np.array(a, copy=True) for a in arrays]


def _forward_hint(y: np.ndarray, x: np.ndarray, gamma, beta, eps: float) -> str:
    """A guess at the usual mistakes of the forward pass, or an empty string."""
    centred, var = x - x.mean(axis=0), x.var(axis=0)
    row_centred, row_var = x - x.mean(axis=1, keepdims=True), x.var(axis=1, keepdims=True)
    guesses = {
        "you seem to use the unbiased variance (ddof=1); BN normalises with the biased one "
        "(divide by N)": centred / np.sqrt(x.var(axis=0, ddof=1) + eps),
        "you seem to leave eps out (or add it outside the square root)": centred / np.sqrt(var),
        "you seem to add eps to the standard deviation instead of to the variance": centred
        / (np.sqrt(var) + eps),
        "you seem to compute the statistics over the wrong axis (they are per feature, over "
        "the batch: axis 0)": row_centred / np.sqrt(row_var + eps),
    }
    guesses = {hint: gamma * wrong + beta for hint, wrong in guesses.items()}
    guesses["you seem to forget gamma and beta"] = centred / np.sqrt(var + eps)
    for hint, wrong in guesses.items():
        if np.shape(y) == wrong.shape and np.allclose(y, wrong, rtol=1e-6, atol=1e-8):
            return f" Hint: {hint}."
    return ""


@exercise_check("ex-2-1")
def check_forward(bn_forward: Callable[..., np.ndarray]) -> None:
    """Check ``bn_forward(x, gamma, beta, eps)`` against :func:`numpy_bn.batch_norm_forward`."""
    for description, x, gamma, beta, eps in _cases():
        expected, _ = numpy_bn.batch_norm_forward(x, gamma, beta, eps)
        y = bn_forward(*_copies(x, gamma, beta), eps)
        if y is None:
            raise AssertionError("bn_forward returned None; return the normalised batch y")
        try:
            assert_close(y, expected, f"bn_forward on {description}", rtol=1e-6, atol=1e-8)
        except AssertionError as err:
            hint = _forward_hint(np.asarray(y), x, gamma, beta, eps)
            raise AssertionError(f"{err}.{hint}") from None


def _backward_hint(dx: np.ndarray, dy: np.ndarray, cache) -> str:
    """A guess at the usual mistakes of the backward pass, or an empty string."""
    scale = cache.gamma * cache.inv_std
    m = dy.shape[0]
    x_hat = cache.x_hat
    mean_g, mean_g_xhat = dy.mean(axis=0), (dy * x_hat).mean(axis=0)
    guesses = {
        "you seem to treat the mean and variance as constants (dx = gamma / std * dy); they "
        "depend on x too": dy,
        "you seem to subtract only the mean of g; the x_hat * mean(g * x_hat) term is missing": dy
        - mean_g,
        "you seem to leave out the mean of g; the term - mean(g) is missing": dy
        - x_hat * mean_g_xhat,
        "your dx is m times too large: the means of g and g * x_hat divide by m": m
        * (dy - mean_g - x_hat * mean_g_xhat),
    }
    guesses = {hint: scale * wrong for hint, wrong in guesses.items()}
    for hint, wrong in guesses.items():
        if np.shape(dx) == wrong.shape and np.allclose(dx, wrong, rtol=1e-6, atol=1e-8):
            return f" Hint: {hint}."
    return ""


@exercise_check("ex-2-2")
def check_backward(bn_backward: Callable[..., tuple]) -> None:
    """Check ``bn_backward(dy, x, gamma, eps)`` against :func:`numpy_bn.batch_norm_backward`."""
    rng = np.random.default_rng(3)
    for description, x, gamma, beta, eps in _cases():
        _, cache = numpy_bn.batch_norm_forward(x, gamma, beta, eps)
        dy = rng.normal(0.0, 1.0, size=x.shape)
        dx_ref, dgamma_ref, dbeta_ref = numpy_bn.batch_norm_backward(dy, cache)
        result = bn_backward(*_copies(dy, x, gamma), eps)
        if not isinstance(result, (tuple, list)) or len(result) != 3:
            raise AssertionError(
                f"bn_backward must return a tuple (dx, dgamma, dbeta), got {type(result).__name__}"
            )
        dx, dgamma, dbeta = result
        assert_close(dbeta, dbeta_ref, f"dbeta on {description}", rtol=1e-6, atol=1e-8)
        assert_close(dgamma, dgamma_ref, f"dgamma on {description}", rtol=1e-6, atol=1e-8)
        # dx is a difference of terms of order gamma / std * |dy|: compare at that scale
        tolerance = 1e-7 * float(np.max(np.abs(gamma * cache.inv_std)))
        try:
            assert_close(dx, dx_ref, f"dx on {description}", rtol=1e-6, atol=tolerance)
        except AssertionError as err:
            hint = _backward_hint(np.asarray(dx), dy, cache)
            raise AssertionError(f"{err}.{hint}") from None
