"""Claims of Part I that name seeds, run over exactly those seeds (issue 11, claim 4).

Where a chapter's prose says "over seeds 0 to 4" or "every seed we tried", the notebook runs one
seed to stay fast; each test here runs the same experiment, with the notebook's arguments, for
every seed the prose names and asserts the claim for each seed. One section per chapter, in
order; each test's docstring quotes the sentence it checks. The tests take minutes in all, so
they are marked slow (they still run in the README's test command).
"""

from __future__ import annotations

import numpy as np
import pytest

from bncourse.data import load_digits
from bncourse.experiments import ch1, ch3, ch5

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------------------
# Chapter 1: covariate shift and internal covariate shift
# ---------------------------------------------------------------------------------------------


CH1_SEEDS = range(5)  # "The same holds at seeds 0 to 4", "every seed we tried (0 to 4)"


@pytest.mark.usefixtures("one_torch_thread")  # chapter 1 runs with one thread
@pytest.mark.parametrize("seed", CH1_SEEDS)
def test_ch1_layer_shift_per_layer(seed: int):
    """ "Shifts compound with depth": the moments move a hundredfold more in layer 8 than in
    layer 1 without BN and stay flat with BN; the whole distribution moves more with BN in
    layers 1 to 6 (about ten times more in layer 1), less in layers 7 and 8, and grows about
    fivefold with depth with BN."""
    shift = ch1.layer_shift_experiment(seed=seed)
    moments_plain, moments_bn = shift.moment_shift["no BN"], shift.moment_shift["BN"]
    total_plain, total_bn = shift.shape_shift["no BN"], shift.shape_shift["BN"]
    assert np.all(np.diff(moments_plain) > 0) and moments_plain[-1] > 100 * moments_plain[0]
    assert moments_bn.max() < 4 * moments_bn.min()
    assert shift.bn_input_moment_shift[-1] > 8 * shift.bn_input_moment_shift[0]
    assert np.all(np.diff(total_bn) > 0) and np.all(np.diff(total_plain) > 0)
    assert 3 * total_bn[0] < total_bn[-1] < 8 * total_bn[0], total_bn
    assert total_plain[-1] > 100 * total_plain[0], total_plain
    assert np.all(total_bn[:6] > total_plain[:6]) and total_bn[0] > 8 * total_plain[0]
    assert np.all(total_bn[6:] < total_plain[6:])


@pytest.mark.usefixtures("one_torch_thread")  # chapter 1 runs with one thread
@pytest.mark.parametrize("seed", CH1_SEEDS)
def test_ch1_figure1_drift_speed_and_noise(seed: int):
    """ "The drift without BN is 3.3 to 4.2 times that with BN (the check asks for more than 3),
    and BN reaches 90% about 10 to 18 times sooner (the check asks for at least 8)"; the noisy
    BN network drifts more than the plain one and reaches 90% about as fast as plain BN."""
    histories = ch1.figure1_experiment(seed=seed, labels=("no BN", "BN", "BN + noise"))
    drift = {k: ch1.percentile_drift(h.activations[2]) for k, h in histories.items()}
    reached = {k: h.steps_to_accuracy(0.9) or 10**9 for k, h in histories.items()}
    ratio = drift["no BN"] / drift["BN"]
    assert 3.0 < ratio < 4.5, ratio
    assert reached["BN"] <= 100 and 8 <= reached["no BN"] / reached["BN"] <= 20, reached
    early = histories["no BN"].eval_steps <= 200
    assert histories["no BN"].test_accuracy[early].max() < 0.4
    assert drift["BN + noise"] > 1.3 * drift["no BN"]
    assert reached["BN + noise"] <= 2 * reached["BN"]
    assert reached["BN + noise"] * 5 <= reached["no BN"]


@pytest.mark.usefixtures("one_torch_thread")  # chapter 1 runs with one thread
@pytest.mark.parametrize("seed", CH1_SEEDS)
def test_ch1_dataset_shift_range(seed: int):
    """ "drops the accuracy from above 95% to about half or less (between 33% and 52% over
    seeds 0 to 4, both ways of normalising)"."""
    moved = ch1.dataset_shift_experiment(seed=seed)
    assert moved.original > 0.95
    for accuracy in (moved.moved, moved.moved_own_statistics):
        assert 0.33 <= accuracy <= 0.52, accuracy


# ---------------------------------------------------------------------------------------------
# Chapter 3: gamma, beta and the capacity of a normalised layer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ch3_perturbed_weights_move_the_moments_only_without_bn(seed):
    """ "Without batch norm the same perturbations move a typical unit's mean by about 0.21 to
    0.26 and its standard deviation by about 40% to 50% (over seeds 0 to 3)"; with batch norm
    the mean stays beta and the standard deviation gamma."""
    no_bn = ch3.moments_under_weight_perturbation(norm=None, seed=seed)
    assert 0.2 <= np.median(no_bn.mean_change) <= 0.27
    assert 0.38 <= np.median(no_bn.std_change) <= 0.52
    bn = ch3.moments_under_weight_perturbation(norm="bn", seed=seed)
    assert bn.mean_change.max() < 1e-12 and bn.std_change.max() < 1e-2
    assert np.abs(bn.mean - bn.beta).max() < 1e-12


# ---------------------------------------------------------------------------------------------
# Chapter 5: batch norm in convolutional networks
# ---------------------------------------------------------------------------------------------

CH5_LEARNING_RATES = (0.01, 0.03, 0.1, 0.3, 1.0)


@pytest.fixture(scope="module")
def digit_images():
    return load_digits(flatten=False)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_ch5_learning_rate_sweep(seed, digit_images):
    """The learning-rate sweep, for each of the seeds 0 to 4: "with BN, the same network learns
    at every learning rate from 0.01 to 1"; without BN only a narrow band works, and learning
    rate 1 "collapses (to between 9% and 51% over seeds 0 to 4)"; at learning rate 0.1, BN is
    above 90% after 50 steps and more than 20 points ahead, and both are above 85% after 200."""
    histories = ch5.learning_rate_sweep(
        lrs=CH5_LEARNING_RATES, norms=(None, "bn"), seeds=(seed,), steps=200, data=digit_images
    )
    final = {key[:2]: h.final_test_accuracy for key, h in histories.items()}
    assert all(final[("bn", lr)] > 0.9 for lr in CH5_LEARNING_RATES)
    assert [lr for lr in CH5_LEARNING_RATES if final[(None, lr)] > 0.9] == [0.1, 0.3]
    assert final[(None, 0.01)] < 0.6
    assert 0.085 < final[(None, 1.0)] < 0.515
    runs = {norm: histories[(norm, 0.1, seed)] for norm in (None, "bn")}
    at_50 = {norm: h.test_accuracy[list(h.eval_steps).index(50)] for norm, h in runs.items()}
    assert at_50["bn"] > 0.9 and at_50["bn"] > at_50[None] + 0.2
    assert runs["bn"].final_test_accuracy > runs[None].final_test_accuracy > 0.85


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_ch5_weight_growth_lowers_the_effective_learning_rate(seed, digit_images):
    """ "At learning rates up to 0.1 the weights grow by at most a few per cent. At learning
    rate 1 they grow [...], which divides their effective learning rate by [...] about 2.5 to 8
    in every block over seeds 0 to 4." """
    growth = ch5.weight_norm_growth(lrs=(0.01, 0.1, 1.0), seed=seed, data=digit_images)
    assert all(np.all(growth[lr] < 1.06) for lr in (0.01, 0.1))
    divided = growth[1.0] ** 2
    assert 2.4 < divided.min() and divided.max() < 8.5
