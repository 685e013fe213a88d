"""Tests of bncourse.experiments.ch3 (small arguments: the whole file runs in seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bncourse import numpy_bn
from bncourse.experiments import ch3

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("shape", [(16, 3), (4, 3, 5, 2)])
@pytest.mark.parametrize("eps", [1e-5, 1.0])
def test_identity_parameters_recover_the_input(shape, eps):
    rng = np.random.default_rng(0)
    x = 7.0 + 3.0 * rng.standard_normal(shape)
    gamma, beta = ch3.identity_parameters(x, eps)
    assert gamma.shape == beta.shape == (3,)
    y, _ = numpy_bn.batch_norm_forward(x, gamma, beta, eps)
    np.testing.assert_allclose(y, x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(16, 3), (4, 3, 5, 2)])
def test_undo_batch_norm_inverts_training_and_inference(shape):
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 5.0, shape)
    gamma, beta = np.array([1.5, -0.3, 2.0]), np.array([0.1, -4.0, 2.0])
    y, cache = numpy_bn.batch_norm_forward(x, gamma, beta, 1e-3)
    np.testing.assert_allclose(
        ch3.undo_batch_norm(y, gamma, beta, cache.mean, cache.var, 1e-3), x, atol=1e-10
    )
    mean, var = np.array([1.0, 2.0, 3.0]), np.array([4.0, 0.5, 9.0])
    y = numpy_bn.batch_norm_inference(x, mean, var, gamma, beta, 1e-5)
    np.testing.assert_allclose(ch3.undo_batch_norm(y, gamma, beta, mean, var, 1e-5), x, atol=1e-10)


def test_gaussian_sigmoid_linearity_matches_monte_carlo():
    z = np.random.default_rng(2).standard_normal((200_000, 1))
    for scale, shift in [(1.0, 0.0), (3.0, 0.0), (1.0, 2.0)]:
        sampled = ch3.unit_linearity(scale * z + shift)[0]
        assert abs(ch3.gaussian_sigmoid_linearity(scale, shift) - sampled) < 2e-3
    values = [ch3.gaussian_sigmoid_linearity(s) for s in (0.01, 0.5, 1, 2, 5)]
    assert values[0] > 0.99999 and all(a > b for a, b in zip(values, values[1:], strict=False))


def test_unit_linearity_per_unit_and_for_tensors():
    z = torch.linspace(-1, 1, 101)[:, None] * torch.tensor([[0.01, 10.0]])
    r2 = ch3.unit_linearity(z)
    assert r2.shape == (2,) and r2[0] > 0.99999 and r2[1] < 0.9


def test_best_threshold_accuracy_against_brute_force():
    rng = np.random.default_rng(3)
    x = rng.uniform(-3, 3, 60)
    y = (np.abs(x) < 1).astype(int)
    brute = max(
        max(np.mean((x > t) == y), np.mean((x <= t) == y)) for t in np.concatenate([[-10], x])
    )
    assert ch3.best_threshold_accuracy(x, y) == pytest.approx(brute)
    assert ch3.best_threshold_accuracy(np.arange(5.0), np.array([0, 0, 1, 1, 1])) == 1.0
    assert ch3.best_threshold_accuracy(np.arange(5.0), np.array([1, 1, 0, 0, 0])) == 1.0


def test_monotonicity_violation():
    grid = np.linspace(-3, 3, 50)
    assert ch3.monotonicity_violation(np.tanh(grid)) == 0.0
    assert ch3.monotonicity_violation(-grid) == 0.0
    assert ch3.monotonicity_violation(np.ones(5)) == 0.0
    assert ch3.monotonicity_violation(np.exp(-(grid**2))) > 0.9


def test_make_interval_data():
    data = ch3.make_interval_data(num_train=200, num_test=100, seed=4)
    assert data.x_train.shape == (200, 1) and data.x_test.shape == (100, 1)
    assert np.all(np.abs(data.x_train) <= 3.0)
    np.testing.assert_array_equal(data.y_train, np.abs(data.x_train[:, 0]) < 1.0)
    again = ch3.make_interval_data(num_train=200, num_test=100, seed=4)
    np.testing.assert_array_equal(data.x_test, again.x_test)


def test_interval_experiment_small():
    result = ch3.interval_experiment(
        depth=2, width=4, steps=30, num_train=200, grid_points=51, device="cpu"
    )
    assert set(result.test_accuracy) == {"no BN", "BN", "BN (no affine)"}
    assert result.grid.shape == result.probability["BN"].shape == (51,)
    assert [len(v) for v in result.linearity.values()] == [2, 2, 2]
    assert set(result.gamma) == {"BN"} and result.gamma["BN"][0].shape == (4,)
    # Without the affine step the network thresholds x, whatever its training.
    assert result.monotonicity["BN (no affine)"] < 1e-3
    assert result.test_accuracy["BN (no affine)"] <= result.threshold_accuracy + 0.01


@pytest.mark.parametrize("norm", ["bn", None])
def test_moments_under_weight_perturbation(norm):
    result = ch3.moments_under_weight_perturbation(norm=norm, trials=2, width=8, batch_size=64)
    assert result.mean.shape == result.std.shape == (3, 8)
    if norm == "bn":
        np.testing.assert_allclose(result.mean, np.broadcast_to(result.beta, (3, 8)), atol=1e-12)
        np.testing.assert_allclose(result.std, np.broadcast_to(result.gamma, (3, 8)), rtol=1e-2)
        assert result.mean_change.max() < 1e-12
    else:
        assert result.gamma is None and np.median(result.mean_change) > 0.01


def test_bias_gradient_before_bn_is_zero():
    result = ch3.bias_gradient_before_bn(device="cpu")
    assert np.abs(result.bias_grad).max() < 1e-12
    assert np.abs(result.weight_grad).max() > 1e-5
    assert result.output_change < 1e-10


def test_bias_during_training_small():
    result = ch3.bias_during_training(steps=10, width=8, device="cpu")
    assert len(result.bias_change) == 2
    assert max(result.bias_change) < 1e-5 < min(result.weight_change)


def test_compare_affine_small():
    result = ch3.compare_affine(steps=10, depth=2, width=8, eval_every=5, device="cpu")
    assert set(result.histories) == {"BN", "BN (no affine)", "linear"}
    assert len(result.gamma) == len(result.beta) == 2 and result.gamma[0].shape == (8,)
    assert not np.allclose(result.gamma[0], 1.0)
    assert all(len(v) == 2 for v in result.linearity.values())
    losses = result.histories["BN"].train_loss
    assert result.final_train_loss("BN", last=4) == pytest.approx(float(np.mean(losses[-4:])))
    assert result.final_train_loss("BN") == pytest.approx(float(np.mean(losses)))  # all 10
