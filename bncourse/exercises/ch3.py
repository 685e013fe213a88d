"""Checks for the coding exercises of chapter 3 (gamma, beta and capacity).

* :func:`check_identity_parameters` (ex-3-1): the gamma and beta that make batch norm the identity.
* :func:`check_undo_batch_norm` (ex-3-2): invert batch norm's per-channel affine map.
"""

from __future__ import annotations

import numpy as np

from bncourse import numpy_bn
from bncourse.exercises._common import assert_close, exercise_check
from bncourse.experiments.ch3 import identity_parameters, undo_batch_norm

__all__ = ["check_identity_parameters", "check_undo_batch_norm"]


def _batches() -> list[tuple[str, np.ndarray]]:
    """Mini-batches with very different per-channel means and spreads, 2-D and 4-D."""
    rng = np.random.default_rng(3)
    means = np.array([5.0, -2.0, 0.0, 100.0])
    stds = np.array([3.0, 0.01, 1.0, 20.0])
    x2 = means + stds * rng.standard_normal((32, 4))
    x4 = means.reshape(1, 4, 1, 1) + stds.reshape(1, 4, 1, 1) * rng.standard_normal((8, 4, 3, 5))
    x_small = rng.standard_normal((2, 3)) * 4.0 + 1.0  # the smallest batch BN accepts
    return [
        ("x of shape (32, 4)", x2),
        ("x of shape (8, 4, 3, 5)", x4),
        ("x of shape (2, 3)", x_small),
    ]


@exercise_check("ex-3-1")
def check_identity_parameters(identity_parameters_solution) -> None:
    """``identity_parameters(x, eps)`` returns (gamma, beta) with BN(x; gamma, beta) == x."""
    for what, x in _batches():
        for eps in (1e-5, 1.0):
            result = identity_parameters_solution(x.copy(), eps)
            if not (isinstance(result, tuple) and len(result) == 2):
                raise AssertionError(
                    f"for {what}, return a pair (gamma, beta), got {type(result).__name__}"
                )
            gamma, beta = (np.asarray(r, dtype=np.float64) for r in result)
            channels = x.shape[1]
            for name, value in (("gamma", gamma), ("beta", beta)):
                if value.shape != (channels,):
                    raise AssertionError(
                        f"for {what}, {name} has shape {value.shape}; it needs one value per "
                        f"channel, shape ({channels},) (average over every axis but axis 1)"
                    )
            expected_gamma, expected_beta = identity_parameters(x, eps)
            assert_close(beta, expected_beta, f"beta for {what}", rtol=1e-9, atol=1e-12)
            if np.allclose(gamma, np.std(x, axis=_axes(x)), rtol=1e-9):
                raise AssertionError(
                    f"for {what}, eps={eps}, gamma equals the batch standard deviation; batch "
                    "norm divides by sqrt(var + eps), so gamma must be sqrt(var + eps)"
                )
            assert_close(gamma, expected_gamma, f"gamma for {what}, eps={eps}", rtol=1e-9)
            y, _ = numpy_bn.batch_norm_forward(x, gamma, beta, eps)
            assert_close(
                y, x, f"batch_norm_forward(x, gamma, beta) for {what}", rtol=1e-9, atol=1e-9
            )


def _axes(x: np.ndarray) -> tuple[int, ...]:
    return (0,) + tuple(range(2, x.ndim))


@exercise_check("ex-3-2")
def check_undo_batch_norm(undo_batch_norm_solution) -> None:
    """``undo_batch_norm(y, gamma, beta, mean, var, eps)`` returns the input of batch norm."""
    rng = np.random.default_rng(4)
    for what, x in _batches():
        channels = x.shape[1]
        gamma = rng.uniform(0.5, 2.0, channels) * rng.choice([-1.0, 1.0], channels)
        beta = rng.normal(0.0, 2.0, channels)
        for eps in (1e-5, 0.5):
            y, cache = numpy_bn.batch_norm_forward(x, gamma, beta, eps)
            result = undo_batch_norm_solution(
                y.copy(), gamma.copy(), beta.copy(), cache.mean.copy(), cache.var.copy(), eps
            )
            result = np.asarray(result, dtype=np.float64)
            if result.shape != x.shape:
                raise AssertionError(
                    f"for {what}, the result has shape {result.shape}, expected {x.shape}; "
                    "reshape per-channel vectors to (1, C) or (1, C, 1, 1) to broadcast"
                )
            expected = undo_batch_norm(y, gamma, beta, cache.mean, cache.var, eps)
            assert_close(
                result,
                expected,
                f"undo_batch_norm for {what}, eps={eps} (some gammas are negative)",
                rtol=1e-7,
                atol=1e-7,
            )
            assert_close(
                result,
                x,
                f"undo_batch_norm for {what} compared with the original x",
                rtol=1e-7,
                atol=1e-7,
            )
    # Evaluation mode: the running statistics, not the batch's.
    x = _batches()[0][1]
    running_mean, running_var = np.array([4.0, -1.0, 0.5, 90.0]), np.array([8.0, 0.5, 2.0, 300.0])
    gamma, beta = np.array([1.5, -0.5, 2.0, 0.1]), np.array([0.0, 1.0, -1.0, 3.0])
    y = numpy_bn.batch_norm_inference(x, running_mean, running_var, gamma, beta, 1e-5)
    result = np.asarray(undo_batch_norm_solution(y, gamma, beta, running_mean, running_var, 1e-5))
    assert_close(
        result,
        x,
        "undo_batch_norm with running statistics (evaluation mode): use the "
        "mean and var you are given, not statistics of y",
        rtol=1e-7,
        atol=1e-7,
    )
