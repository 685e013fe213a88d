"""The chapter-4 exercise checks accept the reference solutions and reject wrong answers."""

from __future__ import annotations

import numpy as np
import pytest

from bncourse.exercises import ExerciseFailed, NotImplementedYet
from bncourse.exercises.ch4 import check_bn_inference, check_fold_linear, check_running_average


def bn_inference(x, running_mean, running_var, gamma, beta, eps=1e-5):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    scale = gamma / np.sqrt(running_var + eps)
    shift = beta - running_mean * scale
    return x * scale.reshape(shape) + shift.reshape(shape)


def fold_linear(weight, bias, running_mean, running_var, gamma, beta, eps=1e-5):
    scale = gamma / np.sqrt(running_var + eps)
    if bias is None:
        bias = np.zeros_like(running_mean)
    return weight * scale[:, None], scale * (bias - running_mean) + beta


def running_average(batch_values, momentum, convention="pytorch", initial=0.0):
    running = initial
    for t, value in enumerate(batch_values, start=1):
        if momentum is None:
            weight = 1.0 / t
        elif convention == "pytorch":
            weight = momentum
        else:
            weight = 1.0 - momentum
        running = (1.0 - weight) * running + weight * np.asarray(value)
    return running


def stub(*args, **kwargs):
    raise NotImplementedError


def test_reference_solutions_pass(capsys):
    assert check_bn_inference(bn_inference)
    assert check_fold_linear(fold_linear)
    assert check_running_average(running_average)
    assert capsys.readouterr().out.count("all checks passed") == 3


@pytest.mark.parametrize("check", [check_bn_inference, check_fold_linear, check_running_average])
def test_stubs_are_not_implemented_yet(check):
    with pytest.raises(NotImplementedYet, match="not implemented yet"):
        check(stub)


def test_bn_inference_wrong_answers():
    def biased_eps(x, mean, var, gamma, beta, eps=1e-5):  # forgets eps
        return bn_inference(x, mean, var, gamma, beta, 0.0)

    def batch_statistics(x, mean, var, gamma, beta, eps=1e-5):  # uses the batch, not the running
        axes = (0,) + tuple(range(2, x.ndim))
        return bn_inference(x, x.mean(axis=axes), x.var(axis=axes), gamma, beta, eps)

    def std_not_var(x, mean, var, gamma, beta, eps=1e-5):  # divides by var, not sqrt(var)
        return bn_inference(x, mean, var**2, gamma, beta, eps)

    for wrong in (biased_eps, batch_statistics, std_not_var):
        with pytest.raises(ExerciseFailed, match="ex-4-2"):
            check_bn_inference(wrong)


def test_bn_inference_must_return():
    with pytest.raises(ExerciseFailed, match="returned None"):
        check_bn_inference(lambda *args: None)


def test_fold_linear_wrong_answers():
    def scales_columns(weight, bias, mean, var, gamma, beta, eps=1e-5):
        w, b = fold_linear(weight, bias, mean, var, gamma, beta, eps)
        scale = gamma / np.sqrt(var + eps)
        return (weight * scale[:, None] if weight.shape[0] != weight.shape[1] else w), b + 1.0

    def forgets_mean(weight, bias, mean, var, gamma, beta, eps=1e-5):
        return fold_linear(weight, bias, np.zeros_like(mean), var, gamma, beta, eps)

    def no_bias_crash(weight, bias, mean, var, gamma, beta, eps=1e-5):
        scale = gamma / np.sqrt(var + eps)
        return weight * scale[:, None], scale * (bias - mean) + beta  # fails for bias=None

    for wrong in (scales_columns, forgets_mean):
        with pytest.raises(ExerciseFailed, match="ex-4-3"):
            check_fold_linear(wrong)
    with pytest.raises(TypeError):
        check_fold_linear(no_bias_crash)
    with pytest.raises(ExerciseFailed, match="tuple"):
        check_fold_linear(lambda *args: np.zeros(3))


def test_running_average_wrong_answers():
    def keras_as_pytorch(values, momentum, convention="pytorch", initial=0.0):
        return running_average(values, momentum, "pytorch", initial)

    def none_as_zero(values, momentum, convention="pytorch", initial=0.0):
        return running_average(values, 0.0 if momentum is None else momentum, convention, initial)

    def ignores_initial(values, momentum, convention="pytorch", initial=0.0):
        return running_average(values, momentum, convention, 0.0)

    for wrong in (keras_as_pytorch, none_as_zero, ignores_initial):
        with pytest.raises(ExerciseFailed, match="ex-4-4"):
            check_running_average(wrong)
