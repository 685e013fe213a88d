"""Tests of bncourse.experiments.ch6: small fast runs, and the chapter's claims over seeds 0-3."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bncourse import torch_bn
from bncourse.data import load_digits
from bncourse.experiments import ch6


@pytest.fixture(scope="module")
def data():
    return load_digits()


def test_injected_noise_changes_every_advance_and_is_its_mean_in_eval():
    noise = ch6.InjectedNoise(5, shift_range=1.0, max_scale=2.0, seed=0)
    x = torch.ones(3, 5)
    first = noise(x)
    noise.advance()
    second = noise(x)
    assert not torch.allclose(first, second)
    assert torch.all((noise.scale >= 1) & (noise.scale <= 2))
    assert torch.all(noise.shift.abs() <= 1)
    noise.eval()
    torch.testing.assert_close(noise(x), 1.5 * x)
    with pytest.raises(ValueError, match="max_scale"):
        ch6.InjectedNoise(5, shift_range=1.0, max_scale=0.5)


def test_make_variant():
    noisy = ch6.make_variant("noisy BN", depth=2, width=8)
    assert sum(isinstance(m, ch6.InjectedNoise) for m in noisy.modules()) == 2
    assert ch6.make_variant("no BN", depth=2, width=8).hidden[0].norm is None
    with pytest.raises(ValueError, match="variant"):
        ch6.make_variant("layer norm")


def test_probe_training_small(data):
    runs = ch6.probe_training(steps=20, probe_every=10, depth=2, width=16, data=data, device="cpu")
    assert set(runs) == set(ch6.VARIANTS)
    for run in runs.values():
        np.testing.assert_array_equal(run.probe_steps, [10, 20])
        assert run.shift_l2.shape == run.shift_cosine.shape == (2, 2)
        assert run.probe_losses.shape == (2, 4)
        assert run.train_loss.shape == (20,)
        assert not run.model.training
    # the noise is redrawn between G and G': the noisy network's gradients turn most
    assert runs["noisy BN"].shift_cosine.mean() < runs["BN"].shift_cosine.mean()


def test_steps_to_loss():
    run = ch6.ProbedRun(np.array([3.0] * 10 + [0.1] * 30), 0.9, *([np.zeros(1)] * 9), model=None)
    assert run.steps_to_loss(0.5, window=5) == 14
    assert run.steps_to_loss(0.01, window=5) is None


def test_weight_decay_runs_are_exactly_equivalent_without_eps(data):
    settings = ((0.1, 0.1, 1.0), (0.4, 0.025, 2.0), (0.1, 0.0, 1.0))
    b, c, a = ch6.weight_decay_runs(
        settings, steps=30, depth=2, width=16, bn_eps=1e-12, data=data, device="cpu"
    )
    np.testing.assert_allclose(c.train_loss, b.train_loss, rtol=1e-5)
    np.testing.assert_allclose(c.norms, 2 * b.norms, rtol=1e-5)
    np.testing.assert_allclose(c.effective_lr, b.effective_lr, rtol=1e-5)
    assert b.norms.shape == (31, 2) and b.angles.shape == (30, 2)
    assert np.all(np.diff(a.norms, axis=0) >= 0)  # no decay: the norm only grows
    assert np.all(b.norms[-1] < b.norms[0])
    assert b.equilibrium_angle == pytest.approx(np.sqrt(0.02))


def test_gradients_at_init_small():
    grads = ch6.gradients_at_init(depth=12, width=32, batch_size=32, num_batches=1)
    assert {k: v.shape for k, v in grads.items()} == {
        "BN": (12,),
        "no BN": (12,),
        "residual BN": (12,),
    }
    assert grads["BN"][0] / grads["BN"][-1] > grads["residual BN"][0] / grads["residual BN"][-1]
    with pytest.raises(ValueError, match="unknown network"):
        ch6.gradients_at_init(depth=3, networks=("transformer",))


def test_jacobian_spectra_shapes(data):
    model = ch6.make_variant("BN", depth=2, width=16).eval()
    spectra = ch6.jacobian_spectra({"BN": model}, torch.as_tensor(data.x_test[:3]))
    assert spectra["BN"].shape == (2, 3 * 16)


def test_constant_channel():
    result = ch6.constant_channel((1e-2, 1e-4), gamma=2.0)
    np.testing.assert_array_equal(result.output, [0.0, 0.0])
    np.testing.assert_allclose(result.gain, 2.0 / np.sqrt([1e-2, 1e-4]), rtol=1e-9)
    assert result.weight_gradient[1] == pytest.approx(10 * result.weight_gradient[0], rel=1e-3)


def test_batch_noise_falls_with_batch_size(data):
    model = ch6.make_variant("BN", depth=2, width=16)
    spread = ch6.batch_noise(model, data, (4, 64), num_examples=2, num_batches=20)
    assert spread[1] < 0.6 * spread[0]


def test_ghost_batch_norm_is_batch_norm_per_chunk():
    norm = torch_bn.BatchNorm1d(3)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    ghost = ch6.GhostBatchNorm(norm, 4)
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(0)) * 2 + 1
    chunks = [
        torch_bn.batch_norm(c, None, None, norm.weight, norm.bias, True, 0.0, norm.eps)
        for c in x.split(4)
    ]
    torch.testing.assert_close(ghost(x), torch.cat(chunks))
    expected_var = 0.9 + 0.1 * torch.stack([c.var(0) for c in x.split(4)]).mean(0)
    torch.testing.assert_close(norm.running_var, expected_var)
    ghost.eval()
    torch.testing.assert_close(ghost(x), norm(x))
    with pytest.raises(ValueError, match="ghost_size"):
        ch6.GhostBatchNorm(norm, 1)


def test_generalisation_gap_small(data):
    gap = ch6.generalisation_gap(
        (4, 32), batch_size=32, steps=20, depth=1, width=16, data=data, device="cpu"
    )
    np.testing.assert_array_equal(gap.ghost_sizes, [4, 32])
    np.testing.assert_allclose(gap.gap, gap.test_loss - gap.train_loss)
    assert np.all((gap.test_accuracy > 0.3) & (gap.test_accuracy <= 1))


def test_dropout_variance_shift_small(data):
    result = ch6.dropout_variance_shift(
        ("before", "after"), depth=2, width=32, steps=60, data=data, device="cpu"
    )
    assert result.shift["before"].shape == (2,)
    assert np.all(result.shift["before"] > result.shift["after"])
    with pytest.raises(ValueError, match="position"):
        ch6.DropoutMLP(2, 8, 0.5, "inside")


# --- the chapter's seed-dependent claims, at the notebook's scale, for seeds 0 to 3 -----------


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_chapter_claims_hold_for_seed(seed, data):
    runs = ch6.probe_training(seed=seed, data=data, device="cpu")
    plain, bn, noisy = runs["no BN"], runs["BN"], runs["noisy BN"]
    assert noisy.steps_to_loss(0.3) <= 1.3 * bn.steps_to_loss(0.3)
    assert 3 * bn.steps_to_loss(0.3) < plain.steps_to_loss(0.3)
    assert noisy.test_accuracy > 0.95 and bn.test_accuracy > 0.95
    assert np.median(noisy.shift_l2) > 5 * np.median(bn.shift_l2)
    assert np.median(noisy.shift_cosine) < 0.6 < np.median(bn.shift_cosine)
    assert np.median(bn.shift_cosine) <= np.median(plain.shift_cosine) + 0.005
    assert np.median(bn.shift_relative) > 0.8 * np.median(plain.shift_relative)
    assert np.median(bn.loss_range) < 0.4 * np.median(plain.loss_range)
    assert np.median(bn.gradient_change) < 0.7 * np.median(plain.gradient_change)
    assert np.median(bn.beta_smoothness) > 0.7 * np.median(plain.beta_smoothness)

    spectra = ch6.jacobian_spectra(
        {"no BN": plain.model, "BN": bn.model}, torch.as_tensor(data.x_test[:1])
    )
    bn_median = np.median(spectra["BN"][1:], axis=1)
    assert np.all((bn_median > 0.8) & (bn_median < 1.4))
    assert np.all(np.median(spectra["no BN"], axis=1) < 0.6)
    share = {k: ((v > 0.5) & (v < 2)).mean() for k, v in spectra.items()}
    assert share["no BN"] < share["BN"] < 0.75

    spread = ch6.batch_noise(bn.model, data, (4, 8, 16, 32, 64, 128), num_examples=5, seed=seed)
    slope = np.polyfit(np.log([4, 8, 16, 32, 64, 128]), np.log(spread), 1)[0]
    assert np.all(np.diff(spread) < 0) and -0.6 < slope < -0.3

    a, b, c = ch6.weight_decay_runs(seed=seed, data=data, device="cpu")
    assert np.all(np.diff(a.norms, axis=0) >= 0)
    assert a.norms[-1].mean() < 1.05 * a.norms[0].mean()
    assert b.norms[-1].mean() < 0.3 * b.norms[0].mean()
    assert abs(b.angles[-100:].mean() / b.equilibrium_angle - 1) < 0.15
    assert b.effective_lr[-1].mean() > 10 * a.effective_lr[-1].mean()
    ratio = c.effective_lr / b.effective_lr
    assert np.all(np.abs(ratio[:100] - 1) < 0.01) and np.all(np.abs(ratio - 1) < 0.1)
    window = np.ones(20) / 20

    def smooth(run):
        return np.convolve(run.train_loss, window, mode="valid")

    assert np.max(np.abs(smooth(b) - smooth(c))) < 0.03
    assert np.max(np.abs(smooth(a) - smooth(b))) > 0.05

    grads = ch6.gradients_at_init(seed=seed)
    ratios = {k: v[0] / v[-1] for k, v in grads.items()}
    assert ratios["BN"] > 50 and ratios["BN"] ** (1 / 31) > 1.1
    assert ratios["residual BN"] < 10 and ratios["no BN"] < 1e-5

    gap = ch6.generalisation_gap(seeds=(seed,), data=data, device="cpu")
    assert gap.train_loss[0] > 5 * gap.train_loss[-1]
    assert gap.test_accuracy[0] <= gap.test_accuracy[-1] + 0.005

    shift = ch6.dropout_variance_shift(seed=seed, data=data, device="cpu")
    assert np.all(shift.shift["before"] > 1.3)
    assert np.all(shift.shift["after"] < 1.1) and np.all(shift.shift["none"] < 1.1)
    acc, fixed = shift.accuracy, shift.accuracy_recomputed
    assert acc["before"] < acc["after"] - 0.01
    assert fixed["before"] < acc["after"] - 0.01
    assert abs(acc["after"] - acc["none"]) < 0.015
