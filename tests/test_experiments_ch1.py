"""Tests of bncourse.experiments.ch1 on small, fast settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bncourse.data import load_digits
from bncourse.experiments import ch1
from bncourse.models import make_mlp


def test_standardize_own_and_given_statistics():
    x = np.array([[1.0, 10.0], [3.0, 30.0]])
    np.testing.assert_allclose(ch1.standardize(x), [[-1.0, -1.0], [1.0, 1.0]])
    np.testing.assert_allclose(ch1.standardize(x, np.array([1.0, 0.0]), 2.0), [[0, 5], [1, 15]])


def test_shift_classifier_experiment_story():
    result = ch1.shift_classifier_experiment(n=1000, seed=0)
    assert result.source > 0.98
    assert result.own_statistics["location_scale"] > result.source - 0.03
    assert result.training_statistics["location_scale"] < result.source - 0.1
    assert result.own_statistics["shape"] < result.source - 0.08
    # the labels are [z1 + z2 > 0]: the fitted boundary is close to that line
    assert result.weights.shape == (2,)
    assert abs(result.weights[0] / result.weights[1] - 1.0) < 0.2
    assert abs(result.intercept / result.weights[0]) < 0.1


def test_batch_statistics_spread_follows_inverse_square_root():
    spread = ch1.batch_statistics_spread(batch_sizes=(16, 64, 256), num_batches=500, seed=0)
    assert spread.batch_sizes.tolist() == [16, 64, 256]
    assert spread.mean_spread.shape == spread.var_spread.shape == (3,)
    assert abs(spread.mean_slope + 0.5) < 0.1 and abs(spread.var_slope + 0.5) < 0.1
    np.testing.assert_allclose(spread.mean_spread, spread.mean_theory, rtol=0.15)
    with pytest.raises(ValueError, match="min_fit_size"):
        ch1.batch_statistics_spread(batch_sizes=(2, 4), num_batches=10)


def test_conditioning_experiment():
    result = ch1.conditioning_experiment(steps=500, seed=0)
    assert result.condition_number["raw"] > 50 * result.condition_number["standardised"]
    assert result.condition_number["standardised"] < 1.5
    assert result.steps_to_tolerance["standardised"] <= 5
    assert result.steps_to_tolerance["raw"] > 100
    assert result.excess_loss["raw"].shape == (501,)
    assert np.all(np.diff(result.excess_loss["raw"]) <= 1e-12)  # gradient descent never goes up


def test_shift_noise_is_random_in_training_and_identity_in_eval():
    torch.manual_seed(0)
    noise = ch1.ShiftNoise(0.5, 1.0)
    y = torch.randn(8, 3)
    first, second = noise(y), noise(y)
    assert not torch.allclose(first, second)
    # one scale and one shift per unit: every column is an affine map of the input column
    for column in range(3):
        slope = np.polyfit(y[:, column].numpy(), first[:, column].numpy(), 1)[0]
        assert slope > 0
        np.testing.assert_allclose(
            first[:, column].numpy(),
            np.polyval(np.polyfit(y[:, column].numpy(), first[:, column].numpy(), 1),
                       y[:, column].numpy()),
            atol=1e-5,
        )  # fmt: skip
    noise.eval()
    assert torch.equal(noise(y), y)
    model = make_mlp(4, 2, depth=2, width=5, norm="bn", seed=0)
    ch1.add_shift_noise(model)
    assert isinstance(model.hidden[0].norm[1], ch1.ShiftNoise)
    with pytest.raises(ValueError, match="needs a model with BN"):
        ch1.add_shift_noise(make_mlp(4, 2, depth=1, width=5, seed=0))


def test_figure1_experiment_small():
    histories = ch1.figure1_experiment(
        steps=60, labels=("no BN", "BN", "BN + noise"), record_every=10, eval_every=20,
        device="cpu",
    )  # fmt: skip
    assert list(histories) == ["no BN", "BN", "BN + noise"]
    for history in histories.values():
        record = history.activations[2]
        assert record.percentiles.shape == (6, 100, 3)
        assert history.eval_steps.tolist() == [0, 20, 40, 60]
        assert ch1.percentile_drift(record) > 0
    # BN pins the sigmoid inputs near N(0, 1) at the start; without BN they are a narrow band
    bn, plain = histories["BN"].activations[2], histories["no BN"].activations[2]
    assert np.median(bn.percentiles[0, :, 2] - bn.percentiles[0, :, 0]) > 1.5
    assert np.median(plain.percentiles[0, :, 2] - plain.percentiles[0, :, 0]) < 0.5
    with pytest.raises(ValueError, match="labels must be among"):
        ch1.figure1_experiment(steps=1, labels=("LN",))


def test_percentile_drift_is_the_mean_range():
    record = ch1.figure1_experiment(steps=20, labels=("BN",), device="cpu")["BN"].activations[2]
    record.percentiles = np.zeros((3, 2, 3), dtype=np.float32)
    record.percentiles[1, 0, :] = 2.0
    record.percentiles[2, 1, :] = -1.0
    assert ch1.percentile_drift(record) == pytest.approx(1.5)


def test_layer_shift_experiment_small():
    result = ch1.layer_shift_experiment(depth=4, width=20, steps=20, measure_every=10, seed=0,
                                        device="cpu")  # fmt: skip
    for label in ("no BN", "BN"):
        assert result.moment_shift[label].shape == (4,)
        assert result.shape_shift[label].shape == (4,)
        assert 0.0 <= result.test_accuracy[label] <= 1.0
    assert result.moment_shift["no BN"][-1] > result.moment_shift["no BN"][0]
    # BN's own inputs (W u) move, its outputs hardly do
    assert result.bn_input_moment_shift.shape == (4,)
    assert np.all(result.bn_input_moment_shift > result.moment_shift["BN"])


def test_translate_digits():
    data = load_digits()
    moved = ch1.translate_digits(data, 1)
    raw = (data.x_test * data.std + data.mean).reshape(-1, 8, 8)
    moved_raw = (moved * data.std + data.mean).reshape(-1, 8, 8)
    np.testing.assert_allclose(moved_raw[:, :, 1:], raw[:, :, :-1], atol=1e-5)
    np.testing.assert_allclose(moved_raw[:, :, 0], 0.0, atol=1e-5)
    np.testing.assert_allclose(ch1.translate_digits(data, 0), data.x_test, atol=1e-5)
    with pytest.raises(ValueError, match="flattened, standardised"):
        ch1.translate_digits(load_digits(flatten=False), 1)


def test_dataset_shift_experiment_small():
    result = ch1.dataset_shift_experiment(steps=150, seed=0, device="cpu")
    assert result.original > 0.8
    assert result.moved < result.original - 0.2
    assert result.moved_own_statistics < result.original - 0.2
    assert result.x_moved.shape == (450, 64)


def test_copy_linear_weights_gives_the_same_start():
    reference = make_mlp(8, 3, depth=3, width=6, norm="bn", seed=0)
    plain = make_mlp(8, 3, depth=3, width=6, norm=None, seed=0)
    # the hidden biases of the plain network shift the generator: different weights from layer 2
    assert not torch.equal(plain.hidden[1].linear.weight, reference.hidden[1].linear.weight)
    biases = [block.linear.bias.clone() for block in plain.hidden]
    ch1.copy_linear_weights(reference, plain)
    for ours, theirs, bias in zip(plain.hidden, reference.hidden, biases, strict=True):
        assert torch.equal(ours.linear.weight, theirs.linear.weight)
        assert torch.equal(ours.linear.bias, bias)
    assert torch.equal(plain.output.weight, reference.output.weight)
    assert torch.equal(plain.output.bias, reference.output.bias)
    with pytest.raises(ValueError, match="depths differ"):
        ch1.copy_linear_weights(reference, make_mlp(8, 3, depth=2, width=6, seed=0))
