"""The checks of chapter 3's coding exercises accept the reference and refuse wrong answers."""

from __future__ import annotations

import numpy as np
import pytest

from bncourse.exercises import ExerciseFailed, NotImplementedYet
from bncourse.exercises.ch3 import check_identity_parameters, check_undo_batch_norm
from bncourse.experiments import ch3


def _axes(x):
    return (0,) + tuple(range(2, x.ndim))


def reference_identity_parameters(x, eps=1e-5):
    """Written from the math, independently of the package."""
    axes = _axes(x)
    return np.sqrt(x.var(axis=axes) + eps), x.mean(axis=axes)


def reference_undo_batch_norm(y, gamma, beta, mean, var, eps=1e-5):
    shape = (1, -1) + (1,) * (y.ndim - 2)
    x_hat = (y - beta.reshape(shape)) / gamma.reshape(shape)
    return x_hat * np.sqrt(var.reshape(shape) + eps) + mean.reshape(shape)


def stub(*args, **kwargs):
    raise NotImplementedError()


def test_reference_solutions_pass(capsys):
    assert check_identity_parameters(reference_identity_parameters)
    assert check_undo_batch_norm(reference_undo_batch_norm)
    out = capsys.readouterr().out
    assert "Exercise 3.1: all checks passed" in out and "Exercise 3.2: all checks passed" in out


def test_package_functions_pass():
    assert check_identity_parameters(ch3.identity_parameters)
    assert check_undo_batch_norm(ch3.undo_batch_norm)


@pytest.mark.parametrize("check", [check_identity_parameters, check_undo_batch_norm])
def test_stub_is_not_implemented_yet(check):
    with pytest.raises(NotImplementedYet, match="not implemented yet"):
        check(stub)


def test_forgotten_eps_is_named():
    def without_eps(x, eps=1e-5):
        return np.sqrt(x.var(axis=_axes(x))), x.mean(axis=_axes(x))

    with pytest.raises(ExerciseFailed, match="sqrt\\(var \\+ eps\\)"):
        check_identity_parameters(without_eps)


def test_statistics_over_batch_only_are_refused_for_images():
    def batch_axis_only(x, eps=1e-5):
        return np.sqrt(x.var(axis=0) + eps), x.mean(axis=0)

    with pytest.raises(ExerciseFailed, match="one value per channel"):
        check_identity_parameters(batch_axis_only)


def test_not_returning_a_pair_is_refused():
    with pytest.raises(ExerciseFailed, match="pair"):
        check_identity_parameters(lambda x, eps=1e-5: np.sqrt(x.var(axis=0) + eps))


def test_wrong_inverse_is_refused():
    def forgot_eps(y, gamma, beta, mean, var, eps=1e-5):
        return reference_undo_batch_norm(y, gamma, beta, mean, var, eps=0.0)

    with pytest.raises(ExerciseFailed, match="undo_batch_norm"):
        check_undo_batch_norm(forgot_eps)


def test_inverse_from_statistics_of_y_is_refused():
    def uses_own_statistics(y, gamma, beta, mean, var, eps=1e-5):
        axes = _axes(y)
        return reference_undo_batch_norm(y, gamma, beta, y.mean(axis=axes), y.var(axis=axes), eps)

    with pytest.raises(ExerciseFailed):
        check_undo_batch_norm(uses_own_statistics)


def test_flattened_result_is_refused():
    def flattened(y, gamma, beta, mean, var, eps=1e-5):
        return reference_undo_batch_norm(y, gamma, beta, mean, var, eps).reshape(len(y), -1)

    with pytest.raises(ExerciseFailed, match="shape"):
        check_undo_batch_norm(flattened)


def test_inverse_that_ignores_the_sign_of_gamma_is_refused():
    def abs_gamma(y, gamma, beta, mean, var, eps=1e-5):
        return reference_undo_batch_norm(y, np.abs(gamma), beta, mean, var, eps)

    with pytest.raises(ExerciseFailed, match="negative"):
        check_undo_batch_norm(abs_gamma)
