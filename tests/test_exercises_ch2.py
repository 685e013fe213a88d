"""The checks of chapter 2's coding exercises accept the reference and refuse wrong answers."""

from __future__ import annotations

import numpy as np
import pytest

from bncourse import numpy_bn
from bncourse.exercises import ExerciseFailed, NotImplementedYet
from bncourse.exercises.ch2 import check_backward, check_forward


def reference_forward(x, gamma, beta, eps=1e-5):
    mean = x.mean(axis=0)
    var = ((x - mean) ** 2).mean(axis=0)
    return gamma * (x - mean) / np.sqrt(var + eps) + beta


def reference_backward(dy, x, gamma, eps=1e-5):
    mean = x.mean(axis=0)
    inv_std = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=0) + eps)
    x_hat = (x - mean) * inv_std
    dbeta = dy.sum(axis=0)
    dgamma = (dy * x_hat).sum(axis=0)
    dx = gamma * inv_std * (dy - dy.mean(axis=0) - x_hat * (dy * x_hat).mean(axis=0))
    return dx, dgamma, dbeta


def stub(*args, **kwargs):
    raise NotImplementedError()


def test_reference_solutions_pass(capsys):
    assert check_forward(reference_forward)
    assert check_backward(reference_backward)
    assert "Exercise 2.1: all checks passed" in capsys.readouterr().out


def test_package_functions_pass():
    assert check_forward(lambda x, g, b, eps: numpy_bn.batch_norm_forward(x, g, b, eps)[0])

    def backward(dy, x, gamma, eps):
        return numpy_bn.batch_norm_backward(dy, numpy_bn.batch_norm_forward(x, gamma, None, eps)[1])

    assert check_backward(backward)


@pytest.mark.parametrize("check", [check_forward, check_backward])
def test_stub_is_not_implemented_yet(check):
    with pytest.raises(NotImplementedYet, match="not implemented yet"):
        check(stub)


def test_unbiased_variance_is_named():
    def unbiased(x, gamma, beta, eps=1e-5):
        return gamma * (x - x.mean(axis=0)) / np.sqrt(x.var(axis=0, ddof=1) + eps) + beta

    with pytest.raises(ExerciseFailed, match="unbiased variance"):
        check_forward(unbiased)


def test_missing_gamma_is_named():
    with pytest.raises(ExerciseFailed, match="gamma and beta"):
        check_forward(lambda x, gamma, beta, eps: reference_forward(x, 1.0, 0.0, eps))


def test_forward_returning_none_fails():
    with pytest.raises(ExerciseFailed, match="returned None"):
        check_forward(lambda x, gamma, beta, eps: None)


def test_constant_statistics_backward_is_named():
    def naive(dy, x, gamma, eps=1e-5):
        dx, dgamma, dbeta = reference_backward(dy, x, gamma, eps)
        inv_std = 1.0 / np.sqrt(x.var(axis=0) + eps)
        return gamma * inv_std * dy, dgamma, dbeta

    with pytest.raises(ExerciseFailed, match="constants"):
        check_backward(naive)


def test_missing_projection_term_is_named():
    def partial(dy, x, gamma, eps=1e-5):
        dx, dgamma, dbeta = reference_backward(dy, x, gamma, eps)
        inv_std = 1.0 / np.sqrt(x.var(axis=0) + eps)
        return gamma * inv_std * (dy - dy.mean(axis=0)), dgamma, dbeta

    with pytest.raises(ExerciseFailed, match="x_hat"):
        check_backward(partial)


def test_wrong_dgamma_fails():
    def wrong(dy, x, gamma, eps=1e-5):
        dx, dgamma, dbeta = reference_backward(dy, x, gamma, eps)
        return dx, dgamma + 0.1, dbeta

    with pytest.raises(ExerciseFailed, match="dgamma"):
        check_backward(wrong)


def test_backward_must_return_three_arrays():
    with pytest.raises(ExerciseFailed, match="tuple"):
        check_backward(lambda dy, x, gamma, eps: reference_backward(dy, x, gamma, eps)[0])
