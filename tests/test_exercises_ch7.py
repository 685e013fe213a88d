"""The chapter 7 exercise checks accept the reference answers and reject wrong ones."""

from __future__ import annotations

import numpy as np
import pytest

from bncourse.exercises import NotImplementedYet
from bncourse.exercises.ch7 import (
    check_group_norm,
    check_rms_norm_backward,
    check_running_statistics,
)
from bncourse.numpy_norm import normalize_backward, normalize_forward


def group_norm(x, num_groups, gamma, beta, eps=1e-5):
    n, c = x.shape[:2]
    grouped = x.reshape(n, num_groups, -1)
    y, _ = normalize_forward(grouped, 2, eps=eps)
    shape = (1, c) + (1,) * (x.ndim - 2)
    return y.reshape(x.shape) * gamma.reshape(shape) + beta.reshape(shape)


def layer_norm_instead(x, num_groups, gamma, beta, eps=1e-5):
    return group_norm(x, 1, gamma, beta, eps)


def keeps_running_statistics(layer):
    return any(name.startswith("running_") for name, _ in layer.named_buffers())


def rms_norm_backward(dy, x, gamma, eps):
    _, cache = normalize_forward(x, -1, gamma, eps=eps, center=False)
    return normalize_backward(dy, cache)[0]


def ln_backward_instead(dy, x, gamma, eps):
    _, cache = normalize_forward(x, -1, gamma, eps=eps, center=True)
    return normalize_backward(dy, cache)[0]


def stub(*args):
    raise NotImplementedError


def test_reference_answers_pass(capsys):
    assert check_group_norm(group_norm)
    assert check_running_statistics(keeps_running_statistics)
    assert check_rms_norm_backward(rms_norm_backward)
    assert "Exercise" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("check", "wrong", "message"),
    [
        (check_group_norm, layer_norm_instead, "differs"),
        (check_running_statistics, lambda layer: True, "does not keep"),
        (check_running_statistics, lambda layer: hasattr(layer, "running_mean"), "does not"),
        (check_rms_norm_backward, ln_backward_instead, "differs"),
        (check_group_norm, lambda *a: None, "returned None"),
    ],
)
def test_wrong_answers_fail(check, wrong, message):
    with pytest.raises(AssertionError, match=message):
        check(wrong)


@pytest.mark.parametrize(
    "check", [check_group_norm, check_running_statistics, check_rms_norm_backward]
)
def test_stub_raises_not_implemented_yet(check):
    with pytest.raises(NotImplementedYet):
        check(stub)


def test_group_norm_reference_is_exact():
    x = np.random.default_rng(0).normal(size=(2, 4, 3))
    y = group_norm(x, 2, np.ones(4), np.zeros(4))
    np.testing.assert_allclose(y.reshape(2, 2, -1).mean(axis=2), 0, atol=1e-12)
