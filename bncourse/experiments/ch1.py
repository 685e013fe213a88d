"""Experiments of chapter 1, covariate shift and internal covariate shift.

Each function computes and returns plain data (arrays, dataclasses); the notebook plots them.

* :func:`shift_classifier_experiment`: a classifier trained on one population and tested on a
  shifted one, with the inputs standardised by the training statistics or by their own.
* :func:`batch_statistics_spread`: how much mini-batch means and variances fluctuate around the
  population's, against the batch size.
* :func:`conditioning_experiment`: gradient descent on least squares with raw and with
  standardised inputs: the condition number of the loss and the steps it costs.
* :func:`figure1_experiment`: the spirit of Ioffe & Szegedy's Figure 1: a 3-hidden-layer sigmoid
  MLP on the digits with and without BN (and, optionally, BN followed by injected noise, after
  Santurkar et al., 2018), recording test accuracy and the percentiles of sigmoid inputs.
* :func:`percentile_drift`: how far the percentiles of a unit's input travel over training.
* :func:`layer_shift_experiment`: how much each layer's input distribution moves in one
  training step, layer by layer, with and without BN.
* :func:`dataset_shift_experiment`: a digits model tested on digits moved by one pixel, with
  BN's running statistics and with statistics re-estimated on the moved digits.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bncourse import get_device
from bncourse.data import Dataset, load_digits, make_shift_data
from bncourse.models import MLP, make_mlp
from bncourse.training import ActivationRecord, TrainingHistory, evaluate, train
from bncourse.utils import accuracy

__all__ = [
    "standardize",
    "ShiftAccuracies",
    "shift_classifier_experiment",
    "BatchSpread",
    "batch_statistics_spread",
    "Conditioning",
    "conditioning_experiment",
    "ShiftNoise",
    "add_shift_noise",
    "copy_linear_weights",
    "figure1_experiment",
    "percentile_drift",
    "LayerShift",
    "layer_shift_experiment",
    "translate_digits",
    "DatasetShift",
    "dataset_shift_experiment",
]


def standardize(
    x: np.ndarray, mean: np.ndarray | None = None, std: np.ndarray | None = None
) -> np.ndarray:
    """Standardise each column of ``x`` with the given statistics (default: its own).

    Parameters
    ----------
    x : np.ndarray, shape (N, D)
    mean, std : np.ndarray, shape (D,), optional
        Statistics to use; by default the mean and (biased) standard deviation of ``x``.

    Returns
    -------
    np.ndarray, shape (N, D)
        ``(x - mean) / std``.
    """
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0) if mean is None else mean
    std = x.std(axis=0) if std is None else std
    return (x - mean) / std


# ---------------------------------------------------------------------------------------------
# Covariate shift on generated data
# ---------------------------------------------------------------------------------------------


@dataclass
class ShiftAccuracies:
    """Test accuracies of a classifier trained on the source population.

    Attributes
    ----------
    source : float
        On a fresh draw of the source population.
    training_statistics : dict of str to float
        On each shifted population (``"location_scale"``, ``"shape"``), standardised with the
        *training* mean and std, as a fixed input pipeline would.
    own_statistics : dict of str to float
        On each shifted population, standardised with its *own* mean and std, as batch norm
        does with the statistics of the batch in front of it.
    weights : np.ndarray, shape (2,)
        The classifier's weights on the standardised features.
    intercept : float
        Its intercept: it predicts class 1 where ``weights @ x + intercept > 0``.
    """

    source: float
    training_statistics: dict[str, float]
    own_statistics: dict[str, float]
    weights: np.ndarray
    intercept: float


def shift_classifier_experiment(n: int = 2000, seed: int = 0) -> ShiftAccuracies:
    """Train a logistic regression on the source population, test it on shifted populations.

    The data come from :func:`bncourse.data.make_shift_data`. The classifier (scikit-learn's
    ``LogisticRegression``, almost unregularised) is trained on the source features
    standardised with their own statistics.

    Parameters
    ----------
    n : int, default 2000
        Size of each population.
    seed : int, default 0
        Seed of the populations.

    Returns
    -------
    ShiftAccuracies
    """
    from sklearn.linear_model import LogisticRegression

    source = make_shift_data("none", n_source=n, n_shifted=n, seed=seed)
    mean, std = source.x_source.mean(axis=0), source.x_source.std(axis=0)
    classifier = LogisticRegression(C=100.0)
    classifier.fit(standardize(source.x_source, mean, std), source.y_source)
    accuracies = ShiftAccuracies(
        source=float(classifier.score(standardize(source.x_shifted, mean, std), source.y_shifted)),
        training_statistics={},
        own_statistics={},
        weights=classifier.coef_[0].astype(np.float64),
        intercept=float(classifier.intercept_[0]),
    )
    for shift in ("location_scale", "shape"):
        data = make_shift_data(shift, n_source=n, n_shifted=n, seed=seed)
        fixed = standardize(data.x_shifted, mean, std)
        own = standardize(data.x_shifted)
        accuracies.training_statistics[shift] = float(classifier.score(fixed, data.y_shifted))
        accuracies.own_statistics[shift] = float(classifier.score(own, data.y_shifted))
    return accuracies


# ---------------------------------------------------------------------------------------------
# Mini-batch statistics fluctuate
# ---------------------------------------------------------------------------------------------


@dataclass
class BatchSpread:
    """Spread of mini-batch statistics across batches drawn from one fixed population.

    Attributes
    ----------
    batch_sizes : np.ndarray, int64, shape (K,)
    mean_spread : np.ndarray, shape (K,)
        Standard deviation, across batches, of the batch mean.
    var_spread : np.ndarray, shape (K,)
        Standard deviation, across batches, of the batch's biased variance.
    mean_slope, var_slope : float
        Slopes of ``log(spread)`` against ``log(batch size)`` (least squares over the batch
        sizes of at least ``min_fit_size``); -1/2 is the ``1/sqrt(m)`` law.
    mean_theory, var_theory : np.ndarray, shape (K,)
        The large-batch predictions ``sigma / sqrt(m)`` and ``sqrt((mu_4 - sigma^4) / m)`` of
        the population (an exponential distribution with rate 1: ``sigma = 1``, ``mu_4 = 9``).
    """

    batch_sizes: np.ndarray
    mean_spread: np.ndarray
    var_spread: np.ndarray
    mean_slope: float
    var_slope: float
    mean_theory: np.ndarray
    var_theory: np.ndarray


def batch_statistics_spread(
    batch_sizes: Sequence[int] = (4, 8, 16, 32, 64, 128, 256),
    num_batches: int = 2000,
    seed: int = 0,
    min_fit_size: int = 16,
) -> BatchSpread:
    """Draw ``num_batches`` mini-batches of each size from one fixed, skewed population.

    The population is the exponential distribution with rate 1 (mean 1, variance 1, a long
    right tail); every batch is an independent sample, so any difference between batches is
    sampling noise, not a change of distribution.

    Parameters
    ----------
    batch_sizes : sequence of int, default (4, 8, ..., 256)
        The batch sizes m.
    num_batches : int, default 2000
        Batches drawn per size.
    seed : int, default 0
    min_fit_size : int, default 16
        Smallest batch size used to fit the slopes: the ``1/sqrt(m)`` law of the variance is a
        large-batch law (a tiny batch's biased variance is shrunk by the factor (m - 1) / m and
        is far from Gaussian).

    Returns
    -------
    BatchSpread
    """
    rng = np.random.default_rng(seed)
    sizes = np.asarray(batch_sizes, dtype=np.int64)
    mean_spread, var_spread = [], []
    for m in sizes:
        batches = rng.exponential(1.0, size=(num_batches, int(m)))
        mean_spread.append(batches.mean(axis=1).std())
        var_spread.append(batches.var(axis=1).std())
    mean_spread, var_spread = np.array(mean_spread), np.array(var_spread)
    fit = sizes >= min_fit_size
    if fit.sum() < 2:
        raise ValueError(f"need at least two batch sizes >= min_fit_size={min_fit_size}")
    log_m = np.log(sizes[fit])
    return BatchSpread(
        batch_sizes=sizes,
        mean_spread=mean_spread,
        var_spread=var_spread,
        mean_slope=float(np.polyfit(log_m, np.log(mean_spread[fit]), 1)[0]),
        var_slope=float(np.polyfit(log_m, np.log(var_spread[fit]), 1)[0]),
        mean_theory=1.0 / np.sqrt(sizes),
        var_theory=np.sqrt(8.0 / sizes),
    )


# ---------------------------------------------------------------------------------------------
# Why steady, standardised inputs help: conditioning
# ---------------------------------------------------------------------------------------------


@dataclass
class Conditioning:
    """Gradient descent on least squares with raw and with standardised inputs.

    Attributes
    ----------
    condition_number : dict of str to float
        Ratio of the largest to the smallest eigenvalue of the loss's Hessian, per input
        version (``"raw"``, ``"standardised"``).
    excess_loss : dict of str to np.ndarray, shape (steps + 1,)
        Loss minus the minimal loss after each step of gradient descent (step size
        1 / largest eigenvalue; steps beyond 2 / largest eigenvalue diverge).
    steps_to_tolerance : dict of str to int or None
        First step at which the excess loss is below ``tolerance`` times its initial value.
    """

    condition_number: dict[str, float]
    excess_loss: dict[str, np.ndarray]
    steps_to_tolerance: dict[str, int | None]


def conditioning_experiment(
    mean: Sequence[float] = (3.0, -1.0),
    scale: Sequence[float] = (2.0, 0.5),
    n: int = 1000,
    steps: int = 2000,
    tolerance: float = 1e-6,
    seed: int = 0,
) -> Conditioning:
    """Fit ``y = w . x + b`` by full-batch gradient descent on raw and on standardised inputs.

    The inputs have per-feature means ``mean`` and standard deviations ``scale``; the targets
    are a fixed linear function of them plus noise. The Hessian of the mean squared error (with
    respect to ``(w, b)``) is the second-moment matrix of ``(x, 1)``; its condition number sets
    how many steps gradient descent needs. Standardising makes that matrix the identity.

    Parameters
    ----------
    mean, scale : sequence of float, default (3, -1) and (2, 0.5)
        Per-feature mean and standard deviation of the raw inputs.
    n : int, default 1000
        Number of examples.
    steps : int, default 2000
        Gradient-descent steps.
    tolerance : float, default 1e-6
        Relative excess loss that counts as converged.
    seed : int, default 0

    Returns
    -------
    Conditioning
    """
    rng = np.random.default_rng(seed)
    mean, scale = np.asarray(mean, dtype=float), np.asarray(scale, dtype=float)
    x_raw = mean + scale * rng.standard_normal((n, len(mean)))
    y = x_raw @ np.linspace(1.0, -1.0, len(mean)) + 0.5 + 0.1 * rng.standard_normal(n)
    result = Conditioning({}, {}, {})
    for name, x in (("raw", x_raw), ("standardised", standardize(x_raw))):
        features = np.hstack([x, np.ones((n, 1))])
        hessian = features.T @ features / n
        eigenvalues = np.linalg.eigvalsh(hessian)
        best = np.linalg.lstsq(features, y, rcond=None)[0]
        min_loss = 0.5 * np.mean((features @ best - y) ** 2)
        theta = np.zeros(features.shape[1])
        losses = []
        for _ in range(steps + 1):
            residual = features @ theta - y
            losses.append(0.5 * np.mean(residual**2) - min_loss)
            theta -= features.T @ residual / n / eigenvalues[-1]
        losses = np.maximum(np.array(losses), 0.0)
        below = np.flatnonzero(losses <= tolerance * losses[0])
        result.condition_number[name] = float(eigenvalues[-1] / eigenvalues[0])
        result.excess_loss[name] = losses
        result.steps_to_tolerance[name] = int(below[0]) if below.size else None
    return result


# ---------------------------------------------------------------------------------------------
# Figure 1 of Ioffe & Szegedy (2015), in spirit
# ---------------------------------------------------------------------------------------------


class ShiftNoise(nn.Module):
    """Random per-unit scale and shift, redrawn at every training forward pass.

    ``y -> y * exp(scale_std * a) + shift_std * b`` with ``a, b ~ N(0, 1)`` drawn per unit from
    torch's global generator; the identity in evaluation mode. Put after a BN layer it makes the
    distribution of the layer's output change at every step (the "noisy BN" of Santurkar et
    al., 2018), so it *adds* internal covariate shift.

    Parameters
    ----------
    scale_std : float, default 0.5
    shift_std : float, default 1.0
    """

    def __init__(self, scale_std: float = 0.5, shift_std: float = 1.0):
        super().__init__()
        self.scale_std = float(scale_std)
        self.shift_std = float(shift_std)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N, C)."""
        if not self.training:
            return y
        units = y.shape[1]
        scale = torch.exp(self.scale_std * torch.randn(units, device=y.device, dtype=y.dtype))
        shift = self.shift_std * torch.randn(units, device=y.device, dtype=y.dtype)
        return y * scale + shift

    def extra_repr(self) -> str:
        return f"scale_std={self.scale_std}, shift_std={self.shift_std}"


def add_shift_noise(model: MLP, scale_std: float = 0.5, shift_std: float = 1.0) -> MLP:
    """Put a :class:`ShiftNoise` after the BN layer of every hidden block of ``model`` (in place).

    Parameters
    ----------
    model : MLP
        Built with ``make_mlp(..., norm="bn")``.

    Returns
    -------
    MLP
        The same model; its recorded pre-activations now include the noise.
    """
    for block in model.hidden:
        if block.norm is None:
            raise ValueError("add_shift_noise needs a model with BN (make_mlp(..., norm='bn'))")
        block.norm = nn.Sequential(block.norm, ShiftNoise(scale_std, shift_std))
    return model


def copy_linear_weights(source: MLP, target: MLP) -> MLP:
    """Give ``target`` the weights of ``source``'s linear layers (in place), biases where shared.

    ``make_mlp`` with the same seed draws different weights for a network with BN and one
    without from the second layer on, because only the latter has hidden biases (drawn from the
    same generator). Copying makes the comparison start from the same weights: the hidden
    weights and the output layer are copied; hidden biases that only ``target`` has keep their
    own initial values.

    Parameters
    ----------
    source, target : MLP
        Networks of the same depth and widths.

    Returns
    -------
    MLP
        ``target``.
    """
    if source.depth != target.depth:
        raise ValueError(f"depths differ: {source.depth} and {target.depth}")
    with torch.no_grad():
        for from_block, to_block in zip(source.hidden, target.hidden, strict=True):
            to_block.linear.weight.copy_(from_block.linear.weight)
            if from_block.linear.bias is not None and to_block.linear.bias is not None:
                to_block.linear.bias.copy_(from_block.linear.bias)
        target.output.weight.copy_(source.output.weight)
        target.output.bias.copy_(source.output.bias)
    return target


FIGURE1_LABELS = ("no BN", "BN", "BN + noise")


def figure1_experiment(
    steps: int = 1000,
    lr: float = 1.0,
    batch_size: int = 60,
    seed: int = 0,
    labels: Sequence[str] = ("no BN", "BN"),
    record_every: int = 10,
    eval_every: int = 25,
    data: Dataset | None = None,
    device: torch.device | str | None = None,
) -> dict[str, TrainingHistory]:
    """Train the 3 x 100 sigmoid MLP of Ioffe & Szegedy's Figure 1 on the digits.

    Every variant starts from the same initial weights (those of ``make_mlp(..., norm="bn",
    seed=seed)``, copied with :func:`copy_linear_weights`; the network without BN also has
    hidden biases) and sees the same mini-batches, with plain SGD at the same learning rate.
    The last hidden layer's sigmoid inputs are recorded every ``record_every`` steps.

    Parameters
    ----------
    steps : int, default 1000
    lr : float, default 1.0
    batch_size : int, default 60
    seed : int, default 0
        Seed of the initial weights, the batch order and the noise.
    labels : sequence of {"no BN", "BN", "BN + noise"}, default ("no BN", "BN")
        The variants to train; "BN + noise" is BN followed by :class:`ShiftNoise`.
    record_every, eval_every : int, default 10 and 25
        See :func:`bncourse.training.train`.
    data : Dataset, optional
        Default ``load_digits(seed=seed)``.
    device : optional
        Default :func:`bncourse.get_device`.

    Returns
    -------
    dict of str to TrainingHistory
        One history per label; ``history.activations[2]`` holds the last hidden layer.
    """
    data = load_digits(seed=seed) if data is None else data
    for label in labels:
        if label not in FIGURE1_LABELS:
            raise ValueError(f"labels must be among {FIGURE1_LABELS}, got {label!r}")
    reference = make_mlp(data.num_features, data.num_classes, depth=3, norm="bn", seed=seed)
    histories = {}
    for label in labels:
        norm = None if label == "no BN" else "bn"
        model = make_mlp(
            data.num_features, data.num_classes, depth=3, width=100, norm=norm, seed=seed
        )
        copy_linear_weights(reference, model)
        if label == "BN + noise":
            add_shift_noise(model)
        histories[label] = train(
            model,
            data,
            steps=steps,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            device=device,
            eval_every=eval_every,
            record_every=record_every,
            record_layers=[-1],
        )
    return histories


def percentile_drift(record: ActivationRecord) -> float:
    """How far the percentiles of the units' inputs travel over training.

    For each recorded unit and each percentile level, the range (maximum minus minimum) of that
    percentile over the recorded steps, averaged over units and levels. It is in the units of
    the nonlinearity's input: a drift of 2 means a typical percentile wandered over an interval
    of width 2 of the sigmoid's argument.

    Parameters
    ----------
    record : ActivationRecord
        Percentiles of shape (T, U, P).

    Returns
    -------
    float
    """
    percentiles = np.asarray(record.percentiles, dtype=np.float64)
    return float((percentiles.max(axis=0) - percentiles.min(axis=0)).mean())


# ---------------------------------------------------------------------------------------------
# Shifts compound with depth
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerShift:
    """How much each hidden layer's input distribution moves in one training step.

    Measured on a fixed probe batch of training examples, before and after a step, for the input
    of every hidden nonlinearity (after BN when there is BN), per unit, in units of that unit's
    standard deviation before the step, then averaged over units and over the measured steps.

    Attributes
    ----------
    moment_shift : dict of str to np.ndarray, shape (depth,)
        ``sqrt(delta_mean^2 + delta_std^2) / std``: the move of the first two moments, the part
        BN controls. Keys ``"no BN"``, ``"BN"``.
    shape_shift : dict of str to np.ndarray, shape (depth,)
        The Wasserstein-1 distance between the unit's distributions before and after, divided
        by the std: every change, the shape's included.
    test_accuracy : dict of str to float
        Test accuracy after training.
    bn_input_moment_shift : np.ndarray, shape (depth,)
        The moment shift of the input of every BN layer, ``W u`` (the network with BN only):
        what the layer's input would do if BN did not renormalise it.
    """

    moment_shift: dict[str, np.ndarray]
    shape_shift: dict[str, np.ndarray]
    test_accuracy: dict[str, float]
    bn_input_moment_shift: np.ndarray | None = None


@torch.no_grad()
def _probe_preactivations(
    model: MLP, probe: torch.Tensor
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Inputs of the hidden nonlinearities on ``probe`` and the outputs of the linear layers
    (BN's inputs), without touching BN's running statistics."""
    scratch = copy.deepcopy(model)
    linear_outputs = []
    hooks = [
        block.linear.register_forward_hook(lambda _m, _i, out: linear_outputs.append(out))
        for block in scratch.hidden
    ]
    _, preactivations = scratch.forward_with_preactivations(probe)
    for hook in hooks:
        hook.remove()
    as_numpy = [[z.double().cpu().numpy() for z in zs] for zs in (preactivations, linear_outputs)]
    return as_numpy[0], as_numpy[1]


def _distribution_moves(before: np.ndarray, after: np.ndarray) -> tuple[float, float]:
    std = before.std(axis=0) + 1e-12
    delta_mean = after.mean(axis=0) - before.mean(axis=0)
    delta_std = after.std(axis=0) - before.std(axis=0)
    moments = np.sqrt(delta_mean**2 + delta_std**2) / std
    wasserstein = np.abs(np.sort(after, axis=0) - np.sort(before, axis=0)).mean(axis=0) / std
    return float(moments.mean()), float(wasserstein.mean())


class _ShiftMeter:
    """A :func:`~bncourse.training.train` callback: how far one update moves the
    pre-activations of a fixed probe batch, for the updates after 0, ``every``, ``2 * every``,
    ... (fewer than ``steps``) updates."""

    def __init__(self, probe: torch.Tensor, every: int, steps: int) -> None:
        self.probe, self.every, self.steps = probe, every, steps
        self.before: tuple[list[np.ndarray], list[np.ndarray]] | None = None
        self.moments: list[list[float]] = []
        self.shapes: list[list[float]] = []
        self.linear_moments: list[list[float]] = []

    def __call__(self, done: int, model: MLP, *_batch: torch.Tensor) -> None:
        """After ``done`` updates: finish a pending measurement, start the next one."""
        if self.before is not None:
            after = _probe_preactivations(model, self.probe)
            moves = [
                _distribution_moves(b, a) for b, a in zip(self.before[0], after[0], strict=True)
            ]
            self.moments.append([m for m, _ in moves])
            self.shapes.append([s for _, s in moves])
            pairs = zip(self.before[1], after[1], strict=True)
            self.linear_moments.append([_distribution_moves(b, a)[0] for b, a in pairs])
            self.before = None
        if done % self.every == 0 and done < self.steps:
            self.before = _probe_preactivations(model, self.probe)


def layer_shift_experiment(
    depth: int = 8,
    width: int = 100,
    activation: str = "tanh",
    lr: float = 0.1,
    steps: int = 100,
    measure_every: int = 10,
    batch_size: int = 60,
    probe_size: int = 512,
    seed: int = 0,
    device: torch.device | str | None = None,
    cpu_threads: int | None = 1,
) -> LayerShift:
    """Train a deep MLP on the digits with and without BN, measuring per-layer input shifts.

    Both models start from the same weights (:func:`copy_linear_weights`) and see the same
    batches (plain SGD). At
    steps 0, ``measure_every``, ... the inputs of every hidden nonlinearity are computed on a
    fixed probe batch before and after that step's update (BN, when present, normalises with the
    probe batch's own statistics, as in training).

    Parameters
    ----------
    depth, width : int, default 8 and 100
    activation : str, default "tanh"
    lr : float, default 0.1
    steps : int, default 100
    measure_every : int, default 10
    batch_size : int, default 60
    probe_size : int, default 512
        Training examples in the probe batch (the first ones of the training split).
    seed : int, default 0
    device : optional
        Default :func:`bncourse.get_device`.
    cpu_threads : int or None, default 1
        On the CPU, run with this many threads (restored afterwards), as
        :func:`bncourse.training.train` does; None keeps the current setting.

    Returns
    -------
    LayerShift
    """
    device = get_device(device)
    data = load_digits(seed=seed)
    probe = data.tensors(device).x_train[:probe_size]
    result = LayerShift({}, {}, {})
    sizes = dict(depth=depth, width=width, activation=activation, seed=seed)
    reference = make_mlp(data.num_features, data.num_classes, norm="bn", **sizes)
    for label, norm in (("no BN", None), ("BN", "bn")):
        model = make_mlp(data.num_features, data.num_classes, norm=norm, **sizes)
        model = copy_linear_weights(reference, model).to(device)
        measure = _ShiftMeter(probe, measure_every, steps)
        measure(0, model)
        history = train(
            model,
            data,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            device=device,
            eval_every=0,
            cpu_threads=cpu_threads,
            callback=measure,
        )
        if norm is not None:
            result.bn_input_moment_shift = np.mean(measure.linear_moments, axis=0)
        result.moment_shift[label] = np.mean(measure.moments, axis=0)
        result.shape_shift[label] = np.mean(measure.shapes, axis=0)
        result.test_accuracy[label] = history.final_test_accuracy
    return result


def translate_digits(data: Dataset, pixels: int = 1) -> np.ndarray:
    """The test digits of ``data`` moved ``pixels`` to the right (blank columns come in left).

    The move is done on the raw pixel values (background 0), then the result is standardised
    with the training statistics of ``data``, like the original test split.

    Parameters
    ----------
    data : Dataset
        Flattened, standardised 8x8 digits (``load_digits()``).
    pixels : int, default 1

    Returns
    -------
    np.ndarray, float32, shape (N_test, 64)
    """
    if data.mean is None or data.std is None or data.input_shape != (64,):
        raise ValueError("translate_digits needs flattened, standardised digits (load_digits())")
    raw = (data.x_test * data.std + data.mean).reshape(-1, 8, 8)
    moved = np.zeros_like(raw)
    moved[:, :, pixels:] = raw[:, :, : 8 - pixels]
    return ((moved.reshape(-1, 64) - data.mean) / data.std).astype(np.float32)


@dataclass
class DatasetShift:
    """Test accuracies of a BN model on the digits and on the digits moved by some pixels.

    Attributes
    ----------
    original : float
        On the test digits (evaluation mode: BN with its running statistics).
    moved : float
        On the moved test digits, BN with its running statistics from training.
    moved_own_statistics : float
        On the moved test digits, BN normalising with the moved test set's own statistics
        (re-estimating BN's statistics on the new data, as "AdaBN" does).
    x_moved : np.ndarray, float32, shape (N_test, 64)
        The moved test digits.
    """

    original: float
    moved: float
    moved_own_statistics: float
    x_moved: np.ndarray


def dataset_shift_experiment(
    pixels: int = 1,
    steps: int = 500,
    lr: float = 1.0,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> DatasetShift:
    """Train the 3 x 100 sigmoid MLP with BN on the digits; test it on moved digits.

    Parameters
    ----------
    pixels : int, default 1
        How far the test digits are moved to the right.
    steps, lr : default 500 and 1.0
        Training length and SGD learning rate.
    seed : int, default 0
    device : optional
        Default :func:`bncourse.get_device`.

    Returns
    -------
    DatasetShift
    """
    data = load_digits(seed=seed)
    x_moved = translate_digits(data, pixels)
    model = make_mlp(data.num_features, data.num_classes, norm="bn", seed=seed)
    train(model, data, steps=steps, lr=lr, seed=seed, device=device, eval_every=0)
    model_device = next(model.parameters()).device
    original = evaluate(model, data.x_test, data.y_test)[1]
    moved = evaluate(model, x_moved, data.y_test)[1]
    with torch.no_grad():
        model.train()  # normalise with the moved test set's own statistics
        logits = model(torch.as_tensor(x_moved, device=model_device))
        model.eval()
    own = accuracy(logits, torch.as_tensor(data.y_test))
    return DatasetShift(original, moved, own, x_moved)
