"""Checks for the coding exercises of chapter 4 (batch norm at inference).

* :func:`check_bn_inference` (ex-4-2): the inference transform in NumPy.
* :func:`check_fold_linear` (ex-4-3): folding an inference batch norm into a linear layer.
* :func:`check_running_average` (ex-4-4): running averages in PyTorch's and Keras' momentum
  conventions and PyTorch's cumulative ``momentum=None``.
"""

from __future__ import annotations

import numpy as np
import torch

from bncourse.exercises._common import assert_close, exercise_check
from bncourse.numpy_bn import batch_norm_inference

__all__ = ["check_bn_inference", "check_fold_linear", "check_running_average"]


def _statistics(rng: np.random.Generator, channels: int):
    """Running mean, running variance, gamma and beta of one layer, shape (channels,) each."""
    return (
        rng.normal(0.0, 3.0, channels),
        rng.uniform(0.01, 5.0, channels),
        rng.normal(1.0, 0.5, channels),
        rng.normal(0.0, 1.0, channels),
    )


@exercise_check("ex-4-2")
def check_bn_inference(bn_inference):
    """``bn_inference(x, running_mean, running_var, gamma, beta, eps)`` matches the reference."""
    rng = np.random.default_rng(42)
    cases = [((16, 5), 1e-5), ((1, 3), 1e-5), ((4, 3, 5, 5), 1e-3), ((2, 4, 3), 0.5)]
    for shape, eps in cases:
        x = rng.normal(2.0, 4.0, shape)
        mean, var, gamma, beta = _statistics(rng, shape[1])
        expected = batch_norm_inference(x, mean, var, gamma, beta, eps)
        actual = bn_inference(x, mean, var, gamma, beta, eps)
        assert actual is not None, "bn_inference returned None; return the normalised array"
        assert_close(actual, expected, f"bn_inference on input of shape {shape} with eps={eps}")
    # one example must give the same output alone as inside a batch
    x = rng.normal(size=(8, 3))
    mean, var, gamma, beta = _statistics(rng, 3)
    alone = bn_inference(x[:1], mean, var, gamma, beta, 1e-5)
    assert_close(
        alone,
        bn_inference(x, mean, var, gamma, beta, 1e-5)[:1],
        "the output for one example alone (it must not depend on the rest of the batch)",
    )


def _reference_fold(weight, bias, mean, var, gamma, beta, eps):
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None).double()
    bn = torch.nn.BatchNorm1d(weight.shape[0], eps=eps).double().eval()
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weight))
        if bias is not None:
            linear.bias.copy_(torch.from_numpy(bias))
        bn.running_mean.copy_(torch.from_numpy(mean))
        bn.running_var.copy_(torch.from_numpy(var))
        bn.weight.copy_(torch.from_numpy(gamma))
        bn.bias.copy_(torch.from_numpy(beta))
    return linear, bn


@exercise_check("ex-4-3")
def check_fold_linear(fold_linear):
    """``fold_linear`` returns the weight and bias of linear-then-BN as one linear layer."""
    rng = np.random.default_rng(7)
    for out_features, in_features, has_bias, eps in [
        (5, 3, True, 1e-5),
        (4, 6, False, 1e-3),
        (1, 2, True, 0.1),
    ]:
        weight = rng.normal(size=(out_features, in_features))
        bias = rng.normal(size=out_features) if has_bias else None
        mean, var, gamma, beta = _statistics(rng, out_features)
        result = fold_linear(
            weight, None if bias is None else bias.copy(), mean, var, gamma, beta, eps
        )
        assert isinstance(result, tuple) and len(result) == 2, (
            "fold_linear must return a tuple (folded_weight, folded_bias)"
        )
        folded_weight, folded_bias = (np.asarray(r, dtype=float) for r in result)
        what = f"for a {out_features}x{in_features} layer{'' if has_bias else ' without bias'}"
        assert folded_weight.shape == weight.shape, (
            f"folded_weight has shape {folded_weight.shape}, expected {weight.shape} {what}"
        )
        linear, bn = _reference_fold(weight, bias, mean, var, gamma, beta, eps)
        x = rng.normal(size=(7, in_features))
        with torch.no_grad():
            expected = bn(linear(torch.from_numpy(x))).numpy()
        assert_close(
            x @ folded_weight.T + folded_bias, expected, f"the folded layer's output {what}"
        )


def _reference_running_average(values, momentum, convention, initial):
    running = np.asarray(initial, dtype=float)
    for t, value in enumerate(values, start=1):
        if momentum is None:
            weight = 1.0 / t
        else:
            weight = momentum if convention == "pytorch" else 1.0 - momentum
        running = (1.0 - weight) * running + weight * np.asarray(value, dtype=float)
    return running


@exercise_check("ex-4-4")
def check_running_average(running_average):
    """``running_average(values, momentum, convention, initial)`` in every convention."""
    rng = np.random.default_rng(3)
    scalars = list(rng.normal(5.0, 2.0, 30))
    vectors = [rng.normal(size=3) for _ in range(12)]
    cases = [
        (scalars, 0.1, "pytorch", 0.0),
        (scalars, 0.99, "keras", 0.0),
        (scalars, 0.9, "keras", 1.0),
        (scalars, 0.9, "pytorch", 1.0),
        (scalars, None, "pytorch", 1.0),
        (scalars[:1], None, "keras", 7.0),
        (vectors, 0.01, "pytorch", np.ones(3)),
        (vectors, None, "pytorch", np.zeros(3)),
    ]
    for values, momentum, convention, initial in cases:
        expected = _reference_running_average(values, momentum, convention, initial)
        actual = running_average(list(values), momentum, convention, initial)
        assert actual is not None, "running_average returned None; return the running value"
        kind = "scalars" if np.ndim(values[0]) == 0 else "vectors"
        assert_close(
            actual,
            expected,
            f"running_average of {len(values)} {kind} with "
            f"momentum={momentum}, convention={convention!r}, initial={initial}",
        )
