"""Tests of bncourse.adaptation: AdaBN and Tent."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from bncourse import torch_bn
from bncourse.adaptation import adapt_batch_norm, configure_tent, entropy, tent
from bncourse.inference import recompute_population_statistics

IMPLS = {"torch": nn, "bncourse": torch_bn}


def _model(impl: str) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 8, bias=False),
        IMPLS[impl].BatchNorm1d(8),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(8, 3),
    )
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(32, 5))
    return model.eval()


@pytest.mark.parametrize("impl", IMPLS)
def test_adapt_batch_norm_is_the_recomputed_statistics(impl):
    model = _model(impl)
    batches = list((torch.randn(60, 5) * 2.0 + 1.0).split(20))
    expected = copy.deepcopy(model)
    recompute_population_statistics(expected, batches)
    adapted = adapt_batch_norm(model, batches, inplace=False)
    assert adapted is not model
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(adapted.state_dict()[name], value)
    assert not torch.equal(model[1].running_mean, adapted[1].running_mean)  # original kept
    assert not adapted.training and not adapted[1].training  # modes restored
    assert adapt_batch_norm(model, batches) is model  # in place


@pytest.mark.parametrize("impl", IMPLS)
def test_adabn_undoes_an_affine_shift_of_the_input_before_the_first_batch_norm(impl):
    model = _model(impl)
    clean = torch.randn(400, 5)
    recompute_population_statistics(model, [clean])
    scale = torch.tensor([2.0, 0.5, 1.0, 3.0, 0.7])
    shifted = clean * 0.5 * scale.mean() + 1.5  # the same affine map for every feature
    assert not torch.allclose(model(shifted), model(clean), atol=1e-2)
    adapted = adapt_batch_norm(model, [shifted], inplace=False)
    torch.testing.assert_close(adapted(shifted), model(clean), rtol=1e-4, atol=1e-4)


def test_entropy():
    assert math.isclose(float(entropy(torch.zeros(4, 5))), math.log(5), rel_tol=1e-6)
    assert float(entropy(torch.tensor([[100.0, 0.0, 0.0]]))) < 1e-6
    logits = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    p = logits.softmax(1)
    torch.testing.assert_close(entropy(logits), -(p * p.log()).sum(1).mean())


@pytest.mark.parametrize("impl", IMPLS)
def test_configure_tent(impl):
    model = _model(impl)
    adapted, parameters = configure_tent(model)
    assert all(
        p is q for p, q in zip(parameters, [adapted[1].weight, adapted[1].bias], strict=True)
    )
    trainable = [name for name, p in adapted.named_parameters() if p.requires_grad]
    assert trainable == ["1.weight", "1.bias"]
    assert adapted[1].training and not adapted[3].training and adapted[1].running_mean is None
    assert model[1].running_mean is not None and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("impl", IMPLS)
def test_tent_predicts_with_batch_statistics_then_lowers_the_entropy(impl):
    model = _model(impl)
    x = torch.randn(40, 5) * 3.0 + 2.0
    still = tent(model, [x], lr=0.0)
    reference = copy.deepcopy(model)
    reference[1].train()
    with torch.no_grad():
        torch.testing.assert_close(still.logits, reference(x), rtol=1e-5, atol=1e-5)
    result = tent(model, [x] * 20, lr=0.05)
    assert result.entropies[-1] < result.entropies[0] - 0.05
    for name, value in model.state_dict().items():  # model untouched
        assert torch.equal(value, _model(impl).state_dict()[name])
    changed = [
        name
        for name, p in result.model.named_parameters()
        if not torch.equal(p, dict(model.named_parameters())[name])
    ]
    assert changed == ["1.weight", "1.bias"]
    assert result.logits.shape == (800, 3)


def test_tent_errors():
    model = _model("torch")
    with pytest.raises(ValueError, match="empty"):
        tent(model, [])
    with pytest.raises(ValueError, match="optimizer"):
        tent(model, [torch.randn(4, 5)], optimizer="rmsprop")
    with pytest.raises(ValueError, match="no batch-norm"):
        configure_tent(nn.Linear(2, 2))


def test_tent_takes_tuples_and_arrays():
    model = _model("bncourse")
    x = torch.randn(12, 5)
    expected = tent(model, [x], lr=0.0).logits
    torch.testing.assert_close(tent(model, [(x, torch.zeros(12))], lr=0.0).logits, expected)
    torch.testing.assert_close(tent(model, [x.numpy()], lr=0.0).logits, expected)
