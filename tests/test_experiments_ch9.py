"""Chapter 9's experiments: the claims of the chapter hold for seeds 0 to 3."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from bncourse.experiments import ch9
from bncourse.frozen import freeze_batch_norm
from bncourse.precision import FLOAT16_MAX

SEEDS = [0, 1, 2, 3]


@functools.cache
def _pretrained(seed: int):
    return ch9.pretrain(seed=seed, device="cpu")


def test_shift_images():
    x = np.array([[0.0, 0.4, 0.8, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(ch9.shift_images(x, "brightness", 0.5), [[0.5, 0.9, 1.0, 1.0]])
    np.testing.assert_allclose(ch9.shift_images(x, "contrast", 0.5), [[0.25, 0.45, 0.65, 0.75]])
    noisy = ch9.shift_images(np.full((50, 64), 0.5, np.float32), "noise", 0.1, seed=3)
    assert noisy.dtype == np.float32 and 0.05 < noisy.std() < 0.15
    np.testing.assert_array_equal(noisy, ch9.shift_images(np.full((50, 64), 0.5), "noise", 0.1, 3))
    np.testing.assert_array_equal(ch9.shift_images(x, "none", 0), x)
    with pytest.raises(ValueError, match="kind"):
        ch9.shift_images(x, "blur", 1.0)


def test_accumulation_gap_is_zero_without_batch_statistics():
    model, data = _pretrained(0)
    x, y = torch.as_tensor(data.x_train[:32]), torch.as_tensor(data.y_train[:32])
    gap, updates = ch9.accumulation_gap(model, x, y, micro_batches=4)
    frozen_gap, frozen_updates = ch9.accumulation_gap(freeze_batch_norm(model, inplace=False), x, y)
    assert gap > 0.5 and updates == 4
    assert frozen_gap < 1e-5 and frozen_updates == 0


def test_finetune_comparison_averages_its_runs():
    model, data = _pretrained(0)
    result = ch9.finetune_comparison(model, data, batch_sizes=(4,), steps=5, runs=2)
    assert result.runs.shape == (2, 1, 2)
    np.testing.assert_allclose(result.accuracy["BN frozen"], result.runs[1].mean(axis=1))
    with pytest.raises(ValueError, match="runs"):
        ch9.finetune_comparison(model, data, runs=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_finetune_claims(seed):
    model, data = _pretrained(seed)
    result = ch9.finetune_comparison(model, data, seed=seed)
    updating, freezing = result.accuracy["BN updating"], result.accuracy["BN frozen"]
    assert freezing[0] > updating[0] + 0.05
    assert updating[-1] > freezing[-1] - 0.01
    assert updating[-1] > updating[0] + 0.05
    assert freezing.min() > result.before + 0.05
    assert result.adabn > result.before + 0.05


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_shift_claims(seed):
    model, data = _pretrained(seed)
    acc = ch9.shift_and_adapt(model, data, seed=seed).accuracy
    none, ada, tent = acc["no adaptation"], acc["AdaBN"], acc["Tent"]
    for row in (1, 2):  # brightness, contrast
        assert none[row] < none[0] - 0.3
        assert ada[row] > none[0] - 0.05
        assert tent[row] > none[row] + 0.3
    assert none[3] < none[0] - 0.15 and ada[3] < none[0] - 0.15
    assert abs(ada[3] - none[3]) < 0.1
    assert np.all(np.abs(tent - acc["batch statistics"]) < 0.02)
    assert abs(ada[0] - none[0]) < 0.02
    one = ch9.adaptation_on_one_class(model, data, seed=seed)
    assert one.adabn_mixed > one.adabn_one_class + 0.1
    assert one.tent_mixed > 0.9 and one.tent_sorted < 0.4


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_discriminator_claims(seed):
    mixed = ch9.discriminator_batches(mixed=True, seed=seed)
    separate = ch9.discriminator_batches(mixed=False, seed=seed)
    assert mixed.test_accuracy > 0.95
    assert abs(separate.train_accuracy - 0.5) < 0.05 and separate.test_accuracy < 0.65
    leak = ch9.composition_leak(mixed.model, seed=seed)
    assert leak["real"][1] > 0.95 and leak["fake"][1] > 0.95
    assert leak["real"][0] < leak["real"][1] - 0.1
    assert leak["fake"][2] < leak["fake"][1] - 0.1


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_half_precision_and_momentum_claims(seed):
    half = ch9.half_precision_model(seed=seed)
    assert half.largest_running_var > FLOAT16_MAX and half.inf_after_half > 50
    acc = half.accuracy
    assert acc["half()"] < 0.25 and acc["float32"] > 0.9
    assert abs(acc["half(), batch norm kept in float32"] - acc["float32"]) < 0.01
    model, data = _pretrained(seed)
    ported = ch9.momentum_port(model, data, seed=seed)
    assert ported[0.99] < ported[0.01] - 0.04
