"""Tests of bncourse.analysis: each measurement against a case whose answer is known."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from bncourse import analysis
from bncourse.models import make_mlp


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 12, generator=generator)
    y = torch.randint(0, 4, (32,), generator=generator)
    return x, y


def _mlp(norm, depth=3, seed=0):
    return make_mlp(12, 4, depth=depth, width=16, activation="relu", norm=norm, seed=seed)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, state):
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_gradients_match_backward(batch):
    model = _mlp("bn")
    loss, grads = analysis.gradients(model, *batch)
    reference = copy.deepcopy(model)
    ref_loss = nn.functional.cross_entropy(reference(batch[0]), batch[1])
    ref_loss.backward()
    assert loss == pytest.approx(ref_loss.item())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad)
    assert all(p.grad is None for p in model.parameters())  # the model's .grad untouched


def test_internal_covariate_shift_by_hand(batch):
    model = _mlp(None, depth=2)
    state = _state(model)
    lr = 0.5
    shift = analysis.internal_covariate_shift(model, *batch, lr)
    assert shift.l2.shape == shift.cosine.shape == shift.relative.shape == (2,)
    _assert_unchanged(model, state)
    # layer 2 (the output layer): move both hidden layers by hand and compare
    _, grads = analysis.gradients(model, *batch)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            if name.startswith("hidden."):
                p -= lr * grads[name]
    _, moved_grads = analysis.gradients(moved, *batch)
    expected = torch.linalg.vector_norm(grads["output.weight"] - moved_grads["output.weight"])
    assert shift.l2[1] == pytest.approx(float(expected), rel=1e-5)
    assert 0 < shift.l2[1]
    assert shift.relative[1] == pytest.approx(
        shift.l2[1] / float(torch.linalg.vector_norm(grads["output.weight"])), rel=1e-6
    )


def test_internal_covariate_shift_vanishes_with_tiny_steps(batch):
    model = _mlp("bn")
    small = analysis.internal_covariate_shift(model, *batch, 1e-6)
    large = analysis.internal_covariate_shift(model, *batch, 1.0)
    assert np.all(small.cosine > 0.9999)
    assert np.all(small.l2 < 1e-3 * large.l2)


def test_internal_covariate_shift_calls_after_update(batch):
    calls = []
    analysis.internal_covariate_shift(_mlp(None), *batch, 0.1, after_update=calls.append)
    assert len(calls) == 3  # one per layer above the first
    with pytest.raises(ValueError, match="lr"):
        analysis.internal_covariate_shift(_mlp(None), *batch, 0.0)


def test_gradient_probe_matches_direct_evaluation():
    model = _mlp(None, depth=1)
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(3))
    y = torch.arange(16) % 4
    state = _state(model)
    probe = analysis.gradient_probe(model, x, y, step_sizes=(0.1, 0.3))
    _assert_unchanged(model, state)
    _, grads = analysis.gradients(model, x, y)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            p -= 0.3 * grads[name]
    loss, moved_grads = analysis.gradients(moved, x, y)
    assert probe.losses[1] == pytest.approx(loss, rel=1e-5)
    change = torch.linalg.vector_norm(
        torch.cat([(moved_grads[n] - grads[n]).flatten() for n in grads])
    )
    assert probe.gradient_changes[1] == pytest.approx(float(change), rel=1e-5)
    values = np.append(probe.losses, probe.loss)
    assert probe.loss_range == pytest.approx(values.max() - values.min())
    assert probe.beta_smoothness == pytest.approx(
        np.max(probe.gradient_changes / (probe.step_sizes * probe.gradient_norm))
    )
    with pytest.raises(ValueError, match="step_sizes"):
        analysis.gradient_probe(model, x, y, step_sizes=(0.1, -1.0))


def test_weight_norms_and_effective_rates():
    model = _mlp("bn")
    with torch.no_grad():
        for i, block in enumerate(model.hidden):
            block.linear.weight.fill_(0.0)
            block.linear.weight[0, 0] = float(i + 1)
    np.testing.assert_allclose(analysis.weight_norms(model), [1.0, 2.0, 3.0])
    np.testing.assert_allclose(analysis.effective_learning_rates(0.5, [1.0, 2.0]), [0.5, 0.125])
    with pytest.raises(ValueError, match="positive"):
        analysis.effective_learning_rates(0.1, [0.0])


def test_angular_updates():
    trajectory = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 3.0], [0.0, 3.0]])
    np.testing.assert_allclose(analysis.angular_updates(trajectory), [np.pi / 4, np.pi / 4, 0.0])


def test_scale_invariance_makes_the_gradient_orthogonal(batch):
    # BN without affine after every hidden layer: the hidden weights are scale-invariant
    model = make_mlp(12, 4, depth=2, width=16, activation="relu", norm="bn_no_affine", seed=1)
    _, grads = analysis.gradients(model, *batch)
    for i, block in enumerate(model.hidden):
        w, g = block.linear.weight.detach(), grads[f"hidden.{i}.linear.weight"]
        cosine = float((w * g).sum() / (w.norm() * g.norm()))
        assert abs(cosine) < 1e-3
    # and scaling the weights by 3 divides the gradient by 3
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        for block in scaled.hidden:
            block.linear.weight.mul_(3.0)
    _, scaled_grads = analysis.gradients(scaled, *batch)
    torch.testing.assert_close(
        scaled_grads["hidden.0.linear.weight"] * 3.0,
        grads["hidden.0.linear.weight"],
        rtol=1e-2,
        atol=1e-5,
    )


def test_layer_gradient_norms(batch):
    model = _mlp(None)
    norms = analysis.layer_gradient_norms(model, *batch)
    _, grads = analysis.gradients(model, *batch)
    expected = [float(grads[f"hidden.{i}.linear.weight"].norm()) for i in range(3)]
    np.testing.assert_allclose(norms, expected, rtol=1e-6)
    with pytest.raises(TypeError, match="hidden"):
        analysis.layer_gradient_norms(nn.Linear(3, 2), *batch)


@pytest.mark.parametrize(("m", "gamma", "eps"), [(2, 1.0, 1e-5), (5, 2.0, 1e-3), (9, 0.3, 0.5)])
def test_bn_jacobian_matches_autograd(m, gamma, eps):
    x = np.random.default_rng(m).normal(2.0, 3.0, m)
    np.testing.assert_allclose(
        analysis.bn_jacobian(x, gamma, eps),
        analysis.autograd_bn_jacobian(x, gamma, eps),
        rtol=1e-9,
        atol=1e-12,
    )


def test_bn_jacobian_is_a_scaled_projection():
    x = np.random.default_rng(1).normal(size=10)
    jac = analysis.bn_jacobian(x, gamma=1.5, eps=1e-12)
    scale = 1.5 / np.sqrt(x.var() + 1e-12)
    projection = jac / scale
    np.testing.assert_allclose(projection @ projection, projection, atol=1e-9)
    eigenvalues = np.sort(np.linalg.eigvalsh(projection))
    np.testing.assert_allclose(eigenvalues, [0, 0] + [1] * 8, atol=1e-9)
    with pytest.raises(ValueError, match="m >= 2"):
        analysis.bn_jacobian(np.ones(1))


def test_layer_jacobian_singular_values():
    model = _mlp("bn", depth=2).eval()
    with torch.no_grad():
        for block in model.hidden:
            block.norm.running_var.uniform_(0.5, 2.0)
    model.train()
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(2))
    values = analysis.layer_jacobian_singular_values(model, x)
    assert model.training  # mode restored
    assert [v.shape for v in values] == [(3, 12), (3, 16)]
    block = model.hidden[1]
    scale = block.norm.weight / torch.sqrt(block.norm.running_var + block.norm.eps)
    expected = torch.linalg.svdvals(scale[:, None] * block.linear.weight).detach().numpy()
    np.testing.assert_allclose(values[1][0], expected, rtol=1e-5)
    with_relu = analysis.layer_jacobian_singular_values(model, x, include_activation=True)
    assert np.all(with_relu[1] <= values[1] + 1e-5)  # ReLU's mask can only shrink them


def test_eps_outside_gives_nan_on_a_constant_channel():
    x = torch.full((8, 2), 3.0, requires_grad=True)
    (analysis.batch_norm_eps_outside(x) * torch.arange(16.0).reshape(8, 2)).sum().backward()
    assert x.grad.isnan().all()
    z = torch.randn(8, 2, requires_grad=True)
    out = analysis.batch_norm_eps_outside(z, eps=0.0)
    torch.testing.assert_close(out.std(dim=0, unbiased=False), torch.ones(2))


def test_output_spread():
    model = _mlp("bn")
    pool = torch.randn(200, 12, generator=torch.Generator().manual_seed(4))
    state = _state(model)
    small = analysis.output_spread(model, pool[0], pool[1:], 4, num_batches=30)
    large = analysis.output_spread(model, pool[0], pool[1:], 64, num_batches=30)
    _assert_unchanged(model, state)
    assert large < 0.6 * small
    plain = analysis.output_spread(_mlp(None), pool[0], pool[1:], 4, num_batches=10)
    assert plain < 1e-6  # without BN an example's output ignores its batch-mates
    with pytest.raises(ValueError, match="batch_size"):
        analysis.output_spread(model, pool[0], pool[1:], 1)
