"""Tests of bncourse.training: learning on digits, determinism, evaluation, activation records."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from bncourse.data import BatchSampler, load_digits
from bncourse.models import make_mlp
from bncourse.training import (
    ActivationRecord,
    TrainingHistory,
    _percentiles_over_batch,
    evaluate,
    learning_rate_sweep,
    train,
)


@pytest.fixture(scope="module")
def data():
    return load_digits()


def _mlp(norm=None, seed=0, **kwargs):
    return make_mlp(64, 10, depth=3, width=100, norm=norm, bn_impl="torch", seed=seed, **kwargs)


@pytest.mark.parametrize("norm", [None, "bn"])
def test_sigmoid_mlp_learns_digits(data, norm):
    model = _mlp(norm)
    history = train(model, data, steps=600, lr=3.0, eval_every=100, device="cpu")
    assert isinstance(history, TrainingHistory)
    assert history.train_loss[-50:].mean() < 0.5 * history.train_loss[:50].mean()
    assert history.test_loss[-1] < history.test_loss[0]
    assert history.final_test_accuracy > 0.8
    assert history.train_accuracy[-50:].mean() > 0.8
    assert model.training  # left in training mode
    assert history.activations == {}


def test_bn_learns_faster_than_plain_sigmoid(data):
    kwargs = dict(steps=300, lr=0.5, eval_every=50, device="cpu")
    plain = train(_mlp(None), data, **kwargs)
    bn = train(_mlp("bn"), data, **kwargs)
    assert bn.steps_to_accuracy(0.9) is not None
    assert plain.steps_to_accuracy(0.9) is None
    assert bn.final_test_accuracy > plain.final_test_accuracy + 0.3


def test_history_layout(data):
    history = train(_mlp(), data, steps=60, eval_every=25, device="cpu")
    np.testing.assert_array_equal(history.train_steps, np.arange(60))
    assert history.train_loss.shape == (60,) and history.train_accuracy.shape == (60,)
    np.testing.assert_array_equal(history.eval_steps, [0, 25, 50, 60])
    assert history.test_loss.shape == (4,) and history.test_accuracy.shape == (4,)
    assert history.config["steps"] == 60 and history.config["device"] == "cpu"
    assert history.wall_time > 0 and history.steps_per_second > 0
    assert history.final_test_accuracy == history.test_accuracy[-1]
    assert history.final_test_loss == history.test_loss[-1]
    exact = train(_mlp(), data, steps=50, eval_every=25, device="cpu")
    np.testing.assert_array_equal(exact.eval_steps, [0, 25, 50])
    ends = train(_mlp(), data, steps=30, eval_every=0, device="cpu")
    np.testing.assert_array_equal(ends.eval_steps, [0, 30])


def test_first_eval_is_the_initial_model(data):
    model = _mlp("bn")
    initial = evaluate(copy.deepcopy(model), data.x_test, data.y_test)
    history = train(model, data, steps=5, device="cpu")
    assert history.test_loss[0] == pytest.approx(initial[0], rel=1e-6)
    assert history.test_accuracy[0] == pytest.approx(initial[1])


def test_steps_to_accuracy():
    history = TrainingHistory(
        train_steps=np.arange(100),
        train_loss=np.zeros(100, np.float32),
        train_accuracy=np.zeros(100, np.float32),
        eval_steps=np.array([0, 25, 50, 75, 100]),
        test_loss=np.ones(5),
        test_accuracy=np.array([0.1, 0.5, 0.92, 0.9, 0.95]),
    )
    assert history.steps_to_accuracy(0.9) == 50
    assert history.steps_to_accuracy(0.95) == 100
    assert history.steps_to_accuracy(0.1) == 0
    assert history.steps_to_accuracy(0.99) is None
    assert history.final_test_accuracy == 0.95


@pytest.mark.parametrize("norm", [None, "bn"])
def test_same_seed_same_history(data, norm):
    kwargs = dict(steps=40, lr=0.5, momentum=0.5, eval_every=10, record_every=10, device="cpu")
    first = train(_mlp(norm), data, seed=3, **kwargs)
    again = train(_mlp(norm), data, seed=3, **kwargs)
    np.testing.assert_array_equal(first.train_loss, again.train_loss)
    np.testing.assert_array_equal(first.test_accuracy, again.test_accuracy)
    np.testing.assert_array_equal(first.test_loss, again.test_loss)
    for layer in first.activations:
        np.testing.assert_array_equal(
            first.activations[layer].percentiles, again.activations[layer].percentiles
        )
    other = train(_mlp(norm), data, seed=4, **kwargs)
    assert not np.array_equal(first.train_loss, other.train_loss)


def test_optimizers(data):
    adam = train(_mlp("bn"), data, steps=100, lr=1e-2, optimizer="adam", device="cpu")
    assert adam.final_test_accuracy > 0.8


def _weight_norm(model: nn.Module, kind: type) -> float:
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, kind)]
    return float(sum(w.square().sum() for w in weights))


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.5), ("adam", 1e-2)])
def test_weight_decay_shrinks_every_kind_of_weight(data, optimizer, lr):
    """The penalty reaches the linear weights and BN's gamma, with either optimizer."""
    plain, decayed = _mlp("bn"), _mlp("bn")
    kwargs = dict(steps=40, lr=lr, optimizer=optimizer, eval_every=0, device="cpu")
    train(plain, data, **kwargs)
    train(decayed, data, weight_decay=0.05, **kwargs)
    for kind in (nn.Linear, nn.BatchNorm1d):
        assert _weight_norm(decayed, kind) < 0.97 * _weight_norm(plain, kind), kind


def test_record_shapes(data):
    history = train(_mlp("bn"), data, steps=35, record_every=10, device="cpu")
    assert sorted(history.activations) == [0, 1, 2]
    record = history.activations[1]
    assert isinstance(record, ActivationRecord)
    np.testing.assert_array_equal(record.steps, [0, 10, 20, 30])
    assert record.mean.shape == (4, 100) and record.std.shape == (4, 100)
    assert record.percentiles.shape == (4, 100, 3)
    np.testing.assert_array_equal(record.units, np.arange(100))
    np.testing.assert_array_equal(record.levels, [15, 50, 85])
    assert np.all(np.diff(record.percentiles, axis=2) >= 0)  # 15th <= 50th <= 85th
    assert record.unit_percentiles(7).shape == (4, 3)

    subset = train(
        _mlp(),
        data,
        steps=21,
        record_every=5,
        record_layers=[-1, 0],
        record_units=[3, 50, 99],
        percentiles=(5, 25, 50, 75, 95),
        device="cpu",
    )
    assert sorted(subset.activations) == [0, 2]
    record = subset.activations[2]
    np.testing.assert_array_equal(record.steps, [0, 5, 10, 15, 20])
    np.testing.assert_array_equal(record.units, [3, 50, 99])
    assert record.mean.shape == (5, 3) and record.percentiles.shape == (5, 3, 5)
    np.testing.assert_array_equal(record.unit_percentiles(50), record.percentiles[:, 1])
    with pytest.raises(ValueError, match="unit 4 was not recorded"):
        record.unit_percentiles(4)


@pytest.mark.parametrize("norm", [None, "bn"])
def test_records_match_direct_computation_on_the_batch(data, norm):
    """The statistics at step t are those of the model after t updates on batch t."""
    initial = _mlp(norm)
    kwargs = dict(lr=0.5, batch_size=60, seed=2, device="cpu", eval_every=0)
    history = train(copy.deepcopy(initial), data, steps=12, record_every=5, **kwargs)
    batches = BatchSampler(data.num_train, 60, seed=2).take(11)
    x_train = torch.as_tensor(data.x_train)
    for row, step in enumerate([0, 5, 10]):
        replay = copy.deepcopy(initial)
        if step:
            train(replay, data, steps=step, **kwargs)
        with torch.no_grad():
            _, preactivations = replay.forward_with_preactivations(x_train[batches[step]])
        for layer, z in enumerate(preactivations):
            z = z.numpy()
            record = history.activations[layer]
            np.testing.assert_allclose(record.mean[row], z.mean(axis=0), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(record.std[row], z.std(axis=0), rtol=1e-4, atol=1e-5)
            expected = np.percentile(z, [15, 50, 85], axis=0).T
            np.testing.assert_allclose(record.percentiles[row], expected, rtol=1e-4, atol=1e-5)
            if norm == "bn":  # BN's output in training mode has mean beta on its own batch
                beta = replay.hidden[layer].norm.bias.detach().numpy()
                np.testing.assert_allclose(record.mean[row], beta, atol=1e-5)


@pytest.mark.parametrize("use_numpy", [None, True, False])
@pytest.mark.parametrize("batch", [1, 2, 37, 60])
def test_percentiles_over_batch_matches_numpy(use_numpy, batch):
    z = torch.randn(batch, 6)
    levels = np.array([0.0, 15.0, 50.0, 85.0, 100.0])
    expected = np.percentile(z.numpy(), levels, axis=0).T
    result = _percentiles_over_batch(z, levels, use_numpy=use_numpy)
    assert result.shape == (6, 5) and result.dtype == torch.float32
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_percentiles_and_training_on_cuda(data):
    z = torch.randn(37, 6)
    levels = np.array([15.0, 50.0, 85.0])
    on_gpu = _percentiles_over_batch(z.cuda(), levels).cpu().numpy()
    np.testing.assert_allclose(on_gpu, np.percentile(z.numpy(), levels, axis=0).T, rtol=1e-5)
    history = train(_mlp("bn"), data, steps=200, lr=0.5, record_every=10, device="cuda")
    assert history.final_test_accuracy > 0.8
    assert history.activations[0].percentiles.shape == (20, 100, 3)


class _TinyConvNet(nn.Module):
    """A model whose pre-activations are feature maps (N, C, H, W)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.output = nn.Linear(4 * 64, 10)

    def forward_with_preactivations(self, x):
        z = self.conv(x)
        return self.output(torch.relu(z).flatten(1)), [z]

    def forward(self, x):
        return self.forward_with_preactivations(x)[0]


def test_feature_map_records_are_per_channel():
    images = load_digits(flatten=False)
    torch.manual_seed(0)
    model = _TinyConvNet()
    initial = copy.deepcopy(model)
    history = train(model, images, steps=3, record_every=5, device="cpu")
    record = history.activations[0]
    assert record.mean.shape == (1, 4) and record.percentiles.shape == (1, 4, 3)
    batch = BatchSampler(images.num_train, 60, seed=0).take(1)[0]
    with torch.no_grad():
        z = initial.conv(torch.as_tensor(images.x_train[batch])).numpy()
    per_channel = z.transpose(1, 0, 2, 3).reshape(4, -1)
    np.testing.assert_allclose(record.mean[0], per_channel.mean(axis=1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(record.std[0], per_channel.std(axis=1), rtol=1e-4, atol=1e-5)


def test_evaluate(data):
    model = _mlp("bn")
    train(model, data, steps=50, lr=0.5, device="cpu")
    assert model.training
    loss, accuracy = evaluate(model, data.x_test, data.y_test)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(data.x_test))
    labels = torch.as_tensor(data.y_test)
    assert loss == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert accuracy == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    chunked = evaluate(model, data.x_test, data.y_test, batch_size=64)
    assert chunked[0] == pytest.approx(loss, rel=1e-5) and chunked[1] == accuracy
    assert not model.training  # eval mode restored too


def test_cpu_threads_restored(data):
    before = torch.get_num_threads()
    train(_mlp(), data, steps=2, device="cpu", cpu_threads=1)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"optimizer": "rmsprop"}, ValueError, r"optimizer must be one of \('sgd', 'adam'\)"),
        ({"optimizer": "adam", "momentum": 0.9}, ValueError, "momentum applies to"),
        ({"steps": 0}, ValueError, "steps must be positive"),
        ({"eval_every": -1}, ValueError, "eval_every must be >= 0"),
        ({"record_every": 5, "record_layers": [3]}, ValueError, "layer 3 does not exist"),
        ({"record_every": 5, "record_units": [100]}, ValueError, "record_units must be"),
        ({"record_every": 5, "percentiles": (50, 101)}, ValueError, "percentiles must be"),
        ({"batch_size": 5000}, ValueError, "batch_size=5000 is larger"),
        ({"cpu_threads": 0}, ValueError, "cpu_threads must be"),
    ],
)
def test_argument_errors(data, kwargs, error, match):
    with pytest.raises(error, match=match):
        train(_mlp(), data, device="cpu", **{"steps": 5, **kwargs})


def test_recording_needs_preactivations(data):
    model = nn.Sequential(nn.Linear(64, 10))
    with pytest.raises(TypeError, match="forward_with_preactivations"):
        train(model, data, steps=5, record_every=1, device="cpu")
    assert train(model, data, steps=5, device="cpu").train_loss.shape == (5,)
    with pytest.raises(TypeError, match="Dataset"):
        train(model, (data.x_train, data.y_train), steps=5)


def test_results_do_not_depend_on_thread_count(data):
    one = train(_mlp("bn"), data, steps=30, lr=0.5, device="cpu", cpu_threads=1)
    two = train(_mlp("bn"), data, steps=30, lr=0.5, device="cpu", cpu_threads=2)
    np.testing.assert_allclose(one.train_loss, two.train_loss, rtol=1e-4)
    np.testing.assert_allclose(one.test_loss, two.test_loss, rtol=1e-4)


def test_callback_sees_every_update_with_its_batch(data):
    model = _mlp()
    seen = []

    def callback(step, model_, inputs, labels):
        assert model_ is model and model_.training
        assert inputs.shape == (10, 64) and labels.shape == (10,)
        assert all(p.grad is not None for p in model_.parameters())
        seen.append((step, labels.clone()))

    train(model, data, steps=5, batch_size=10, eval_every=0, callback=callback, device="cpu")
    assert [step for step, _ in seen] == [1, 2, 3, 4, 5]
    sampler = iter(BatchSampler(data.num_train, 10, seed=0))
    for _, labels in seen:
        np.testing.assert_array_equal(labels.numpy(), np.asarray(data.y_train)[next(sampler)])


def test_preactivation_callback_sees_the_recorded_forward_passes(data):
    seen = {}

    def record(step, preactivations):
        seen[step] = [z.detach().clone() for z in preactivations]

    history = train(_mlp("bn"), data, steps=25, record_every=10, device="cpu",
                    preactivation_callback=record)  # fmt: skip
    assert sorted(seen) == [0, 10, 20]
    for row, step in enumerate(history.activations[0].steps):
        z = seen[int(step)][0]
        np.testing.assert_allclose(history.activations[0].mean[row], z.mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="record_every > 0"):
        train(_mlp(), data, steps=2, preactivation_callback=record, device="cpu")


def test_freeze_batch_norm_keeps_statistics_and_trains_the_rest(data):
    model = _mlp("bn")
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    before = [bn.running_mean.clone() for bn in norms]
    linear_before = model.state_dict()[next(k for k in model.state_dict() if "weight" in k)]
    linear_before = linear_before.clone()
    modes = []
    train(model, data, steps=30, eval_every=10, lr=0.5, device="cpu", freeze_batch_norm=True,
          callback=lambda *args: modes.append([bn.training for bn in norms]))  # fmt: skip
    assert modes and not any(any(step) for step in modes)  # frozen, also after evaluations
    for bn, mean in zip(norms, before, strict=True):
        torch.testing.assert_close(bn.running_mean, mean, rtol=0, atol=0)
        assert int(bn.num_batches_tracked) == 0
    assert any(bn.weight.grad is not None for bn in norms)
    first_weight = model.state_dict()[next(k for k in model.state_dict() if "weight" in k)]
    assert not torch.equal(first_weight, linear_before)


def test_learning_rate_sweep_trains_each_triple_like_train(data):
    sweep = learning_rate_sweep(lambda norm, seed: _mlp(norm, seed=seed), data, lrs=(0.1, 1.0),
                                seeds=(0, 1), steps=5, eval_every=0, device="cpu")  # fmt: skip
    assert list(sweep) == [(n, lr, s) for n in (None, "bn") for lr in (0.1, 1.0) for s in (0, 1)]
    alone = train(_mlp("bn", seed=1), data, lr=1.0, seed=1, steps=5, eval_every=0, device="cpu")
    np.testing.assert_array_equal(sweep[("bn", 1.0, 1)].train_loss, alone.train_loss)
    assert not np.array_equal(sweep[("bn", 1.0, 0)].train_loss, alone.train_loss)


def test_given_batches_replace_the_sampler(data):
    sampler = iter(BatchSampler(data.num_train, 60, seed=3))
    given = [next(sampler) for _ in range(8)]
    same = train(_mlp(), data, steps=8, seed=3, eval_every=0, device="cpu")
    other = train(_mlp(), data, steps=8, seed=3, eval_every=0, device="cpu", batches=given[::-1])
    again = train(_mlp(), data, steps=8, seed=3, eval_every=0, device="cpu", batches=given)
    np.testing.assert_array_equal(again.train_loss, same.train_loss)
    assert not np.array_equal(other.train_loss, same.train_loss)
    by_class = [np.flatnonzero(np.asarray(data.y_train) == label)[:7] for label in range(10)]
    history = train(_mlp(), data, steps=3, eval_every=0, device="cpu", batches=by_class)
    correct = history.train_accuracy * 7
    np.testing.assert_allclose(correct, np.round(correct), atol=1e-5)  # fractions of 7, not 60
    with pytest.raises(ValueError, match="fewer than steps=4"):
        train(_mlp(), data, steps=4, eval_every=0, device="cpu", batches=given[:3])
