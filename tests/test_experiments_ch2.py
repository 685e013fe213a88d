"""Tests of bncourse.experiments.ch2: small arguments, the properties the chapter relies on."""

from __future__ import annotations

import numpy as np
import pytest

from bncourse import numpy_bn
from bncourse.data import load_digits
from bncourse.experiments import ch2
from bncourse.models import make_mlp
from bncourse.training import train


def test_finite_difference_gradient_of_a_quadratic():
    x = np.array([[1.0, -2.0], [0.5, 3.0]])
    grad = ch2.finite_difference_gradient(lambda v: float(np.sum(v**2)), x)
    assert np.allclose(grad, 2 * x, atol=1e-8)
    assert np.array_equal(x, [[1.0, -2.0], [0.5, 3.0]])  # input untouched


def test_finite_differences_agree_with_the_closed_form_backward():
    rng = np.random.default_rng(0)
    x, g = rng.normal(2.0, 3.0, size=(6, 2)), rng.standard_normal((6, 2))
    gamma, beta = np.array([1.5, 0.5]), np.array([0.0, 1.0])
    _, cache = numpy_bn.batch_norm_forward(x, gamma, beta)
    dx = numpy_bn.batch_norm_backward(g, cache)[0]

    def loss(v):
        return float(np.sum(g * numpy_bn.batch_norm_forward(v, gamma, beta)[0]))

    assert np.allclose(ch2.finite_difference_gradient(loss, x), dx, rtol=1e-6, atol=1e-8)


def test_whitening_estimation_error_shapes_and_rank():
    result = ch2.whitening_estimation_error(dim=8, batch_sizes=(4, 8, 64), trials=3, seed=1)
    assert result.rank.tolist() == [3, 7, 8]
    assert result.bn_error.shape == result.whitening_error.shape == (3,)
    assert np.all(result.whitening_error > result.bn_error)
    assert result.true_condition == pytest.approx(100.0, rel=1e-3)


def test_whitening_costs_more_than_batch_norm():
    flops = ch2.whitening_flops(dim=64, batch_size=32)
    assert flops["whitening"] > 50 * flops["bn"]
    seconds = ch2.time_whitening_and_batch_norm(dim=64, batch_size=32, repeats=2)
    assert set(seconds) == {"bn", "whitening"} and all(t > 0 for t in seconds.values())


def test_ignored_normalization_drifts_and_learns_nothing():
    demo = ch2.ignored_normalization_demo(steps=10, seed=2)
    steps = demo.steps
    assert np.allclose(demo.bias_ignored, steps * demo.bias_ignored[0])  # linear drift
    assert np.ptp(demo.loss_ignored) < 1e-12
    assert np.all(np.abs(demo.bias_through) < 1e-12)


def test_scale_invariance_of_output_and_gradient():
    result = ch2.scale_invariance(scale=5.0, batch_size=16, seed=3)
    assert np.allclose(result.output, result.scaled_output, atol=1e-3)
    assert np.allclose(5.0 * result.scaled_grad, result.grad, rtol=1e-3, atol=1e-6)
    assert np.allclose((result.weight * result.grad).sum(axis=1), 0.0, atol=1e-4)
    assert np.allclose(result.scaled_input_grad, result.input_grad, rtol=1e-3, atol=1e-6)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_sweeps_return_one_accuracy_per_value(digits):
    sweep = ch2.learning_rate_sweep(lrs=(0.1, 1.0), data=digits, width=16, steps=5, device="cpu")
    assert sweep.name == "lr" and sweep.values.tolist() == [0.1, 1.0]
    assert set(sweep.accuracy) == {"no BN", "BN"}
    assert all(a.shape == (2,) and np.all((a >= 0) & (a <= 1)) for a in sweep.accuracy.values())
    # each entry is the final test accuracy of that run, trained on its own
    model = make_mlp(64, 10, depth=3, width=16, activation="sigmoid", norm="bn",
                     bn_impl="torch", init_scale=4.0, seed=0)  # fmt: skip
    alone = train(model, digits, steps=5, lr=1.0, seed=0, device="cpu", eval_every=0)
    assert sweep.accuracy["BN"][1] == alone.final_test_accuracy
    init = ch2.init_scale_sweep(init_scales=(1.0,), data=digits, width=16, steps=5, device="cpu")
    assert init.name == "init_scale" and "init_scale" not in init.config


def test_sweep_trains_is_the_threshold_mask():
    sweep = ch2.Sweep("lr", np.array([0.1, 1.0, 10.0]), {"BN": np.array([0.5, 0.9, 0.1])}, {})
    assert sweep.trains("BN", 0.5).tolist() == [True, True, False]
    assert sweep.trains("BN", 0.91).tolist() == [False, False, False]


def test_sweep_is_deterministic(digits):
    runs = [
        ch2.init_scale_sweep(init_scales=(3.0,), data=digits, width=16, steps=20, device="cpu")
        for _ in range(2)
    ]
    for label in ("no BN", "BN"):
        assert np.array_equal(runs[0].accuracy[label], runs[1].accuracy[label])


def test_saturation_record(digits):
    result = ch2.saturation_over_training(
        data=digits, depth=2, width=16, steps=20, record_every=5, device="cpu"
    )
    assert result.steps.tolist() == [0, 5, 10, 15]
    for label in ("no BN", "BN"):
        fraction = result.fraction[label]
        assert fraction.shape == (4, 2) and np.all((fraction >= 0) & (fraction <= 1))
        assert result.final_preactivations[label].shape == (60, 16)
    assert result.threshold == pytest.approx(np.log(19.0))


def test_saturation_counts_large_inputs(digits):
    # with huge initial weights and no BN, most sigmoid inputs start saturated
    result = ch2.saturation_over_training(
        data=digits, depth=1, width=16, steps=1, record_every=1, init_scale=100.0, device="cpu"
    )
    assert result.fraction["no BN"][0, 0] > 0.5
    assert result.fraction["BN"][0, 0] < 0.05


def test_batch_noise_shrinks_with_batch_size():
    noise = ch2.batch_noise(batch_sizes=(4, 64), trials=50, units=4, seed=0)
    assert noise.outputs[4].shape == (50, 4)
    assert noise.spread[1] < 0.5 * noise.spread[0]
    assert np.all(noise.predicted_spread > 0)
    assert noise.population_output.shape == (4,)


def test_draw_computational_graph():
    from bncourse import plotting

    fig, ax = plotting.subplots(1, 1)
    ch2.draw_computational_graph(ax)
    assert len([t for t in ax.texts if t.get_text()]) == 8
    import matplotlib.pyplot as plt

    plt.close(fig)
