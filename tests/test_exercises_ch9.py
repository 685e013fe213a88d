"""The chapter-9 exercise checks accept the reference solutions and reject wrong answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bncourse.exercises import ExerciseFailed, NotImplementedYet
from bncourse.exercises.ch9 import (
    check_batch_norm_eval,
    check_cumulative_statistics,
    check_entropy,
)


def mean_entropy(logits):
    log_p = torch.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


def cumulative_statistics(batches):
    means = [batch.mean(axis=0) for batch in batches]
    variances = [batch.var(axis=0, ddof=1) for batch in batches]
    return np.mean(means, axis=0), np.mean(variances, axis=0)


def batch_norm_eval(model):
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
            count += 1
    return count


def stub(*args, **kwargs):
    raise NotImplementedError


CHECKS = [check_entropy, check_cumulative_statistics, check_batch_norm_eval]


def test_reference_solutions_pass(capsys):
    assert check_entropy(mean_entropy)
    assert check_cumulative_statistics(cumulative_statistics)
    assert check_batch_norm_eval(batch_norm_eval)
    out = capsys.readouterr().out
    assert out.count("all checks passed") == 3 and "Exercise 9.3" in out


@pytest.mark.parametrize("check", CHECKS)
def test_stubs_are_not_implemented_yet(check):
    with pytest.raises(NotImplementedYet, match="not implemented yet"):
        check(stub)


@pytest.mark.parametrize(
    "wrong",
    [
        lambda logits: -(logits.softmax(1) * logits.softmax(1).log()).sum(1).mean(),  # nan
        lambda logits: -(logits.softmax(1) * logits.log_softmax(1)).sum(1).sum(),  # sum
        lambda logits: -(logits.softmax(1) * logits.log_softmax(1)).mean(),  # over K too
    ],
)
def test_entropy_wrong_answers(wrong):
    with pytest.raises(ExerciseFailed):
        check_entropy(wrong)


def test_entropy_must_be_differentiable():
    with pytest.raises(ExerciseFailed, match="differentiable"):
        check_entropy(lambda logits: mean_entropy(logits.detach()))


@pytest.mark.parametrize(
    "wrong",
    [
        lambda batches: (  # biased variances
            np.mean([b.mean(0) for b in batches], 0),
            np.mean([b.var(0) for b in batches], 0),
        ),
        lambda batches: (  # pooled over all examples: unequal batches weigh differently
            np.concatenate(batches).mean(0),
            np.concatenate(batches).var(0, ddof=1),
        ),
    ],
)
def test_cumulative_statistics_wrong_answers(wrong):
    with pytest.raises(ExerciseFailed):
        check_cumulative_statistics(wrong)


def test_batch_norm_eval_wrong_answers():
    def whole_model(model):
        model.eval()
        return 2

    def torch_only(model):
        layers = [m for m in model.modules() if type(m).__module__.startswith("torch.nn")]
        layers = [m for m in layers if isinstance(m, nn.BatchNorm1d)]
        for layer in layers:
            layer.eval()
        return len(layers)

    with pytest.raises(ExerciseFailed, match="training mode"):
        check_batch_norm_eval(whole_model)
    with pytest.raises(ExerciseFailed):
        check_batch_norm_eval(torch_only)
