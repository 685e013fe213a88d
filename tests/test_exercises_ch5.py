"""The chapter-5 exercise checks accept the reference solutions and reject wrong ones."""

from __future__ import annotations

import numpy as np
import pytest

from bncourse import numpy_bn
from bncourse.exercises import ExerciseFailed, NotImplementedYet
from bncourse.exercises.ch5 import (
    check_channel_statistics,
    check_fold_conv_bn,
    check_spatial_backward,
)


def channel_statistics(x, channels_last=False):
    axes = (0, 1, 2) if channels_last else (0, 2, 3)
    return x.mean(axis=axes), x.var(axis=axes)


def spatial_backward(dy, x, gamma, eps=1e-5):
    n, c, h, w = x.shape
    x_rows = x.transpose(0, 2, 3, 1).reshape(-1, c)
    dy_rows = dy.transpose(0, 2, 3, 1).reshape(-1, c)
    _, cache = numpy_bn.batch_norm_forward(x_rows, gamma, None, eps)
    dx_rows, dgamma, dbeta = numpy_bn.batch_norm_backward(dy_rows, cache)
    return dx_rows.reshape(n, h, w, c).transpose(0, 3, 1, 2), dgamma, dbeta


def fold_conv_bn(weight, bias, gamma, beta, running_mean, running_var, eps=1e-5):
    scale = gamma / np.sqrt(running_var + eps)
    bias = np.zeros_like(running_mean) if bias is None else bias
    return weight * scale.reshape(-1, 1, 1, 1), (bias - running_mean) * scale + beta


def stub(*args, **kwargs):
    raise NotImplementedError


def test_reference_solutions_pass(capsys):
    assert check_channel_statistics(channel_statistics)
    assert check_spatial_backward(spatial_backward)
    assert check_fold_conv_bn(fold_conv_bn)
    assert "Exercise 5.4: all checks passed" in capsys.readouterr().out


@pytest.mark.parametrize(
    "check", [check_channel_statistics, check_spatial_backward, check_fold_conv_bn]
)
def test_stub_is_not_implemented_yet(check):
    with pytest.raises(NotImplementedYet, match="not implemented yet"):
        check(stub)


def test_wrong_channel_statistics():
    def unbiased(x, channels_last=False):
        axes = (0, 1, 2) if channels_last else (0, 2, 3)
        return x.mean(axis=axes), x.var(axis=axes, ddof=1)

    def ignores_layout(x, channels_last=False):
        return x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))

    def per_location(x, channels_last=False):
        return x.mean(axis=0), x.var(axis=0)

    with pytest.raises(ExerciseFailed, match="biased"):
        check_channel_statistics(unbiased)
    with pytest.raises(ExerciseFailed, match="NHWC"):
        check_channel_statistics(ignores_layout)
    with pytest.raises(ExerciseFailed, match="shape"):
        check_channel_statistics(per_location)


def test_wrong_spatial_backward():
    def wrong_order(dy, x, gamma, eps=1e-5):
        # reshapes without moving the channel axis: rows mix channels
        n, c, h, w = x.shape
        _, cache = numpy_bn.batch_norm_forward(x.reshape(-1, c), gamma, None, eps)
        dx, dgamma, dbeta = numpy_bn.batch_norm_backward(dy.reshape(-1, c), cache)
        return dx.reshape(x.shape), dgamma, dbeta

    def per_location(dy, x, gamma, eps=1e-5):
        _, cache = numpy_bn.batch_norm_forward(x.reshape(len(x), -1), None, None, eps)
        dx, _, _ = numpy_bn.batch_norm_backward(dy.reshape(len(x), -1), cache)
        dgamma, dbeta = spatial_backward(dy, x, gamma, eps)[1:]
        return dx.reshape(x.shape) * gamma.reshape(1, -1, 1, 1), dgamma, dbeta

    for wrong in (wrong_order, per_location):
        with pytest.raises(ExerciseFailed, match="ex-5-3"):
            check_spatial_backward(wrong)


def test_wrong_fold():
    def forgets_mean(weight, bias, gamma, beta, running_mean, running_var, eps=1e-5):
        scale = gamma / np.sqrt(running_var + eps)
        bias = np.zeros_like(running_mean) if bias is None else bias
        return weight * scale.reshape(-1, 1, 1, 1), bias * scale + beta

    def forgets_eps(weight, bias, gamma, beta, running_mean, running_var, eps=1e-5):
        scale = gamma / np.sqrt(running_var)
        bias = np.zeros_like(running_mean) if bias is None else bias
        return weight * scale.reshape(-1, 1, 1, 1), (bias - running_mean) * scale + beta

    with pytest.raises(ExerciseFailed, match="folded bias"):
        check_fold_conv_bn(forgets_mean)
    with pytest.raises(ExerciseFailed, match="folded weight"):
        check_fold_conv_bn(forgets_eps)
