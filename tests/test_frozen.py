"""Tests of bncourse.frozen: frozen batch norm, freezing and unfreezing models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bncourse import torch_bn
from bncourse.data import load_digits
from bncourse.frozen import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    freeze_batch_norm,
    is_frozen_batch_norm,
    unfreeze_batch_norm,
)
from bncourse.models import make_mlp
from bncourse.training import train

pytestmark = pytest.mark.usefixtures("fast_kernels_on_small_inputs")

SHAPES = {1: (6, 3), 2: (4, 3, 5, 5), 3: (2, 3, 2, 3, 4)}
FROZEN = {1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d}
IMPLS = {"torch": nn, "bncourse": torch_bn}


def _trained_bn(impl: str, dims: int, **kwargs) -> nn.Module:
    bn = getattr(IMPLS[impl], f"BatchNorm{dims}d")(3, **kwargs)
    generator = torch.Generator().manual_seed(dims)
    with torch.no_grad():
        if bn.affine:
            bn.weight.copy_(torch.rand(3, generator=generator) + 0.5)
            bn.bias.copy_(torch.randn(3, generator=generator))
        for _ in range(3):
            bn(torch.randn(SHAPES[dims], generator=generator) * 2.0 + 1.0)
    return bn


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_frozen_matches_batch_norm_in_eval_mode_in_both_modes(impl, dims):
    bn = _trained_bn(impl, dims)
    frozen = FROZEN[dims].from_batch_norm(bn)
    x = torch.randn(SHAPES[dims]) * 3.0
    expected = bn.eval()(x)
    before = copy.deepcopy(frozen.state_dict())
    for training in (True, False):
        frozen.train(training)
        torch.testing.assert_close(frozen(x), expected, rtol=1e-6, atol=1e-6)
    for name, value in frozen.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed in a forward pass"


def test_scale_and_shift_are_the_folded_map():
    bn = _trained_bn("torch", 1, eps=1e-3)
    scale, shift = FrozenBatchNorm1d.from_batch_norm(bn).scale_and_shift()
    expected_scale = bn.weight / torch.sqrt(bn.running_var + 1e-3)
    torch.testing.assert_close(scale, expected_scale)
    torch.testing.assert_close(shift, bn.bias - bn.running_mean * expected_scale)


@pytest.mark.parametrize("impl", IMPLS)
def test_loads_a_batch_norm_state_dict(impl):
    bn = _trained_bn(impl, 2)
    frozen = FrozenBatchNorm2d(3)
    frozen.load_state_dict(bn.state_dict())  # strict: num_batches_tracked is accepted
    assert frozen.num_batches_tracked == 3
    x = torch.randn(SHAPES[2])
    torch.testing.assert_close(frozen(x), bn.eval()(x), rtol=1e-6, atol=1e-6)
    assert "num_batches_tracked" not in frozen.state_dict()


def test_loads_a_state_dict_without_affine_parameters():
    bn = _trained_bn("torch", 1, affine=False)
    frozen = FrozenBatchNorm1d(3)
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(SHAPES[1])
    torch.testing.assert_close(frozen(x), bn.eval()(x), rtol=1e-6, atol=1e-6)


def test_requires_grad_false_does_not_stop_running_statistics():
    """The motivation: parameters frozen, buffers still move in training mode."""
    bn = nn.BatchNorm1d(3).requires_grad_(False)
    bn(torch.randn(8, 3) + 5.0)
    assert bn.running_mean.min() > 0.3


@pytest.mark.parametrize("impl", ["torch", "bncourse"])
@pytest.mark.parametrize("inplace", [True, False])
def test_freeze_model_keeps_its_function_and_statistics_under_training(impl, inplace):
    data = load_digits(seed=0)
    model = make_mlp(64, 10, depth=2, width=16, activation="relu", norm="bn", bn_impl=impl, seed=0)
    train(model, data, steps=20, batch_size=30, eval_every=0, device="cpu")
    x = torch.as_tensor(data.x_test[:50])
    expected = model.eval()(x).detach()
    converted = freeze_batch_norm(model, inplace=inplace)
    assert (converted is model) == inplace
    frozen_layers = [m for m in converted.modules() if is_frozen_batch_norm(m)]
    assert len(frozen_layers) == 2
    if not inplace:
        assert not any(is_frozen_batch_norm(m) for m in model.modules())
    torch.testing.assert_close(converted.train()(x), expected, rtol=1e-5, atol=1e-5)
    statistics = [layer.running_var.clone() for layer in frozen_layers]
    train(converted, data, steps=5, batch_size=30, eval_every=0, device="cpu")
    for layer, before in zip(frozen_layers, statistics, strict=True):
        assert torch.equal(layer.running_var, before)


def test_affine_trainable_makes_gamma_and_beta_parameters():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    fixed = freeze_batch_norm(model, inplace=False)
    trainable = freeze_batch_norm(model, affine_trainable=True, inplace=False)
    assert [name for name, _ in fixed.named_parameters()] == ["0.weight", "0.bias"]
    names = [name for name, _ in trainable.named_parameters()]
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias"]
    trainable(torch.randn(5, 4)).sum().backward()
    assert trainable[1].weight.grad is not None


def test_freezing_a_batch_norm_itself_returns_the_frozen_layer():
    frozen = freeze_batch_norm(nn.BatchNorm2d(3))
    assert isinstance(frozen, FrozenBatchNorm2d)


@pytest.mark.parametrize("impl", IMPLS)
def test_unfreeze_restores_class_state_and_counter(impl):
    bn = _trained_bn(impl, 2, momentum=0.3)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), bn)
    state = copy.deepcopy(model.state_dict())
    restored = unfreeze_batch_norm(freeze_batch_norm(model, inplace=False))
    assert type(restored[1]) is type(bn)
    assert restored[1].momentum == 0.3
    for name, value in restored.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert isinstance(restored[1].weight, nn.Parameter)


def test_unfreeze_into_a_given_class():
    model = freeze_batch_norm(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)))
    restored = unfreeze_batch_norm(model, batch_norm_class=torch_bn.BatchNorm1d)
    assert isinstance(restored[1], torch_bn.BatchNorm1d)


def test_half_input_with_float32_statistics():
    bn = _trained_bn("torch", 1)
    frozen = FrozenBatchNorm1d.from_batch_norm(bn)
    x = torch.randn(SHAPES[1])
    output = frozen(x.half())
    assert output.dtype == torch.float16
    torch.testing.assert_close(output.float(), bn.eval()(x.half().float()), rtol=2e-3, atol=2e-3)


def test_errors():
    with pytest.raises(ValueError, match="expected 4D input"):
        FrozenBatchNorm2d(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="channels"):
        FrozenBatchNorm1d(3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="track_running_stats"):
        freeze_batch_norm(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)))
    with pytest.raises(TypeError, match="batch-norm"):
        FrozenBatchNorm1d.from_batch_norm(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="num_features"):
        FrozenBatchNorm1d(0)
