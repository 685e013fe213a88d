"""The checks of chapter 1's coding exercises accept the reference solutions, reject wrong ones."""

from __future__ import annotations

import numpy as np
import pytest

from bncourse.exercises import ExerciseFailed, NotImplementedYet
from bncourse.exercises.ch1 import (
    check_batch_statistics,
    check_spread_of_batch_means,
    check_standardize_with_training_statistics,
    reference_spread_of_batch_means,
    reference_standardize_with_training_statistics,
)

# ----------------------------------------------------------------------- reference solutions


def batch_statistics(x):
    return x.mean(axis=0), x.var(axis=0)


def standardize_with_training_statistics(x_train, x_new):
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.where(std < 1e-6, 1.0, std)
    return (x_new - mean) / std


def spread_of_batch_means(x, batch_size):
    num_batches = len(x) // batch_size
    batches = x[: num_batches * batch_size].reshape(num_batches, batch_size, -1)
    return batches.mean(axis=1).std(axis=0)


def stub(*args, **kwargs):
    raise NotImplementedError


CHECKS = [
    (check_batch_statistics, batch_statistics),
    (check_standardize_with_training_statistics, standardize_with_training_statistics),
    (check_spread_of_batch_means, spread_of_batch_means),
]


@pytest.mark.parametrize("check, solution", CHECKS, ids=lambda f: f.__name__)
def test_reference_solutions_pass(check, solution, capsys):
    assert check(solution) is True
    assert "all checks passed" in capsys.readouterr().out


@pytest.mark.parametrize("check", [c for c, _ in CHECKS], ids=lambda f: f.__name__)
def test_stub_is_not_implemented_yet(check):
    with pytest.raises(NotImplementedYet, match="not implemented yet"):
        check(stub)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.parametrize(
    "check, wrong, message",
    [
        (check_batch_statistics, lambda x: (x.mean(axis=0), x.var(axis=0, ddof=1)), "biased"),
        (check_batch_statistics, lambda x: (x.mean(axis=1), x.var(axis=1)), "shape"),
        (check_batch_statistics, lambda x: (x.mean(axis=0), x.std(axis=0)), "variance"),
        (check_batch_statistics, lambda x: [x.mean(axis=0), x.var(axis=0)], "tuple"),
        (
            check_standardize_with_training_statistics,
            lambda x_train, x_new: (x_new - x_new.mean(0)) / x_new.std(0),
            "their own",
        ),
        (
            check_standardize_with_training_statistics,
            lambda x_train, x_new: (x_new - x_train.mean(0)) / x_train.std(0),
            "constant",
        ),
        (
            check_standardize_with_training_statistics,
            lambda x_train, x_new: (x_new - x_train.mean(0)) / (x_train.std(0) + 1.0),
            "differs",
        ),
        (
            check_spread_of_batch_means,
            lambda x, m: np.array([x[s : s + m].mean(axis=0) for s in range(0, len(x), m)]).std(
                axis=0
            ),
            "incomplete",
        ),
        (
            check_spread_of_batch_means,
            lambda x, m: spread_of_batch_means(x, m) / np.sqrt(m),
            "differs",
        ),
    ],
)
def test_wrong_answers_fail_with_a_helpful_message(check, wrong, message):
    with pytest.raises(ExerciseFailed, match=message):
        check(wrong)


def test_references_on_known_values():
    x = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0], [6.0, 1.0]])
    np.testing.assert_allclose(reference_spread_of_batch_means(x, 2), [2.0, 0.0])
    np.testing.assert_allclose(reference_spread_of_batch_means(x, 4), [0.0, 0.0])
    standardized = reference_standardize_with_training_statistics(x, np.array([[3.0, 2.0]]))
    np.testing.assert_allclose(standardized, [[0.0, 1.0]])
