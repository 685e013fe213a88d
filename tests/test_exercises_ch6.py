"""The chapter-6 exercise checks accept the reference solutions and reject wrong answers."""

from __future__ import annotations

import numpy as np
import pytest

from bncourse.exercises import ExerciseFailed, NotImplementedYet
from bncourse.exercises.ch6 import check_bn_jacobian, check_effective_learning_rate


def bn_jacobian(x, gamma=1.0, eps=1e-5):
    m = x.shape[0]
    sigma = np.sqrt(x.var() + eps)
    x_hat = (x - x.mean()) / sigma
    return gamma / sigma * (np.eye(m) - 1.0 / m - np.outer(x_hat, x_hat) / m)


def effective_lr_and_angles(trajectory, lr):
    w = trajectory.reshape(len(trajectory), -1)
    norms = np.linalg.norm(w, axis=1)
    cosines = np.sum(w[:-1] * w[1:], axis=1) / (norms[:-1] * norms[1:])
    return lr / norms**2, np.arccos(np.clip(cosines, -1.0, 1.0))


def stub(*args, **kwargs):
    raise NotImplementedError


def test_reference_solutions_pass(capsys):
    assert check_bn_jacobian(bn_jacobian)
    assert check_effective_learning_rate(effective_lr_and_angles)
    out = capsys.readouterr().out
    assert "6.2: all checks passed" in out and "6.4: all checks passed" in out


@pytest.mark.parametrize("check", [check_bn_jacobian, check_effective_learning_rate])
def test_stubs_are_not_implemented_yet(check):
    with pytest.raises(NotImplementedYet, match="not implemented yet"):
        check(stub)


@pytest.mark.parametrize(
    "wrong",
    [
        # forgets the x_hat term (only centres)
        lambda x, gamma=1.0, eps=1e-5: (
            gamma / np.sqrt(x.var() + eps) * (np.eye(len(x)) - 1.0 / len(x))
        ),
        # eps outside the square root
        lambda x, gamma=1.0, eps=1e-5: (
            bn_jacobian(x, gamma, 0.0) * np.sqrt(x.var()) / (np.sqrt(x.var()) + eps)
        ),
        # the unbiased variance
        lambda x, gamma=1.0, eps=1e-5: (
            bn_jacobian(x, gamma, eps) * np.sqrt((x.var() + eps) / (x.var(ddof=1) + eps))
        ),
        # transposed index convention would still pass (J is symmetric); forgetting gamma does not
        lambda x, gamma=1.0, eps=1e-5: bn_jacobian(x, 1.0, eps),
        lambda x, gamma=1.0, eps=1e-5: None,
    ],
)
def test_bn_jacobian_wrong_answers(wrong):
    with pytest.raises(ExerciseFailed, match="6.2"):
        check_bn_jacobian(wrong)


@pytest.mark.parametrize(
    "wrong",
    [
        # lr / ||w|| instead of lr / ||w||^2
        lambda t, lr: (
            lr / np.linalg.norm(t.reshape(len(t), -1), axis=1),
            effective_lr_and_angles(t, lr)[1],
        ),
        # angles in degrees
        lambda t, lr: (
            effective_lr_and_angles(t, lr)[0],
            np.degrees(effective_lr_and_angles(t, lr)[1]),
        ),
        # cosines instead of angles
        lambda t, lr: (
            effective_lr_and_angles(t, lr)[0],
            np.cos(effective_lr_and_angles(t, lr)[1]),
        ),
        # norm of the first row only
        lambda t, lr: (
            lr / np.linalg.norm(t.reshape(len(t), -1)[:, :2], axis=1) ** 2,
            effective_lr_and_angles(t, lr)[1],
        ),
        # returns a list, not a tuple of two
        lambda t, lr: list(effective_lr_and_angles(t, lr)) + [None],
    ],
)
def test_effective_learning_rate_wrong_answers(wrong):
    with pytest.raises(ExerciseFailed, match="6.4"):
        check_effective_learning_rate(wrong)
