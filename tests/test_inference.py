"""Tests of bncourse.inference: momentum conventions, recomputed statistics, folding, timing."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from bncourse import inference, torch_bn
from bncourse.models import make_mlp

BN_CLASSES = [nn.BatchNorm1d, torch_bn.BatchNorm1d]


# ---------------------------------------------------------------------------------------------
# Momentum conventions


@pytest.mark.parametrize(
    "momentum, source, target, expected",
    [
        (0.99, "keras", "pytorch", 0.01),
        (0.1, "pytorch", "keras", 0.9),
        (0.999, "keras", "pytorch", 0.001),
        (0.3, "pytorch", "pytorch", 0.3),
        (0.0, "keras", "pytorch", 1.0),
    ],
)
def test_convert_momentum_values(momentum, source, target, expected):
    assert inference.convert_momentum(momentum, source, target) == pytest.approx(expected)


def test_convert_momentum_round_trip():
    for momentum in np.linspace(0, 1, 11):
        there = inference.convert_momentum(momentum, "pytorch", "keras")
        assert inference.convert_momentum(there, "keras", "pytorch") == pytest.approx(momentum)


def test_converted_momentum_gives_the_keras_update_in_pytorch():
    keras_momentum = 0.9
    layer = nn.BatchNorm1d(4, momentum=inference.convert_momentum(keras_momentum))
    moving_mean, moving_var = torch.zeros(4), torch.ones(4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        batch = torch.randn(10, 4, generator=generator) * 3 + 2
        layer(batch)
        moving_mean = keras_momentum * moving_mean + (1 - keras_momentum) * batch.mean(0)
        # PyTorch feeds the unbiased variance (Keras the biased one: a different statistic)
        moving_var = keras_momentum * moving_var + (1 - keras_momentum) * batch.var(0)
    torch.testing.assert_close(layer.running_mean, moving_mean)
    torch.testing.assert_close(layer.running_var, moving_var)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(momentum=0.5, source="tf"), "source"),
        (dict(momentum=0.5, target="caffe"), "target"),
        (dict(momentum=1.5), r"\[0, 1\]"),
        (dict(momentum=-0.1), r"\[0, 1\]"),
        (dict(momentum=None), "cumulative"),
    ],
)
def test_convert_momentum_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        inference.convert_momentum(**kwargs)


def test_cumulative_momentum_matches_pytorch_momentum_none():
    layer = nn.BatchNorm1d(3, momentum=None)
    running = torch.zeros(3)
    batches = [torch.randn(6, 3) + k for k in range(5)]
    for step, batch in enumerate(batches, start=1):
        layer(batch)
        alpha = inference.cumulative_momentum(step)
        running = (1 - alpha) * running + alpha * batch.mean(0)
    torch.testing.assert_close(layer.running_mean, running)
    torch.testing.assert_close(running, torch.stack([b.mean(0) for b in batches]).mean(0))
    with pytest.raises(ValueError):
        inference.cumulative_momentum(0)


def test_initial_value_weight():
    assert inference.initial_value_weight(0.1, 1) == pytest.approx(0.9)
    assert inference.initial_value_weight(0.01, 100) == pytest.approx(0.99**100)
    np.testing.assert_allclose(
        inference.initial_value_weight(0.5, np.array([0, 1, 2])), [1.0, 0.5, 0.25]
    )
    # the weight an exponential average really keeps on its initial value
    layer = nn.BatchNorm1d(1, momentum=0.2)
    layer.running_mean.fill_(10.0)
    for _ in range(7):
        layer(torch.tensor([[-1.0], [1.0]]))  # batch mean 0
    assert layer.running_mean.item() == pytest.approx(10 * inference.initial_value_weight(0.2, 7))
    with pytest.raises(ValueError):
        inference.initial_value_weight(2.0, 3)


@pytest.mark.parametrize("momentum", [0.1, 0.01, 0.5, 1.0, 0.0, None])
def test_moving_average_weights_reproduce_the_running_value(momentum):
    values = torch.arange(1.0, 13.0).reshape(12, 1) ** 1.5
    layer = nn.BatchNorm1d(1, momentum=momentum)
    layer.running_mean.fill_(-3.0)
    for value in values:
        layer(torch.cat([value - 1, value + 1]).reshape(2, 1))  # batch mean = value
    weights, initial = inference.moving_average_weights(momentum, len(values))
    assert weights.shape == (12,)
    assert weights.sum() + initial == pytest.approx(1.0)
    expected = float(weights @ values[:, 0].double().numpy()) + initial * -3.0
    assert layer.running_mean.item() == pytest.approx(expected, rel=1e-5)


def test_moving_average_weights_errors():
    with pytest.raises(ValueError):
        inference.moving_average_weights(0.1, 0)
    with pytest.raises(ValueError):
        inference.moving_average_weights(-0.5, 3)


# ---------------------------------------------------------------------------------------------
# Population statistics


def _mlp(bn_impl, seed=0):
    return make_mlp(
        8, 3, depth=2, width=6, activation="relu", norm="bn", bn_impl=bn_impl, seed=seed
    )


@pytest.mark.parametrize("bn_impl", ["torch", "bncourse"])
def test_batch_norm_modules_finds_both_implementations(bn_impl):
    model = _mlp(bn_impl)
    layers = inference.batch_norm_modules(model)
    assert len(layers) == 2
    assert all(inference.is_batch_norm(layer) for layer in layers)
    assert not inference.is_batch_norm(nn.Linear(2, 2))


@pytest.mark.parametrize("bn_impl", ["torch", "bncourse"])
def test_recompute_with_one_batch_gives_exact_population_statistics(bn_impl):
    torch.manual_seed(0)
    model = _mlp(bn_impl)
    x = torch.randn(200, 8) * 2 + 1
    model.train()
    for _ in range(5):  # some training-mode passes that leave moving averages behind
        model(torch.randn(16, 8))
    model.eval()
    count = inference.recompute_population_statistics(model, [x])
    assert count == 1
    first = model.hidden[0]
    with torch.no_grad():
        z = first.linear(x)
    torch.testing.assert_close(first.norm.running_mean, z.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first.norm.running_var, z.var(0), atol=1e-5, rtol=1e-4)
    # during the pass the first layer normalises with the batch's biased variance, so the second
    # layer's statistics are those of the network with batch statistics upstream: they differ
    # from the eval-mode network's by a factor of order N / (N - 1)
    second = model.hidden[1]
    with torch.no_grad():
        upstream = copy.deepcopy(first).train()
        z2 = second.linear(upstream(x))
        z2_eval = second.linear(first(x))
    torch.testing.assert_close(second.norm.running_var, z2.var(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(second.norm.running_var, z2_eval.var(0), rtol=3 / len(x), atol=0)


@pytest.mark.parametrize("bn_impl", ["torch", "bncourse"])
def test_recompute_is_the_average_of_batch_statistics(bn_impl):
    torch.manual_seed(1)
    model = _mlp(bn_impl)
    batches = [torch.randn(10, 8) for _ in range(6)]
    inference.recompute_population_statistics(model, batches)
    first = model.hidden[0]
    with torch.no_grad():
        z = [first.linear(b) for b in batches]
    torch.testing.assert_close(first.norm.running_mean, torch.stack([v.mean(0) for v in z]).mean(0))
    torch.testing.assert_close(first.norm.running_var, torch.stack([v.var(0) for v in z]).mean(0))
    assert int(first.norm.num_batches_tracked) == 6


def test_recompute_matches_pytorchs_update_bn():
    torch.manual_seed(2)
    model = _mlp("torch")
    reference = copy.deepcopy(model)
    batches = [torch.randn(12, 8) * 2 for _ in range(4)]
    inference.recompute_population_statistics(model, batches)
    torch.optim.swa_utils.update_bn(batches, reference)
    for ours, theirs in zip(model.buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(ours, theirs)


def test_recompute_restores_modes_and_momentum_and_keeps_parameters():
    model = nn.Sequential(
        nn.Linear(4, 5),
        nn.BatchNorm1d(5, momentum=0.3),
        nn.Dropout(0.5),
        nn.Linear(5, 2),
        torch_bn.BatchNorm1d(2, momentum=None),
    )
    model.train()
    model[2].eval()  # a mixed state, to be restored as it was
    parameters = copy.deepcopy(list(model.parameters()))
    inference.recompute_population_statistics(model, [(torch.randn(30, 4), torch.zeros(30))])
    assert model.training and model[1].training and not model[2].training
    assert model[1].momentum == 0.3 and model[4].momentum is None
    for before, after in zip(parameters, model.parameters(), strict=True):
        assert torch.equal(before, after)


def test_recompute_turns_dropout_off_during_the_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.9), nn.BatchNorm1d(3))
    model.train()
    x = torch.randn(50, 3) * 4
    inference.recompute_population_statistics(model, [x])
    torch.testing.assert_close(model[1].running_var, x.var(0))


def test_recompute_accepts_numpy_and_integer_batches():
    model = nn.Sequential(nn.BatchNorm1d(2))
    inference.recompute_population_statistics(model, [np.array([[0, 1], [2, 5]])])
    torch.testing.assert_close(model[0].running_mean, torch.tensor([1.0, 3.0]))


def test_recompute_errors():
    with pytest.raises(ValueError, match="no batch-norm"):
        inference.recompute_population_statistics(nn.Linear(2, 2), [torch.randn(4, 2)])
    with pytest.raises(ValueError, match="no batch-norm"):
        inference.recompute_population_statistics(
            nn.Sequential(nn.BatchNorm1d(2, track_running_stats=False)), [torch.randn(4, 2)]
        )
    model = nn.Sequential(nn.BatchNorm1d(2, momentum=0.2))
    with pytest.raises(ValueError, match="empty"):
        inference.recompute_population_statistics(model, [])
    assert model[0].momentum == 0.2


# ---------------------------------------------------------------------------------------------
# The affine map and folding


def _random_statistics(bn: nn.Module, var_range: tuple[float, float]) -> nn.Module:
    """``bn`` in evaluation mode with random running statistics (the variances uniform in
    ``var_range``) and, when it has them, random ``weight`` and ``bias``; drawn from torch's
    global generator."""
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(*var_range)
        if bn.affine:
            bn.weight.normal_()
            bn.bias.normal_()
    return bn.eval()


@pytest.mark.parametrize("bn_class", BN_CLASSES)
@pytest.mark.parametrize("affine", [True, False])
def test_inference_affine_matches_the_layer(bn_class, affine):
    torch.manual_seed(0)
    bn = _random_statistics(bn_class(5, affine=affine, eps=1e-3), var_range=(0.5, 2.0))
    x = torch.randn(7, 5)
    scale, shift = inference.inference_affine(bn)
    torch.testing.assert_close(bn(x).detach(), scale * x + shift)


def test_inference_affine_errors():
    with pytest.raises(TypeError):
        inference.inference_affine(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="running statistics"):
        inference.inference_affine(nn.BatchNorm1d(2, track_running_stats=False))


@pytest.mark.parametrize("bn_impl", ["torch", "bncourse"])
def test_fold_batch_norms_on_an_mlp(bn_impl):
    torch.manual_seed(0)
    model = _mlp(bn_impl)
    model.train()
    for _ in range(3):
        model(torch.randn(20, 8) * 3)
    folded = inference.fold_batch_norms(model)
    assert model.training  # the original is untouched
    assert not inference.batch_norm_modules(folded)
    assert not folded.training
    x = torch.randn(11, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), atol=1e-5, rtol=1e-5)


def test_fold_batch_norms_on_a_sequential_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 3, 3, bias=False), torch_bn.BatchNorm2d(3)),
        nn.Flatten(),
        nn.Linear(3 * 6 * 6, 2),
    )
    model.train()
    for _ in range(3):
        model(torch.randn(8, 1, 8, 8))
    folded = inference.fold_batch_norms(model)
    assert not inference.batch_norm_modules(folded)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), atol=1e-5, rtol=1e-5)


LAYERS_AND_NORMS = {
    "linear": (lambda bias: nn.Linear(6, 4, bias=bias), (5, 6), "BatchNorm1d"),
    "conv1d": (lambda bias: nn.Conv1d(3, 4, 3, bias=bias), (5, 3, 9), "BatchNorm1d"),
    "conv2d": (lambda bias: nn.Conv2d(3, 4, 3, stride=2, bias=bias), (5, 3, 9, 9), "BatchNorm2d"),
    "conv3d": (
        lambda bias: nn.Conv3d(3, 4, 2, groups=1, bias=bias),
        (5, 3, 4, 4, 4),
        "BatchNorm3d",
    ),
}


@pytest.mark.parametrize("kind", list(LAYERS_AND_NORMS))
@pytest.mark.parametrize("bn_module", [nn, torch_bn], ids=["torch.nn", "bncourse"])
@pytest.mark.parametrize("bias, affine", [(True, True), (False, False)])
def test_fold_batch_norm_every_layer_and_dimension(kind, bn_module, bias, affine):
    torch.manual_seed(1)
    make_layer, shape, norm_name = LAYERS_AND_NORMS[kind]
    layer = make_layer(bias).double()
    bn = getattr(bn_module, norm_name)(4, affine=affine).double()
    bn = _random_statistics(bn, var_range=(0.2, 3.0))
    x = torch.randn(shape, dtype=torch.float64)
    folded = inference.fold_batch_norm(layer, bn)
    assert type(folded) is type(layer) and folded.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(folded(x), bn(layer(x)), rtol=1e-12, atol=1e-12)
    scale, shift = inference.inference_affine(bn)  # the same map, from one place
    column = [-1] + [1] * (layer.weight.dim() - 1)
    torch.testing.assert_close(folded.weight, layer.weight * scale.view(column))
    # folding a whole model finds the same pair in an nn.Sequential
    model = inference.fold_batch_norms(nn.Sequential(layer, bn))
    assert not inference.batch_norm_modules(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), bn(layer(x)), rtol=1e-12, atol=1e-12)


def test_fold_batch_norm_keeps_float32_and_rejects_what_it_cannot_fold():
    layer, bn = nn.Linear(3, 2), nn.BatchNorm1d(2)
    folded = inference.fold_batch_norm(layer, bn)
    assert folded.weight.dtype == folded.bias.dtype == torch.float32
    with pytest.raises(TypeError, match="layer must be nn.Linear"):
        inference.fold_batch_norm(nn.ReLU(), bn)
    with pytest.raises(TypeError, match="bn must be a BatchNorm"):
        inference.fold_batch_norm(layer, nn.LayerNorm(2))
    with pytest.raises(ValueError, match="no running statistics"):
        inference.fold_batch_norm(layer, nn.BatchNorm1d(2, track_running_stats=False))
    with pytest.raises(ValueError, match="2 output channels but bn has 3"):
        inference.fold_batch_norm(layer, nn.BatchNorm1d(3))


def test_inference_affine_in_a_chosen_dtype():
    bn = nn.BatchNorm1d(3).eval()
    with torch.no_grad():
        bn.running_var.fill_(3.0)
    scale, shift = inference.inference_affine(bn, dtype=torch.float64)
    assert scale.dtype == shift.dtype == torch.float64
    torch.testing.assert_close(scale, torch.full((3,), 3.0 + 1e-5, dtype=torch.float64).rsqrt())


def test_fold_batch_norms_leaves_a_lone_batch_norm():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2))
    folded = inference.fold_batch_norms(model)
    assert len(inference.batch_norm_modules(folded)) == 1


# ---------------------------------------------------------------------------------------------
# Timing


def test_time_inference_returns_repeats_and_restores_threads():
    threads = torch.get_num_threads()
    models = {"a": nn.Linear(4, 4), "b": nn.Sequential(nn.Linear(4, 4), nn.ReLU())}
    times = inference.time_inference(models, torch.randn(3, 4), repeats=4, number=2, warmup=1)
    assert set(times) == {"a", "b"}
    assert all(t.shape == (4,) and np.all(t > 0) for t in times.values())
    assert torch.get_num_threads() == threads
    with pytest.raises(ValueError):
        inference.time_inference(models, torch.randn(3, 4), repeats=0)
