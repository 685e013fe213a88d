"""The chapter-8 exercise checks accept the reference solutions and reject wrong answers."""

from __future__ import annotations

import numpy as np
import pytest

from bncourse.exercises import ExerciseFailed, NotImplementedYet
from bncourse.exercises.ch8 import check_merge_statistics, check_sync_backward


def merge_statistics(counts, means, m2s):
    count = counts.sum()
    mean = (counts[:, None] * means).sum(0) / count
    m2 = m2s.sum(0) + (counts[:, None] * (means - mean) ** 2).sum(0)
    return count, mean, m2


def sync_backward(dy, x_hat, invstd, gamma, sum_dy, sum_dy_xhat, count):
    return gamma * invstd * (dy - sum_dy / count - x_hat * sum_dy_xhat / count)


def stub(*args, **kwargs):
    raise NotImplementedError


def test_reference_solutions_pass(capsys):
    assert check_merge_statistics(merge_statistics)
    assert check_sync_backward(sync_backward)
    assert capsys.readouterr().out.count("all checks passed") == 2


@pytest.mark.parametrize("check", [check_merge_statistics, check_sync_backward])
def test_stubs_are_not_implemented_yet(check):
    with pytest.raises(NotImplementedYet, match="not implemented yet"):
        check(stub)


def test_merge_statistics_wrong_answers():
    def sums_of_m2_only(counts, means, m2s):  # forgets the spread of the means
        count, mean, _ = merge_statistics(counts, means, m2s)
        return count, mean, m2s.sum(0)

    def unweighted_mean(counts, means, m2s):  # averages the means as if the sizes were equal
        count, _, m2 = merge_statistics(counts, means, m2s)
        return count, means.mean(0), m2

    def raw_moments(counts, means, m2s):  # E[x^2] - E[x]^2 in float32: cancels at a large mean
        count = counts.sum()
        sq = ((m2s + counts[:, None] * means**2).sum(0)).astype(np.float32)
        mean = ((counts[:, None] * means).sum(0) / count).astype(np.float32)
        return count, mean, sq - count * mean.astype(np.float32) ** 2

    for wrong, where in [
        (sums_of_m2_only, "centred sum of squares"),
        (unweighted_mean, "mean"),
        (raw_moments, "values around"),
    ]:
        with pytest.raises(ExerciseFailed, match=where):
            check_merge_statistics(wrong)


def test_sync_backward_wrong_answers():
    def local_sums(dy, x_hat, invstd, gamma, sum_dy, sum_dy_xhat, count):  # ignores the others
        n = len(dy)
        return gamma * invstd * (dy - dy.sum(0) / n - x_hat * (dy * x_hat).sum(0) / n)

    def no_gamma(dy, x_hat, invstd, gamma, sum_dy, sum_dy_xhat, count):
        return sync_backward(dy, x_hat, invstd, np.ones_like(gamma), sum_dy, sum_dy_xhat, count)

    for wrong in (local_sums, no_gamma):
        with pytest.raises(ExerciseFailed, match="input gradient of device"):
            check_sync_backward(wrong)
