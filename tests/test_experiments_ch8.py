"""Tests of bncourse.experiments.ch8: the functions, and the chapter's claims over seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bncourse.batch_variants import BatchRenorm, GhostBatchNorm
from bncourse.experiments import ch8

SEEDS = (0, 1, 2, 3)


def test_make_model_variants():
    x = torch.randn(8, 64)
    assert sum(isinstance(m, GhostBatchNorm) for m in ch8.make_model("bn", 4).modules()) == 2
    renorm = ch8.make_model("renorm", 4)
    assert all(m.virtual_batch_size == 4 for m in renorm.modules() if isinstance(m, BatchRenorm))
    group = ch8.make_model("gn")
    assert sum(isinstance(m, nn.GroupNorm) for m in group.modules()) == 2
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in group.modules())
    # the same initial weights for every normalisation
    plain = ch8.make_model("bn")
    torch.testing.assert_close(group.hidden[0].linear.weight, plain.hidden[0].linear.weight)
    assert ch8.make_model("bn", kind="cnn")(x.view(8, 1, 8, 8)).shape == (8, 10)
    with pytest.raises(ValueError, match="norm"):
        ch8.make_model("ln")
    with pytest.raises(ValueError, match="kind"):
        ch8.make_model("bn", kind="rnn")


def test_class_sorted_batches_have_one_class_per_device():
    labels = np.repeat(np.arange(10), 20)
    batches = ch8.class_sorted_batches(labels, 32, 4, steps=5, seed=1)
    assert len(batches) == 5 and all(b.shape == (32,) for b in batches)
    for batch in batches:
        per_device = labels[batch].reshape(8, 4)
        assert np.all(per_device == per_device[:, :1])
        assert len(np.unique(batch)) == 32
        assert len(np.unique(per_device[:, 0])) == 8  # 8 devices, 8 different classes
    with pytest.raises(ValueError, match="multiple"):
        ch8.class_sorted_batches(labels, 30, 4, steps=1)


def test_sorted_training_sees_one_class_per_device(monkeypatch):
    seen = []
    original = ch8.train

    def recording_train(*args, **kwargs):
        kwargs["callback"] = lambda step, model, inputs, labels: seen.append(labels.cpu())
        return original(*args, **kwargs)

    monkeypatch.setattr(ch8, "train", recording_train)
    ch8.train_per_device("gn", 4, steps=5, sorted_by_class=True, seed=1)
    assert len(seen) == 5
    for labels in seen:
        per_device = labels.view(8, 4)
        assert torch.all(per_device == per_device[:, :1])
    seen.clear()
    ch8.train_per_device("bn", None, steps=3, sorted_by_class=True, class_block=8, seed=1)
    assert all(torch.all(labels.view(4, 8) == labels.view(4, 8)[:, :1]) for labels in seen)


def test_statistics_noise_follows_one_over_sqrt_m():
    noise = ch8.statistics_noise((2, 8, 32), draws=400, seed=1)
    np.testing.assert_allclose(noise["mean_error"], 1 / np.sqrt([2, 8, 32]), rtol=0.15)
    assert np.all(np.diff(noise["std_error"]) < 0)


def test_accumulation_is_ghost_batch_norm():
    result = ch8.accumulation_experiment(batch_size=16, micro=4, seed=2)
    assert result["gap_to_ghost"] < 1e-10
    assert result["gap_to_large_batch"] > 0.1
    assert result["tracked_accumulated"] == 4 and result["tracked_large"] == 1
    assert result["running_mean_gap"] > 0.1


def test_train_per_device_small_run():
    run = ch8.train_per_device("bn", 4, steps=20, seed=0)
    assert run.per_device == 4 and run.steps == 20
    assert 0.0 <= run.test_accuracy <= 1.0
    assert run.test_accuracy > 0.3  # 20 updates already beat chance (10%)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_chapter_claims_on_per_device_batches(seed):
    runs = {
        (r.norm, r.per_device): r
        for r in ch8.per_device_sweep((2, 4, 8, 32), norms=("bn", "renorm", "gn"), seed=seed)
    }
    bn = {m: runs["bn", m] for m in (2, 4, 8, 32)}
    assert bn[32].test_accuracy > 0.95
    assert bn[32].test_accuracy - bn[2].test_accuracy > 0.15
    assert bn[2].train_accuracy < 0.6
    assert bn[32].test_accuracy - bn[4].test_accuracy < 0.05
    assert bn[8].test_accuracy > bn[2].test_accuracy + 0.15
    assert bn[32].test_accuracy - bn[8].test_accuracy < 0.03
    assert bn[8].train_accuracy < bn[32].train_accuracy
    assert runs["renorm", 2].test_accuracy - bn[2].test_accuracy > 0.08
    assert runs["renorm", 4].test_accuracy >= bn[4].test_accuracy - 0.01
    assert runs["gn", 2].test_accuracy - bn[2].test_accuracy > 0.2
    assert abs(runs["gn", 32].test_accuracy - bn[32].test_accuracy) < 0.03


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_chapter_claims_on_one_image_per_device(seed):
    result = ch8.batch_size_one_experiment(steps=300, seed=seed)
    single, batch = result["1 image per device"], result["32 images per device"]
    assert single["test_running"] > 0.95
    assert batch["test_running"] - single["test_running"] < 0.03
    assert abs(single["test_per_image"] - single["test_running"]) < 0.02


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_chapter_claims_on_batches_sorted_by_class(seed):
    shuffled = ch8.train_per_device("bn", 4, seed=seed).test_accuracy
    runs = {
        norm: ch8.train_per_device(norm, 4, sorted_by_class=True, seed=seed).test_accuracy
        for norm in ("bn", "renorm", "gn")
    }
    synchronised = ch8.train_per_device("bn", None, sorted_by_class=True, class_block=4, seed=seed)
    assert runs["bn"] < 0.2
    assert shuffled - runs["bn"] > 0.6
    assert runs["renorm"] - runs["bn"] > 0.2
    assert runs["renorm"] < 0.8
    assert runs["gn"] > 0.9
    assert synchronised.test_accuracy > 0.9


@pytest.mark.slow
def test_sync_demo_on_two_processes():
    demo = ch8.run_sync_demo(world_size=2, seed=1)
    assert demo.output_gap < 1e-12 and demo.grad_gap < 1e-12 and demo.running_var_gap < 1e-12
    assert all(v < 1e-6 for v in demo.weight_spread.values())
    assert demo.running_mean_spread["no broadcast"] > 1e-3
    assert demo.running_mean_spread["broadcast"] > 1e-4
    assert demo.running_mean_spread["SyncBatchNorm"] < 1e-6
    assert demo.numbers_per_layer["forward_sent"] == 129
