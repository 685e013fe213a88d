"""Fast tests of bncourse.experiments.ch4 (small arguments): shapes, invariants, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bncourse.data import load_digits
from bncourse.experiments import ch4
from bncourse.models import make_mlp


@pytest.fixture(scope="module")
def trained():
    return ch4.train_bn_mlp(steps=40, batch_size=30, depth=2, width=32, seed=0, device="cpu")


def test_train_bn_mlp_learns(trained):
    from bncourse.training import evaluate

    model, data = trained
    assert evaluate(model, *data.tensors("cpu")[2:])[1] > 0.6


def test_batch_dependence(trained):
    model, data = trained
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = ch4.batch_dependence(model, data, num_batches=20, batch_size=8, seed=0)
    assert result.train_probability.shape == result.eval_prediction.shape == (20,)
    assert np.ptp(result.eval_probability) < 1e-5  # evaluation mode ignores the batch-mates
    assert np.ptp(result.train_probability) > 1e-3  # training mode does not
    for key, value in model.state_dict().items():  # the model is untouched
        assert torch.equal(value, state[key]), key


def test_variance_bias_matches_theory():
    result = ch4.variance_bias(batch_sizes=(2, 5, 20), trials=20_000, seed=1)
    np.testing.assert_allclose(result.theory, [0.5, 0.8, 0.95])
    np.testing.assert_allclose(result.biased, result.theory, atol=0.03)
    np.testing.assert_allclose(result.unbiased, 1.0, atol=0.03)


def test_statistics_over_training():
    result = ch4.statistics_over_training(
        steps=20, momenta=(0.1, 0.01), eval_every=10, depth=2, width=32, seed=0, device="cpu"
    )
    np.testing.assert_array_equal(result.steps, [0, 10, 20])
    assert set(result.accuracy) == {
        "moving average, momentum 0.1",
        "moving average, momentum 0.01",
        "recomputed",
    }
    assert np.all(result.variance_error["recomputed"] < 1e-4)
    slow, fast = (result.variance_error[f"moving average, momentum {m}"][-1] for m in (0.01, 0.1))
    assert slow > fast  # the slow average lags more


def test_statistics_over_training_measures_against_the_population():
    result = ch4.statistics_over_training(
        steps=2, momenta=(0.1,), eval_every=2, depth=1, width=8, seed=0, device="cpu"
    )
    # at step 0 the moving average still holds its start, variance 1; the population variance
    # of the first BN's input is that of the initial network's first layer on the training split
    model = make_mlp(64, 10, depth=1, width=8, activation="relu", norm="bn", bn_impl="torch",
                     seed=0)  # fmt: skip
    x_train = torch.as_tensor(load_digits(seed=0).x_train)
    with torch.no_grad():
        true_var = model.hidden[0].linear(x_train).var(dim=0, unbiased=True)
    expected = float(torch.log(1.0 / true_var).abs().mean())
    got = result.variance_error["moving average, momentum 0.1"][0]
    assert got == pytest.approx(expected, rel=1e-4)


def test_finetuning_with_frozen_batch_norm_keeps_its_statistics():
    data = load_digits(seed=0)
    model = make_mlp(64, 10, depth=1, width=8, norm="bn", bn_impl="torch", seed=0)
    bn = model.hidden[0].norm
    mean, weight = bn.running_mean.clone(), model.hidden[0].linear.weight.detach().clone()
    ch4._sgd_steps(model, data, 16, 5, 0.1, 0, freeze_batch_norm=True)
    torch.testing.assert_close(bn.running_mean, mean, rtol=0, atol=0)
    assert not torch.equal(model.hidden[0].linear.weight, weight) and model.training
    ch4._sgd_steps(model, data, 16, 5, 0.1, 0)
    assert not torch.equal(bn.running_mean, mean)


def test_experiments_restore_the_thread_count():
    threads = torch.get_num_threads()
    ch4.statistics_over_training(
        steps=2, momenta=(0.1,), eval_every=2, depth=1, width=8, device="cpu", cpu_threads=1
    )
    ch4.small_batch_mismatch(
        batch_sizes=(4,), examples=8, finetune_steps=1, device="cpu", cpu_threads=1
    )
    assert torch.get_num_threads() == threads


def test_statistics_over_training_is_deterministic():
    kwargs = dict(steps=10, momenta=(0.1,), eval_every=5, depth=1, width=16, seed=3, device="cpu")
    first = ch4.statistics_over_training(**kwargs)
    second = ch4.statistics_over_training(**kwargs)
    for key in first.accuracy:
        np.testing.assert_array_equal(first.accuracy[key], second.accuracy[key])


def test_forgotten_eval(trained):
    model, data = trained
    result = ch4.forgotten_eval(model, data, batch_size=32, seed=0)
    assert set(result.accuracy) == {
        "eval mode",
        "train mode, shuffled batches",
        "train mode, batches sorted by class",
    }
    assert result.running_mean_change > 0
    assert result.eval_repeat_difference < 1e-4
    assert result.accuracy["train mode, batches sorted by class"] < result.accuracy["eval mode"]


def test_small_batch_mismatch():
    result = ch4.small_batch_mismatch(
        batch_sizes=(2, 16), examples=320, finetune_steps=10, seed=0, device="cpu"
    )
    for name in (
        "train_mode",
        "eval_mode",
        "disagreement",
        "recomputed",
        "finetuned",
        "test_eval_mode",
        "test_finetuned",
    ):
        values = getattr(result, name)
        assert values.shape == (2,) and np.all((0 <= values) & (values <= 1)), name
    assert result.disagreement[0] > result.disagreement[1]


def test_folding_speedup(trained):
    model, data = trained
    result = ch4.folding_speedup(model, data, batch_sizes=(1, 8), repeats=3, number=2)
    assert result.max_difference < 1e-4
    assert result.same_predictions == 1.0
    assert result.times["with BN"].shape == result.times["folded"].shape == (2, 3)
    assert result.speedup().shape == (2,)
