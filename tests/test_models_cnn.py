"""Tests of bncourse.models.make_cnn: structure, bias rule, BN choice, input shapes, seeding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bncourse import torch_bn
from bncourse.models import CNN, ConvBlock, make_cnn


@pytest.mark.parametrize("norm", [None, "bn"])
@pytest.mark.parametrize("bn_impl", ["bncourse", "torch"])
def test_structure_and_bias_rule(norm, bn_impl):
    model = make_cnn(norm=norm, bn_impl=bn_impl, seed=0)
    assert isinstance(model, CNN) and model.training
    assert [block.conv.out_channels for block in model.blocks] == [16, 32, 64]
    expected_bn = {"bncourse": torch_bn.BatchNorm2d, "torch": nn.BatchNorm2d}[bn_impl]
    for block in model.blocks:
        assert isinstance(block, ConvBlock)
        assert block.conv.kernel_size == (3, 3) and block.conv.padding == (1, 1)
        if norm is None:
            assert block.norm is None and block.conv.bias is not None
        else:
            assert type(block.norm) is expected_bn
            assert block.norm.num_features == block.conv.out_channels
            assert block.conv.bias is None  # BN cancels a bias before it
    assert model.output.in_features == 64 and model.output.out_features == 10


def test_explicit_bias_and_channels():
    model = make_cnn(channels=(4, 6), norm="bn", bias=True, bn_impl="torch", seed=0)
    assert all(block.conv.bias is not None for block in model.blocks)
    assert model.output.in_features == 6 * 2 * 2


@pytest.mark.parametrize("norm", [None, "bn"])
def test_flat_and_image_inputs_agree(norm):
    model = make_cnn(norm=norm, seed=1).eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert model(x).shape == (5, 10)
        torch.testing.assert_close(model(x.flatten(1)), model(x))


def test_preactivations_are_feature_maps():
    model = make_cnn(norm="bn", bn_impl="torch", seed=0)
    logits, preactivations = model.forward_with_preactivations(torch.randn(6, 64))
    assert logits.shape == (6, 10)
    assert [tuple(z.shape) for z in preactivations] == [(6, 16, 8, 8), (6, 32, 4, 4), (6, 64, 2, 2)]
    # in training mode the BN output has per-channel mean 0 over batch and positions
    torch.testing.assert_close(
        preactivations[0].mean(dim=(0, 2, 3)), torch.zeros(16), atol=1e-5, rtol=0
    )


def test_seed_is_reproducible_and_leaves_global_state():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = make_cnn(norm="bn", seed=3)
    after = torch.rand(1)
    b = make_cnn(norm="bn", seed=3)
    assert torch.equal(before, after)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_implementations_agree():
    ours = make_cnn(norm="bn", bn_impl="bncourse", seed=2)
    native = make_cnn(norm="bn", bn_impl="torch", seed=2)
    native.load_state_dict(ours.state_dict())
    x = torch.randn(7, 64)
    torch.testing.assert_close(ours(x), native(x))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(norm="ln"), "norm"),
        (dict(channels=()), "channels"),
        (dict(bn_impl="jax"), "bn_impl"),
        (dict(activation="gelu"), "activation"),
        (dict(input_shape=(1, 6, 6)), "divisible"),
        (dict(num_classes=0), "num_classes"),
        (dict(bias="yes"), "bias"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_cnn(**kwargs)


def test_bad_input_shape():
    with pytest.raises(ValueError, match="expects inputs"):
        make_cnn()(torch.randn(2, 1, 1, 8, 8))


def test_no_pool_keeps_size():
    model = make_cnn(channels=(3,), pool=False, input_shape=(2, 5, 5), seed=0)
    assert model(torch.randn(4, 2, 5, 5)).shape == (4, 10)
    assert model.output.in_features == 3 * 5 * 5
