"""Tests of bncourse.experiments.ch5 (small arguments, fast)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bncourse import inference, numpy_bn
from bncourse.data import load_digits
from bncourse.experiments import ch5
from bncourse.models import make_cnn


@pytest.fixture(scope="module")
def digits():
    return load_digits(flatten=False)


def test_rows_round_trip_and_order():
    x = np.arange(2 * 3 * 4 * 5, dtype=float).reshape(2, 3, 4, 5)
    rows = ch5.images_to_rows(x)
    assert rows.shape == (2 * 4 * 5, 3)
    # row (n * H + h) * W + w holds the channels of image n at (h, w)
    np.testing.assert_array_equal(rows[(1 * 4 + 2) * 5 + 3], x[1, :, 2, 3])
    np.testing.assert_array_equal(ch5.rows_to_images(rows, x.shape), x)
    with pytest.raises(ValueError, match="N, C, H, W"):
        ch5.images_to_rows(x[0])


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (1, 2, 3, 3), (7, 1, 1, 1)])
def test_spatial_forward_backward_match_direct(shape):
    rng = np.random.default_rng(0)
    x = 3.0 + 2.0 * rng.standard_normal(shape)
    gamma, beta = rng.uniform(0.5, 2, shape[1]), rng.standard_normal(shape[1])
    dy = rng.standard_normal(shape)
    y, cache = ch5.spatial_batch_norm_forward(x, gamma, beta)
    y_direct, cache_direct = numpy_bn.batch_norm_forward(x, gamma, beta)
    np.testing.assert_allclose(y, y_direct, rtol=0, atol=1e-12)
    for got, expected in zip(
        ch5.spatial_batch_norm_backward(dy, cache),
        numpy_bn.batch_norm_backward(dy, cache_direct),
        strict=True,
    ):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-11)


def test_per_location_normalises_each_position_over_the_batch():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((10, 2, 3, 3)) * np.arange(1, 10).reshape(1, 1, 3, 3)
    y = ch5.per_location_batch_norm_forward(x)
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(y.std(axis=0), 1, rtol=1e-4)


def test_compare_with_torch_cpu():
    differences = ch5.compare_with_torch(shape=(3, 2, 4, 3), seed=1, device="cpu")
    assert differences.pop("channels-last kept") == 1.0
    assert len(differences) == 12 and max(differences.values()) < 1e-10


def test_translation_experiment():
    result = ch5.translation_experiment(batch_size=64, channels=3, seed=1)
    assert result.responses.shape == result.per_channel.shape == (2, 3, 8, 8)
    assert result.location_mean.shape == (3, 8, 8) and result.channel_var.shape == (3,)
    assert result.response_gap < 1e-12 and result.channel_gap < 1e-12
    assert result.location_gap_mean > 0.5
    assert result.images[0].sum() == result.images[1].sum() == ch5.PLUS.sum()


def test_statistics_noise_experiment():
    result = ch5.statistics_noise_experiment(batch_size=4, num_batches=30, channels=2, seed=0)
    assert result.values_per_channel == 4 * 64 and result.values_per_location == 4
    assert result.location_mean_error > 3 * result.channel_mean_error


def test_train_cnn_and_sweep_are_reproducible(digits):
    model, history = ch5.train_cnn(
        norm="bn", lr=0.1, steps=6, eval_every=3, data=digits, device="cpu"
    )
    assert list(history.eval_steps) == [0, 3, 6]
    sweep = ch5.learning_rate_sweep(
        lrs=(0.1,), seeds=(0,), steps=6, eval_every=3, data=digits, device="cpu"
    )
    assert set(sweep) == {(None, 0.1, 0), ("bn", 0.1, 0)}
    np.testing.assert_array_equal(sweep[("bn", 0.1, 0)].train_loss, history.train_loss)


def test_folding_matches_in_eval(digits):
    model = make_cnn(norm="bn", bn_impl="torch", seed=0)
    with torch.no_grad():  # a few training-mode passes to move the running statistics
        for _ in range(3):
            model(torch.as_tensor(digits.x_train[:100]))
    folded = inference.fold_batch_norms(model)
    assert model.training and not folded.training
    assert all(isinstance(block.norm, nn.Identity) for block in folded.blocks)
    assert all(block.conv.bias is not None for block in folded.blocks)
    result = ch5.folding_experiment(model, digits)
    assert result.modules_before == 3 and result.modules_after == 0
    assert result.largest_logit_difference < 1e-4 * max(1.0, result.largest_logit)
    assert result.predictions_agree == 1.0
    assert model.training  # left in the mode it was in


def test_initial_signal_scale():
    scales = ch5.initial_signal_scale(batch_size=64, seed=0, channels=(4, 8, 8))
    assert set(scales) == {None, "bn"}
    assert len(scales[None].preactivation_std) == 3
    np.testing.assert_allclose(scales["bn"].preactivation_std, 1.0, atol=2e-2)
    assert scales[None].logit_std > 0


def test_conv_weight_norms_and_their_growth(digits):
    model = make_cnn(norm="bn", seed=3, channels=(4, 8, 8))
    expected = [float(torch.linalg.vector_norm(b.conv.weight.detach())) for b in model.blocks]
    np.testing.assert_allclose(ch5.conv_weight_norms(model), expected, rtol=1e-6)
    growth = ch5.weight_norm_growth(
        lrs=(0.0, 5.0), seed=3, steps=5, channels=(4, 8, 8), data=digits, device="cpu"
    )
    assert set(growth) == {0.0, 5.0} and growth[5.0].shape == (3,)
    np.testing.assert_allclose(growth[0.0], 1.0, rtol=1e-6)  # no step, no growth
    # behind BN the gradient is orthogonal to the weights: every SGD step lengthens them
    assert np.all(growth[5.0] > 1.0)
