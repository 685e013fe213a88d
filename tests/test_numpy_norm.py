"""Tests of bncourse.numpy_norm: the general normalisation against torch and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bncourse import numpy_norm as nn_np
from bncourse.utils import finite_difference_gradient


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_batch_norm_matches_torch_training_mode():
    x = _rng().standard_normal((6, 3, 4, 5))
    gamma, beta = _rng(1).standard_normal(3), _rng(2).standard_normal(3)
    y, _ = nn_np.batch_norm(x, gamma, beta, eps=1e-5)
    expected = F.batch_norm(
        torch.tensor(x), None, None, torch.tensor(gamma), torch.tensor(beta), training=True
    )
    np.testing.assert_allclose(y, expected.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("normalized_shape", [(5,), (4, 5)])
def test_layer_norm_and_rms_norm_match_torch(normalized_shape):
    x = _rng().standard_normal((3, 4, 5)) * 3 + 1
    gamma = _rng(1).standard_normal(normalized_shape)
    beta = _rng(2).standard_normal(normalized_shape)
    y, _ = nn_np.layer_norm(x, normalized_shape, gamma, beta)
    t = (torch.tensor(x), normalized_shape, torch.tensor(gamma))
    np.testing.assert_allclose(y, F.layer_norm(*t, torch.tensor(beta)).numpy(), atol=1e-12)
    y, _ = nn_np.rms_norm(x, normalized_shape, gamma, eps=1e-6)
    np.testing.assert_allclose(y, F.rms_norm(*t, eps=1e-6).numpy(), atol=1e-12)


def test_group_and_instance_norm_match_torch():
    x = _rng().standard_normal((2, 6, 3, 4)) + 2
    gamma, beta = _rng(1).standard_normal(6), _rng(2).standard_normal(6)
    xt, gt, bt = torch.tensor(x), torch.tensor(gamma), torch.tensor(beta)
    y, _ = nn_np.group_norm(x, 3, gamma, beta)
    np.testing.assert_allclose(y, F.group_norm(xt, 3, gt, bt).numpy(), atol=1e-12)
    y, _ = nn_np.instance_norm(x, gamma, beta)
    np.testing.assert_allclose(y, F.instance_norm(xt, weight=gt, bias=bt).numpy(), atol=1e-12)


def _finite_difference(f, x, dy):
    """Gradient of the scalar sum(f(x) * dy) by central differences."""
    return finite_difference_gradient(lambda v: float(np.sum(f(v) * dy)), x)


@pytest.mark.parametrize("axes", [(0,), (1,), (0, 2), (1, 2), (-1,)])
@pytest.mark.parametrize("center", [True, False])
def test_backward_matches_finite_differences(axes, center):
    x = _rng().standard_normal((3, 4, 2)) + 0.5
    gamma = _rng(1).standard_normal((1, 4, 1))
    beta = _rng(2).standard_normal((1, 4, 1))
    dy = _rng(3).standard_normal(x.shape)
    y, cache = nn_np.normalize_forward(x, axes, gamma, beta, center=center)
    dx, dgamma, dbeta = nn_np.normalize_backward(dy, cache)

    def forward(inputs):
        return nn_np.normalize_forward(inputs, axes, gamma, beta, center=center)[0]

    np.testing.assert_allclose(dx, _finite_difference(forward, x, dy), rtol=1e-5, atol=1e-7)

    def forward_gamma(g):
        return nn_np.normalize_forward(x, axes, g, beta, center=center)[0]

    expected = _finite_difference(forward_gamma, gamma, dy)
    np.testing.assert_allclose(dgamma, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dbeta, dy.sum(axis=(0, 2), keepdims=True), atol=1e-12)
    assert y.shape == x.shape


def test_parameter_gradients_match_torch_autograd():
    x = _rng().standard_normal((4, 6, 3))
    gamma, beta = _rng(1).standard_normal(6), _rng(2).standard_normal(6)
    dy = _rng(3).standard_normal(x.shape)
    y, cache = nn_np.group_norm(x, 2, gamma, beta)
    grouped = (4, 2, 3, 3)
    dx, dgamma, dbeta = nn_np.normalize_backward(dy.reshape(grouped), cache)
    xt = torch.tensor(x, requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    F.group_norm(xt, 2, gt, bt).backward(torch.tensor(dy))
    np.testing.assert_allclose(dx.reshape(x.shape), xt.grad.numpy(), atol=1e-10)
    np.testing.assert_allclose(dgamma.reshape(6), gt.grad.numpy(), atol=1e-10)
    np.testing.assert_allclose(dbeta.reshape(6), bt.grad.numpy(), atol=1e-10)


def test_rms_backward_has_no_mean_term():
    """Without centring, a constant upstream gradient still reaches x (BN's would cancel)."""
    x = _rng().standard_normal((5, 4))
    dy = np.ones_like(x)
    _, cache = nn_np.normalize_forward(x, 1, center=False)
    dx_rms, _, _ = nn_np.normalize_backward(dy, cache)
    _, cache = nn_np.normalize_forward(x, 1, center=True)
    dx_ln, _, _ = nn_np.normalize_backward(dy, cache)
    assert np.abs(dx_ln).max() < 1e-12
    assert np.abs(dx_rms).max() > 1e-3


def test_float32_stays_float32():
    x = _rng().standard_normal((4, 8)).astype(np.float32)
    y, cache = nn_np.layer_norm(x, 8, np.ones(8, np.float32), np.zeros(8, np.float32))
    assert y.dtype == np.float32
    dx, _, _ = nn_np.normalize_backward(np.ones_like(x), cache)
    assert dx.dtype == np.float32


@pytest.mark.parametrize(
    ("layer", "count"),
    [("BatchNorm", 2 * 3), ("LayerNorm", 4 * 3), ("InstanceNorm", 3), ("GroupNorm", 2 * 3)],
)
def test_shared_statistics_counts(layer, count):
    shared = nn_np.shared_statistics(layer, (2, 4, 3), (1, 0, 2), num_groups=2)
    assert shared.sum() == count
    assert shared[1, 0, 2]


def test_bad_input_raises_clear_errors():
    x = np.zeros((2, 3))
    with pytest.raises(ValueError, match="out of range"):
        nn_np.normalize_forward(x, 2)
    with pytest.raises(ValueError, match="does not broadcast"):
        nn_np.normalize_forward(x, 1, gamma=np.ones(4))
    with pytest.raises(ValueError, match="divisible"):
        nn_np.group_norm(np.zeros((2, 5, 3)), 2)
    with pytest.raises(ValueError, match="normalized_shape"):
        nn_np.layer_norm(x, 4)
    with pytest.raises(ValueError, match="no values"):
        nn_np.normalize_forward(np.zeros((0, 3)), 0)
    with pytest.raises(ValueError, match="layer must be one of"):
        nn_np.shared_statistics("WeightNorm", (2, 2), (0, 0))
