"""Experiments of chapter 3: gamma, beta and the capacity of a batch-normalised network.

Each function computes and returns plain data (arrays, dataclasses); the notebook plots them.

* :func:`identity_parameters` and :func:`undo_batch_norm`: the scale and shift that make batch
  norm the identity, and the per-channel affine map that inverts it.
* :func:`gaussian_sigmoid_linearity` and :func:`unit_linearity`: how close to a straight line the
  sigmoid is over the range of inputs it receives.
* :func:`make_interval_data`, :func:`best_threshold_accuracy`, :func:`interval_experiment`: a 1-D
  task that a batch-normalised network fits with gamma and beta and cannot fit without them.
* :func:`moments_under_weight_perturbation`: after BN the first two moments of a layer's input
  are set by beta and gamma alone, whatever the upstream weights.
* :func:`bias_gradient_before_bn` and :func:`bias_during_training`: a bias before BN is cancelled
  and gets no gradient.
* :func:`compare_affine`: training on the digits with and without the affine step, and the values
  gamma and beta learn.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from bncourse import numpy_bn, torch_bn
from bncourse.data import Dataset, load_digits
from bncourse.models import make_mlp
from bncourse.training import TrainingHistory, train

__all__ = [
    "LABELS",
    "identity_parameters",
    "undo_batch_norm",
    "gaussian_sigmoid_linearity",
    "unit_linearity",
    "make_interval_data",
    "best_threshold_accuracy",
    "monotonicity_violation",
    "IntervalResult",
    "interval_experiment",
    "MomentsUnderPerturbation",
    "moments_under_weight_perturbation",
    "BiasGradient",
    "bias_gradient_before_bn",
    "BiasDuringTraining",
    "bias_during_training",
    "AffineComparison",
    "compare_affine",
]

LABELS: dict[str | None, str] = {None: "no BN", "bn": "BN", "bn_no_affine": "BN (no affine)"}
"""The plot label of each ``norm`` of :func:`bncourse.models.make_mlp` (the book's colours)."""


def _per_channel(vector: np.ndarray, ndim: int) -> np.ndarray:
    """Reshape a (C,) vector to broadcast against an array of rank ``ndim`` with channels on 1."""
    return np.asarray(vector).reshape((1, -1) + (1,) * (ndim - 2))


# ---------------------------------------------------------------------------------------------
# The identity transform and its inverse
# ---------------------------------------------------------------------------------------------


def identity_parameters(x: np.ndarray, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """The gamma and beta that make training-mode batch norm return ``x`` itself.

    With the batch mean :math:`\\mu_B` and biased variance :math:`\\sigma_B^2` of each channel,
    :math:`\\gamma = \\sqrt{\\sigma_B^2 + \\epsilon}` and :math:`\\beta = \\mu_B` undo the
    normalisation exactly.

    Parameters
    ----------
    x : np.ndarray, shape (N, C) or (N, C, *spatial)
        The mini-batch.
    eps : float, default 1e-5
        The epsilon of the batch-norm layer.

    Returns
    -------
    gamma, beta : np.ndarray, float64, shape (C,)
    """
    mean, var = numpy_bn.batch_statistics(np.asarray(x))
    return np.sqrt(var + eps), mean


def undo_batch_norm(
    y: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float = 1e-5,
) -> np.ndarray:
    """Recover a batch norm's input from its output, given the statistics it normalised with.

    Batch norm with fixed statistics is the per-channel affine map
    :math:`y = a x + b` with :math:`a = \\gamma / \\sqrt{\\sigma^2 + \\epsilon}` and
    :math:`b = \\beta - a \\mu`; its inverse is :math:`x = (y - b) / a`, defined when no
    :math:`\\gamma` is zero.

    Parameters
    ----------
    y : np.ndarray, shape (N, C) or (N, C, *spatial)
        The output of batch norm.
    gamma, beta : np.ndarray, shape (C,)
        Its scale (all non-zero) and shift.
    mean, var : np.ndarray, shape (C,)
        The mean and variance it normalised with (batch statistics in training mode, running
        statistics in evaluation mode).
    eps : float, default 1e-5

    Returns
    -------
    np.ndarray, float64, the shape of ``y``
    """
    y = np.asarray(y, dtype=np.float64)
    ndim = y.ndim
    std = np.sqrt(_per_channel(np.asarray(var, dtype=np.float64), ndim) + eps)
    x_hat = (y - _per_channel(beta, ndim)) / _per_channel(gamma, ndim)
    return x_hat * std + _per_channel(mean, ndim)


# ---------------------------------------------------------------------------------------------
# How linear is the sigmoid over the range it sees?
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _gauss_hermite(nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights (summing to 1) of Gauss-Hermite quadrature for a standard normal."""
    z, weights = np.polynomial.hermite_e.hermegauss(nodes)
    z.setflags(write=False)
    weights = weights / weights.sum()
    weights.setflags(write=False)
    return z, weights


def gaussian_sigmoid_linearity(scale: float = 1.0, shift: float = 0.0, nodes: int = 101) -> float:
    """How much of :math:`\\sigma(\\gamma z + \\beta)` a straight line explains, for z ~ N(0, 1).

    The R-squared of the best linear fit of :math:`\\sigma(\\gamma z + \\beta)` on :math:`z`,
    i.e. :math:`\\mathrm{corr}(z, \\sigma(\\gamma z + \\beta))^2`, computed by Gauss-Hermite
    quadrature (exact to rounding for the default number of nodes). 1 means the sigmoid acts as a
    linear function on this input distribution.

    Parameters
    ----------
    scale : float, default 1.0
        :math:`\\gamma`, the standard deviation of the sigmoid's input.
    shift : float, default 0.0
        :math:`\\beta`, the mean of the sigmoid's input.
    nodes : int, default 101
        Number of quadrature nodes.

    Returns
    -------
    float in [0, 1]
    """
    z, weights = _gauss_hermite(nodes)
    s = 1.0 / (1.0 + np.exp(-(scale * z + shift)))
    s_centred = s - np.sum(weights * s)
    covariance = np.sum(weights * s_centred * z)
    return float(covariance**2 / np.sum(weights * s_centred**2))


def unit_linearity(z: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per unit, the R-squared of the best linear fit of sigmoid(z) on z over the batch.

    Parameters
    ----------
    z : torch.Tensor or np.ndarray, shape (N, U)
        Inputs of U sigmoid units for N examples.

    Returns
    -------
    np.ndarray, float64, shape (U,)
        :math:`\\mathrm{corr}(z_u, \\sigma(z_u))^2` for each unit (1: the unit acts linearly).
    """
    if torch.is_tensor(z):
        z = z.detach().cpu().numpy()
    z = np.asarray(z, dtype=np.float64)
    s = 1.0 / (1.0 + np.exp(-z))
    z_centred, s_centred = z - z.mean(axis=0), s - s.mean(axis=0)
    covariance = (z_centred * s_centred).mean(axis=0)
    return covariance**2 / ((z_centred**2).mean(axis=0) * (s_centred**2).mean(axis=0))


# ---------------------------------------------------------------------------------------------
# A task that needs gamma and beta
# ---------------------------------------------------------------------------------------------


def make_interval_data(
    num_train: int = 1000,
    num_test: int = 1000,
    half_width: float = 1.0,
    limit: float = 3.0,
    seed: int = 0,
) -> Dataset:
    """A 1-D classification task: is x inside the interval [-half_width, half_width]?

    Inputs are uniform on [-limit, limit]; the label is 1 inside the interval and 0 outside.

    Parameters
    ----------
    num_train, num_test : int, default 1000
        Examples in each split.
    half_width : float, default 1.0
    limit : float, default 3.0
    seed : int, default 0

    Returns
    -------
    Dataset
        ``x_*`` of shape (N, 1) float32, ``y_*`` int64 in {0, 1}, ``num_classes=2``.
    """
    rng = np.random.default_rng(seed)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.uniform(-limit, limit, size=(n, 1)).astype(np.float32)
        return x, (np.abs(x[:, 0]) < half_width).astype(np.int64)

    x_train, y_train = draw(num_train)
    x_test, y_test = draw(num_test)
    return Dataset(
        x_train, y_train, x_test, y_test, num_classes=2, input_shape=(1,), name="interval"
    )


def best_threshold_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    """The accuracy of the best classifier that is monotone in a 1-D input.

    A monotone binary classifier predicts one class below a threshold and the other above it;
    this tries every threshold and both orientations.

    Parameters
    ----------
    x : np.ndarray, shape (N,) or (N, 1)
    y : np.ndarray of {0, 1}, shape (N,)

    Returns
    -------
    float
    """
    x, y = np.asarray(x).ravel(), np.asarray(y).ravel()
    order = np.argsort(x, kind="stable")
    y = y[order]
    n = len(y)
    ones_below = np.concatenate([[0], np.cumsum(y)])  # threshold after k sorted examples
    k = np.arange(n + 1)
    zeros_below = k - ones_below
    ones_above = ones_below[-1] - ones_below
    zeros_above = (n - k) - ones_above
    correct = np.maximum(zeros_below + ones_above, ones_below + zeros_above)
    return float(correct.max() / n)


def monotonicity_violation(values: np.ndarray) -> float:
    """How far a sequence is from monotone, relative to its range (0: monotone).

    The total movement against the sequence's better direction (the sum of its falls if it
    rises more than it falls, else of its rises), divided by ``max(values) - min(values)``.
    A bump that rises and falls back gives 1.

    Parameters
    ----------
    values : np.ndarray, shape (G,)
        A function's values on an increasing grid.

    Returns
    -------
    float >= 0, 0 exactly for a monotone sequence
    """
    values = np.asarray(values, dtype=np.float64)
    steps = np.diff(values)
    span = values.max() - values.min()
    if span == 0:
        return 0.0
    rises, falls = steps[steps > 0].sum(), -steps[steps < 0].sum()
    return float(min(rises, falls) / span)


@dataclass
class IntervalResult:
    """What :func:`interval_experiment` returns; every dict is keyed by the labels of LABELS.

    Attributes
    ----------
    test_accuracy : dict of str to float
        Final test accuracy of each network.
    threshold_accuracy : float
        Accuracy on the test split of the best monotone (single-threshold) classifier.
    grid : np.ndarray, shape (G,)
        Inputs at which the networks' outputs are evaluated.
    probability : dict of str to np.ndarray, shape (G,)
        Predicted probability of "inside" on the grid (evaluation mode).
    logit_gap : dict of str to np.ndarray, shape (G,)
        Logit of "inside" minus logit of "outside" on the grid.
    linearity : dict of str to list of np.ndarray
        Per hidden layer, :func:`unit_linearity` of the units' inputs over the training split.
    monotonicity : dict of str to float
        :func:`monotonicity_violation` of ``logit_gap`` (0: the network thresholds x).
    first_layer : dict of str to np.ndarray, shape (G, width)
        The outputs of the first hidden layer's units on the grid (evaluation mode).
    gamma, beta : dict of str to list of np.ndarray
        The learned gamma and beta of each hidden layer (networks with the affine step only).
    histories : dict of str to TrainingHistory
    """

    test_accuracy: dict[str, float]
    threshold_accuracy: float
    grid: np.ndarray
    probability: dict[str, np.ndarray]
    logit_gap: dict[str, np.ndarray]
    linearity: dict[str, list[np.ndarray]]
    monotonicity: dict[str, float] = field(default_factory=dict)
    first_layer: dict[str, np.ndarray] = field(default_factory=dict)
    gamma: dict[str, list[np.ndarray]] = field(default_factory=dict)
    beta: dict[str, list[np.ndarray]] = field(default_factory=dict)
    histories: dict[str, TrainingHistory] = field(default_factory=dict)


def _learned_affine(model) -> tuple[list[np.ndarray], list[np.ndarray]]:
    gammas = [b.norm.weight.detach().cpu().numpy().astype(np.float64) for b in model.hidden]
    betas = [b.norm.bias.detach().cpu().numpy().astype(np.float64) for b in model.hidden]
    return gammas, betas


@torch.no_grad()
def _layer_linearity(model, x: np.ndarray) -> list[np.ndarray]:
    """unit_linearity of every hidden layer's nonlinearity inputs, in evaluation mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    _, preactivations = model.forward_with_preactivations(torch.as_tensor(x, device=device))
    model.train(was_training)
    return [unit_linearity(z) for z in preactivations]


def interval_experiment(
    norms: tuple[str | None, ...] = (None, "bn", "bn_no_affine"),
    depth: int = 2,
    width: int = 16,
    steps: int = 500,
    batch_size: int = 50,
    lr: float = 0.02,
    num_train: int = 1000,
    grid_points: int = 401,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> IntervalResult:
    """Train sigmoid MLPs on :func:`make_interval_data` with and without BN's affine step.

    Without gamma and beta (and with any bias before BN cancelled), every hidden unit of a network
    on a 1-D input computes an increasing or decreasing function of x, so the network can only
    threshold x: its accuracy is at most :func:`best_threshold_accuracy`.

    Parameters
    ----------
    norms : tuple of {None, "bn", "bn_no_affine"}
        The networks to train (``norm`` of :func:`bncourse.models.make_mlp`).
    depth, width : int
        Hidden layers and units per layer.
    steps, batch_size, lr : training with Adam.
    num_train : int
        Training examples (the test split has as many).
    grid_points : int
        Points of the evaluation grid on [-limit, limit].
    seed : int
        Seed of the data, the initial weights and the batch order.
    device : torch.device or str, optional

    Returns
    -------
    IntervalResult
    """
    data = make_interval_data(num_train=num_train, num_test=num_train, seed=seed)
    grid = np.linspace(-3.0, 3.0, grid_points)
    result = IntervalResult(
        test_accuracy={},
        threshold_accuracy=best_threshold_accuracy(data.x_test, data.y_test),
        grid=grid,
        probability={},
        logit_gap={},
        linearity={},
    )
    for norm in norms:
        label = LABELS[norm]
        model = make_mlp(1, 2, depth=depth, width=width, norm=norm, seed=seed)
        history = train(
            model,
            data,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            optimizer="adam",
            seed=seed,
            eval_every=0,
            device=device,
        )
        model.eval()
        model_device = next(model.parameters()).device
        with torch.no_grad():
            inputs = torch.as_tensor(grid[:, None], dtype=torch.float32, device=model_device)
            logits = model(inputs).double().cpu()
            first_layer = model.hidden[0](inputs).double().cpu().numpy()
        result.test_accuracy[label] = history.final_test_accuracy
        result.probability[label] = torch.softmax(logits, dim=1)[:, 1].numpy()
        result.logit_gap[label] = (logits[:, 1] - logits[:, 0]).numpy()
        result.monotonicity[label] = monotonicity_violation(result.logit_gap[label])
        result.first_layer[label] = first_layer
        result.linearity[label] = _layer_linearity(model, data.x_train)
        result.histories[label] = history
        if norm == "bn":
            result.gamma[label], result.beta[label] = _learned_affine(model)
    return result


# ---------------------------------------------------------------------------------------------
# The distribution still changes: what BN fixes is who controls the moments
# ---------------------------------------------------------------------------------------------


@dataclass
class MomentsUnderPerturbation:
    """Per-unit mean and standard deviation of one layer's nonlinearity input, as the weights
    upstream of it are perturbed (see :func:`moments_under_weight_perturbation`).

    Attributes
    ----------
    mean, std : np.ndarray, shape (trials + 1, U)
        Row 0 before any perturbation, row t after the t-th independent perturbation.
    gamma, beta : np.ndarray or None, shape (U,)
        The layer's BN parameters (None without BN).
    relative_size : float
        Size of each perturbation relative to the weights' root-mean-square.
    """

    mean: np.ndarray
    std: np.ndarray
    gamma: np.ndarray | None
    beta: np.ndarray | None
    relative_size: float

    @property
    def mean_change(self) -> np.ndarray:
        """Largest change of each unit's mean over the trials, shape (U,)."""
        return np.abs(self.mean[1:] - self.mean[0]).max(axis=0)

    @property
    def std_change(self) -> np.ndarray:
        """Largest relative change of each unit's standard deviation over the trials, (U,)."""
        return (np.abs(self.std[1:] - self.std[0]) / self.std[0]).max(axis=0)


@torch.no_grad()
def moments_under_weight_perturbation(
    norm: str | None = "bn",
    relative_size: float = 0.5,
    trials: int = 5,
    depth: int = 2,
    width: int = 32,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> MomentsUnderPerturbation:
    """Perturb every weight upstream of the last hidden layer's nonlinearity; record its moments.

    A sigmoid MLP on a batch of digits, in float64 and training mode (BN uses the batch's
    statistics). With BN, gamma and beta of the last hidden layer are first set to random values
    (gamma uniform on [0.5, 2], beta normal) so that the moments they fix are not the trivial
    (0, 1). Each trial adds to every hidden ``Linear`` weight (and bias, without BN) Gaussian
    noise of standard deviation ``relative_size`` times that tensor's root-mean-square value, and
    measures the per-unit mean and standard deviation (biased) of the input to the last hidden
    layer's sigmoid over the batch. The random draws are made on the CPU, so the perturbations
    are the same on every ``device``.

    Returns
    -------
    MomentsUnderPerturbation
    """
    generator = torch.Generator().manual_seed(seed)
    data = load_digits(seed=seed)
    index = torch.randperm(data.num_train, generator=generator)[:batch_size]
    x = torch.as_tensor(data.x_train, dtype=torch.float64)[index].to(device)
    model = make_mlp(64, 10, depth=depth, width=width, norm=norm, seed=seed).double().to(device)
    last_norm = model.hidden[-1].norm
    gamma = beta = None
    if norm == "bn":
        last_norm.weight.copy_(0.5 + 1.5 * torch.rand(width, generator=generator))
        last_norm.bias.copy_(torch.randn(width, generator=generator))
        gamma = last_norm.weight.cpu().numpy().copy()
        beta = last_norm.bias.cpu().numpy().copy()
    upstream = [p for block in model.hidden for p in block.linear.parameters()]
    original = [p.clone() for p in upstream]

    def last_moments() -> tuple[np.ndarray, np.ndarray]:
        _, preactivations = model.forward_with_preactivations(x)
        z = preactivations[-1]
        return z.mean(dim=0).cpu().numpy(), z.std(dim=0, unbiased=False).cpu().numpy()

    means, stds = [], []
    for trial in range(trials + 1):
        for p, p0 in zip(upstream, original, strict=True):
            p.copy_(p0)
            if trial > 0:
                rms = p0.square().mean().sqrt()
                noise = torch.randn(p0.shape, generator=generator, dtype=p0.dtype)
                p.add_(relative_size * rms * noise.to(p.device))
        mean, std = last_moments()
        means.append(mean)
        stds.append(std)
    return MomentsUnderPerturbation(np.array(means), np.array(stds), gamma, beta, relative_size)


# ---------------------------------------------------------------------------------------------
# The bias before BN
# ---------------------------------------------------------------------------------------------


@dataclass
class BiasGradient:
    """Gradients of a ``Linear(bias=True) -> BatchNorm1d`` pair (see
    :func:`bias_gradient_before_bn`).

    Attributes
    ----------
    bias_grad : np.ndarray, shape (U,)
        Gradient of the loss with respect to the linear layer's bias.
    weight_grad : np.ndarray, shape (U, F)
        Gradient with respect to its weight.
    output_change : float
        Largest change of the BN output when the bias is moved by a random vector of size
        ``bias_shift``.
    """

    bias_grad: np.ndarray
    weight_grad: np.ndarray
    output_change: float


def bias_gradient_before_bn(
    batch_size: int = 32,
    in_features: int = 8,
    out_features: int = 4,
    bias_shift: float = 10.0,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> BiasGradient:
    """Gradient of a loss with respect to a bias placed just before batch norm (float64).

    Builds ``Linear(in_features, out_features, bias=True)`` followed by the book's
    ``BatchNorm1d`` (training mode) and a sigmoid, takes a squared error against random targets,
    and backpropagates. Then shifts the bias by a random vector of norm-per-entry
    ``bias_shift`` and records how much the BN output moves.

    Returns
    -------
    BiasGradient
    """
    generator = torch.Generator().manual_seed(seed)
    kwargs = {"dtype": torch.float64}
    linear = torch.nn.Linear(in_features, out_features, bias=True, **kwargs).to(device)
    bn = torch_bn.BatchNorm1d(out_features, **kwargs).to(device)
    with torch.no_grad():
        for p in (*linear.parameters(), bn.weight, bn.bias):
            p.copy_(torch.randn(p.shape, generator=generator, **kwargs))
    x = torch.randn(batch_size, in_features, generator=generator, **kwargs).to(device)
    target = torch.rand(batch_size, out_features, generator=generator, **kwargs).to(device)
    y = bn(linear(x))
    loss = (torch.sigmoid(y) - target).square().mean()
    loss.backward()
    shift = bias_shift * torch.randn(out_features, generator=generator, **kwargs).to(device)
    with torch.no_grad():
        linear.bias.add_(shift)
        y_shifted = bn(linear(x))
    return BiasGradient(
        bias_grad=linear.bias.grad.cpu().numpy(),
        weight_grad=linear.weight.grad.cpu().numpy(),
        output_change=float((y_shifted - y.detach()).abs().max()),
    )


@dataclass
class BiasDuringTraining:
    """How far the hidden biases and weights of a BN network moved in training.

    Attributes
    ----------
    bias_change, weight_change : list of float
        Per hidden layer, the largest absolute change of an entry of the bias / weight.
    test_accuracy : float
    """

    bias_change: list[float]
    weight_change: list[float]
    test_accuracy: float


def bias_during_training(
    steps: int = 200,
    depth: int = 2,
    width: int = 64,
    lr: float = 0.5,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> BiasDuringTraining:
    """Train a BN sigmoid MLP on the digits *with* biases before BN (``bias=True``), plain SGD.

    Parameters
    ----------
    steps : int, default 200
    depth, width : int, default 2 and 64
        Hidden layers and units per layer.
    lr : float, default 0.5
    seed : int, default 0
        Seeds the weights and the batch order.
    device : optional
        Default :func:`bncourse.get_device`.

    Returns
    -------
    BiasDuringTraining
    """
    model = make_mlp(64, 10, depth=depth, width=width, norm="bn", bias=True, seed=seed)
    before = [
        (b.linear.weight.detach().clone(), b.linear.bias.detach().clone()) for b in model.hidden
    ]
    history = train(
        model, load_digits(), steps=steps, lr=lr, seed=seed, eval_every=0, device=device
    )
    bias_change, weight_change = [], []
    for block, (weight, bias) in zip(model.hidden, before, strict=True):
        weight_change.append(float((block.linear.weight.detach().cpu() - weight).abs().max()))
        bias_change.append(float((block.linear.bias.detach().cpu() - bias).abs().max()))
    return BiasDuringTraining(bias_change, weight_change, history.final_test_accuracy)


# ---------------------------------------------------------------------------------------------
# Training with and without the affine step
# ---------------------------------------------------------------------------------------------


@dataclass
class AffineComparison:
    """What :func:`compare_affine` returns; dicts are keyed by "BN" and "BN (no affine)".

    Attributes
    ----------
    histories : dict of str to TrainingHistory
        Also holds the linear baseline under "linear" when it was trained.
    gamma, beta : list of np.ndarray, shape (width,)
        The learned gamma and beta of each hidden layer of the "BN" network.
    linearity : dict of str to list of np.ndarray
        Per hidden layer, :func:`unit_linearity` over the training split (evaluation mode).
    """

    histories: dict[str, TrainingHistory]
    gamma: list[np.ndarray]
    beta: list[np.ndarray]
    linearity: dict[str, list[np.ndarray]]

    def final_train_loss(self, label: str, last: int = 50) -> float:
        """Mean training loss over the last ``last`` steps of run ``label``."""
        return float(np.mean(self.histories[label].train_loss[-last:]))


def compare_affine(
    steps: int = 400,
    depth: int = 3,
    width: int = 100,
    lr: float = 0.5,
    batch_size: int = 60,
    eval_every: int = 25,
    include_linear: bool = True,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> AffineComparison:
    """Train the same sigmoid MLP on the digits with ``norm="bn"`` and ``norm="bn_no_affine"``.

    Both start from the same seed and see the same batches (plain SGD). With ``include_linear``
    a linear classifier (``depth=0``) is trained the same way as a baseline, under the label
    ``"linear"`` in ``histories``.

    Returns
    -------
    AffineComparison
    """
    data = load_digits()

    def fit(model: torch.nn.Module) -> TrainingHistory:
        """Train ``model`` in place the way every run of the comparison is trained."""
        return train(
            model,
            data,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            eval_every=eval_every,
            device=device,
        )

    histories, linearity = {}, {}
    gamma = beta = []
    for norm in ("bn", "bn_no_affine"):
        label = LABELS[norm]
        model = make_mlp(64, 10, depth=depth, width=width, norm=norm, seed=seed)
        histories[label] = fit(model)
        linearity[label] = _layer_linearity(model, data.x_train)
        if norm == "bn":
            gamma, beta = _learned_affine(model)
    if include_linear:
        histories["linear"] = fit(make_mlp(64, 10, depth=0, seed=seed))
    return AffineComparison(histories, gamma, beta, linearity)
