"""Checks for the coding exercises of chapter 9 (batch norm in practice).

* :func:`check_entropy` (ex-9-2): Tent's loss, the mean entropy of the softmax predictions.
* :func:`check_cumulative_statistics` (ex-9-3): the population statistics AdaBN computes from
  batches (PyTorch's ``momentum=None``).
* :func:`check_batch_norm_eval` (ex-9-4): put only the batch norms of a model in evaluation
  mode.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bncourse import torch_bn
from bncourse.exercises._common import assert_close, exercise_check

__all__ = ["check_entropy", "check_cumulative_statistics", "check_batch_norm_eval"]


@exercise_check("ex-9-2")
def check_entropy(mean_entropy):
    """``mean_entropy(logits)`` is the mean entropy (nats) of the softmax of each row."""
    generator = torch.Generator().manual_seed(9)
    cases = [
        torch.zeros(3, 4),
        torch.randn(16, 10, generator=generator) * 3.0,
        torch.tensor([[100.0, 0.0, -100.0]]),  # nearly one-hot: a naive p * log p gives nan
        torch.randn(5, 2, generator=generator, dtype=torch.float64),
    ]
    for logits in cases:
        log_p = torch.log_softmax(logits, dim=1)
        expected = -(log_p.exp() * log_p).sum(dim=1).mean()
        actual = mean_entropy(logits.clone())
        assert actual is not None, "mean_entropy returned None; return a scalar tensor"
        assert torch.is_tensor(actual) and actual.dim() == 0, "return a scalar (0-d) tensor"
        assert_close(actual, expected, f"the mean entropy of logits of shape {tuple(logits.shape)}")
    logits = torch.randn(8, 5, generator=generator, requires_grad=True)
    result = mean_entropy(logits)
    assert result.requires_grad, "the entropy must be differentiable (Tent descends on it)"
    result.backward()
    assert logits.grad is not None, "the entropy must be differentiable (Tent descends on it)"


@exercise_check("ex-9-3")
def check_cumulative_statistics(cumulative_statistics):
    """``cumulative_statistics(batches)`` matches a BatchNorm1d with ``momentum=None``."""
    rng = np.random.default_rng(3)
    for sizes, channels in [((8, 8, 8), 3), ((5, 12, 7, 2), 4), ((30,), 2)]:
        batches = [rng.normal(2.0, 3.0, (m, channels)) for m in sizes]
        layer = nn.BatchNorm1d(channels, momentum=None).double()
        for batch in batches:
            layer(torch.from_numpy(batch))
        result = cumulative_statistics([b.copy() for b in batches])
        assert result is not None and len(result) == 2, "return (mean, variance)"
        mean, var = result
        what = f"batches of sizes {sizes}"
        assert_close(mean, layer.running_mean, f"the mean from {what}")
        assert_close(var, layer.running_var, f"the variance from {what} (unbiased per batch?)")


def _model(impl) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(4, 6),
        impl.BatchNorm1d(6),
        nn.Dropout(0.5),
        nn.ReLU(),
        nn.Sequential(nn.Linear(6, 3), torch_bn.BatchNorm1d(3)),
    )


@exercise_check("ex-9-4")
def check_batch_norm_eval(batch_norm_eval):
    """``batch_norm_eval(model)`` puts every batch norm (and nothing else) in evaluation mode."""
    for impl in (nn, torch_bn):
        model = _model(impl).train()
        count = batch_norm_eval(model)
        assert count == 2, f"expected 2 batch-norm layers to be switched, got {count!r}"
        bns = [model[1], model[4][1]]
        assert not any(bn.training for bn in bns), "a batch norm is still in training mode"
        assert model.training and model[2].training and model[4].training, (
            "only the batch norms should change mode: the model, dropout and the inner "
            "Sequential must stay in training mode"
        )
        before = [bn.running_mean.clone() for bn in bns]
        model(torch.randn(8, 4))
        for bn, mean in zip(bns, before, strict=True):
            assert torch.equal(bn.running_mean, mean), "a forward pass changed running_mean"
