"""The claims of Part I (chapters 1 to 5) that the prose makes over several seeds.

A chapter runs its experiments at one seed and asserts the claim there; where its prose says
more ("for every seed we tried, 0 to 4", "between 33% and 52% over seeds 0 to 4"), the test
below runs the experiment at each of those seeds and asserts the claim, with the margins the
prose states, for each one. One section per chapter; the seeds are the ones the prose names.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bncourse.experiments import ch1

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _one_thread():
    """The chapters run with one CPU thread; so do their claims here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- chapter 1: book/ch1_covariate_shift.ipynb ------------------------------------------------

CH1_SEEDS = range(5)  # "The same holds at seeds 0 to 4", "every seed we tried (0 to 4)"


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
    assert shift.bn_input_moment_shift[-1] > 5 * shift.bn_input_moment_shift[0]
    assert np.all(np.diff(total_bn) > 0) and np.all(np.diff(total_plain) > 0)
    assert 3 * total_bn[0] < total_bn[-1] < 8 * total_bn[0], total_bn
    assert total_plain[-1] > 100 * total_plain[0], total_plain
    assert np.all(total_bn[:6] > total_plain[:6]) and total_bn[0] > 5 * total_plain[0]
    assert np.all(total_bn[6:] < total_plain[6:])


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


@pytest.mark.parametrize("seed", CH1_SEEDS)
def test_ch1_dataset_shift_range(seed: int):
    """ "drops the accuracy from above 95% to about half or less (between 33% and 52% over
    seeds 0 to 4, both ways of normalising)"."""
    moved = ch1.dataset_shift_experiment(seed=seed)
    assert moved.original > 0.95
    for accuracy in (moved.moved, moved.moved_own_statistics):
        assert 0.33 <= accuracy <= 0.52, accuracy


# --- chapter 2: book/ch2_bn_transform.ipynb ---------------------------------------------------


# --- chapter 3: book/ch3_gamma_beta.ipynb (helper A2) -----------------------------------------


# --- chapter 5: book/ch5_convolutional.ipynb (helper A2) --------------------------------------
