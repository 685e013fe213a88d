"""Tests of bncourse.models: make_mlp's structure, bias rule, init scale and pre-activations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bncourse.models import MLP, HiddenBlock, count_parameters, make_mlp
from bncourse.torch_bn import BatchNorm1d

BN_IMPLS = ["torch", "bncourse"]


def _bn_class(bn_impl):
    return nn.BatchNorm1d if bn_impl == "torch" else BatchNorm1d


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
@pytest.mark.parametrize("norm", [None, "bn", "bn_no_affine"])
def test_structure(activation, norm):
    model = make_mlp(64, 10, depth=3, width=20, activation=activation, norm=norm, bn_impl="torch")
    assert isinstance(model, MLP) and model.training
    assert len(model.hidden) == 3 and model.depth == 3 and model.width == 20
    activation_class = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    for i, block in enumerate(model.hidden):
        assert isinstance(block, HiddenBlock)
        assert block.linear.in_features == (64 if i == 0 else 20)
        assert block.linear.out_features == 20
        assert isinstance(block.activation, activation_class)
        if norm is None:
            assert block.norm is None
            assert block.linear.bias is not None  # automatic: bias without BN
        else:
            assert isinstance(block.norm, nn.BatchNorm1d)
            assert block.norm.num_features == 20
            assert block.norm.affine == (norm == "bn")
            assert block.linear.bias is None  # automatic: BN cancels the bias
    assert isinstance(model.output, nn.Linear) and model.output.out_features == 10
    assert model.output.bias is not None
    assert model(torch.randn(5, 64)).shape == (5, 10)


@pytest.mark.parametrize("bn_impl", BN_IMPLS)
def test_bn_impl(bn_impl):
    model = make_mlp(8, 3, depth=2, width=6, norm="bn", bn_impl=bn_impl)
    assert all(type(block.norm) is _bn_class(bn_impl) for block in model.hidden)
    assert model(torch.randn(4, 8)).shape == (4, 3)


def test_explicit_bias_overrides_rule():
    with_bias = make_mlp(8, 3, depth=2, width=6, norm="bn", bias=True, bn_impl="torch")
    assert all(block.linear.bias is not None for block in with_bias.hidden)
    without = make_mlp(8, 3, depth=2, width=6, norm=None, bias=False)
    assert all(block.linear.bias is None for block in without.hidden)


def test_parameter_count():
    plain = make_mlp(64, 10, depth=3, width=100)
    assert count_parameters(plain) == (64 * 100 + 100) + 2 * (100 * 100 + 100) + (100 * 10 + 10)
    bn = make_mlp(64, 10, depth=3, width=100, norm="bn", bn_impl="torch")
    # no hidden biases (-100 per layer), but gamma and beta per unit (+200 per layer)
    assert count_parameters(bn) == count_parameters(plain) + 3 * 100
    no_affine = make_mlp(64, 10, depth=3, width=100, norm="bn_no_affine", bn_impl="torch")
    assert count_parameters(no_affine) == count_parameters(plain) - 3 * 100
    bn.output.weight.requires_grad_(False)
    assert count_parameters(bn, trainable_only=False) - count_parameters(bn) == 100 * 10


def test_depth_zero_is_linear_classifier():
    model = make_mlp(64, 10, depth=0)
    assert len(model.hidden) == 0
    logits, preactivations = model.forward_with_preactivations(torch.randn(3, 64))
    assert logits.shape == (3, 10) and preactivations == []


def test_seed_gives_same_init_and_keeps_global_state():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = make_mlp(16, 4, depth=2, width=8, seed=7)
    b = make_mlp(16, 4, depth=2, width=8, seed=7)
    assert torch.rand(1) == expected_next  # seeded builds leave the global generator alone
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    c = make_mlp(16, 4, depth=2, width=8, seed=8)
    assert not torch.equal(a.hidden[0].linear.weight, c.hidden[0].linear.weight)


def test_init_scale_multiplies_hidden_weights_only():
    base = make_mlp(16, 4, depth=2, width=8, seed=0)
    scaled = make_mlp(16, 4, depth=2, width=8, seed=0, init_scale=3.0)
    for b, s in zip(base.hidden, scaled.hidden, strict=True):
        torch.testing.assert_close(s.linear.weight, 3.0 * b.linear.weight)
        torch.testing.assert_close(s.linear.bias, b.linear.bias)
    torch.testing.assert_close(scaled.output.weight, base.output.weight)
    # Default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1 / 16**0.5
    assert base.hidden[0].linear.weight.abs().max() <= bound


def test_bn_makes_function_independent_of_init_scale():
    x = torch.randn(32, 16)
    base = make_mlp(16, 4, depth=3, width=8, norm="bn", bn_impl="torch", seed=0)
    scaled = make_mlp(16, 4, depth=3, width=8, norm="bn", bn_impl="torch", seed=0, init_scale=10)
    # equal up to BN's eps, which weighs less against the 100x larger variance
    torch.testing.assert_close(base(x), scaled(x), rtol=1e-3, atol=1e-3)


def test_flattens_image_inputs():
    model = make_mlp(64, 10, depth=1, width=5, seed=0)
    images = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(model(images), model(images.reshape(3, 64)))


@pytest.mark.parametrize("norm", [None, "bn", "bn_no_affine"])
def test_forward_with_preactivations_shapes_and_consistency(norm):
    model = make_mlp(64, 10, depth=3, width=20, norm=norm, bn_impl="torch", seed=0).eval()
    x = torch.randn(16, 64)
    logits, preactivations = model.forward_with_preactivations(x)
    assert logits.shape == (16, 10)
    assert len(preactivations) == 3 and all(z.shape == (16, 20) for z in preactivations)
    torch.testing.assert_close(logits, model(x))
    # preactivations[i] is what hidden[i]'s nonlinearity receives.
    h = x
    for block, z in zip(model.hidden, preactivations, strict=True):
        expected = block.linear(h) if block.norm is None else block.norm(block.linear(h))
        torch.testing.assert_close(z, expected)
        h = block.activation(z)
    assert preactivations[0].requires_grad  # part of the graph


@pytest.mark.parametrize("bn_impl", BN_IMPLS)
@pytest.mark.parametrize("norm", ["bn", "bn_no_affine"])
def test_preactivations_after_bn_are_normalized_in_training_mode(bn_impl, norm):
    model = make_mlp(64, 10, depth=3, width=30, norm=norm, bn_impl=bn_impl, init_scale=5, seed=0)
    x = 3.0 * torch.randn(200, 64) + 1.0
    _, preactivations = model.forward_with_preactivations(x)
    for z in preactivations:
        torch.testing.assert_close(z.mean(dim=0), torch.zeros(30), atol=1e-5, rtol=0)
        std = z.std(dim=0, correction=0)
        torch.testing.assert_close(std, torch.ones(30), atol=1e-3, rtol=0)


def test_preactivations_without_bn_are_not_normalized():
    model = make_mlp(64, 10, depth=2, width=30, seed=0)
    _, preactivations = model.forward_with_preactivations(3.0 * torch.randn(200, 64) + 1.0)
    assert preactivations[0].mean(dim=0).abs().max() > 0.1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"activation": "gelu"}, r"activation must be one of \('sigmoid', 'tanh', 'relu'"),
        ({"norm": "layer"}, r"norm must be one of \(None, 'bn', 'bn_no_affine'\), got 'layer'"),
        ({"bn_impl": "keras"}, r"bn_impl must be one of \('bncourse', 'torch'\), got 'keras'"),
        ({"depth": -1}, "depth must be"),
        ({"width": 0}, "width must be a positive int, got 0"),
        ({"bias": "yes"}, "bias must be None"),
        ({"init_scale": 0.0}, "init_scale must be positive"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_mlp(8, 3, **kwargs)


def test_size_errors():
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        make_mlp(0, 3)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        make_mlp(8, 1.5)
