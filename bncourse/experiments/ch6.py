"""Experiments of chapter 6: why does batch norm work? The evidence after 2015.

Each function takes keyword arguments with small defaults (seconds on a CPU core) and returns
plain data (NumPy arrays in dataclasses); the notebook plots and asserts. The measurements come
from :mod:`bncourse.analysis`, the training from :func:`bncourse.training.train` (its per-step
callback does the probing).

* :func:`probe_training`: plain, BN and noisy-BN networks trained with internal covariate shift
  (Santurkar et al.'s definition) and the loss landscape probed along the way.
* :func:`weight_decay_runs`: weight norms, effective learning rates and angular updates of
  scale-invariant weights with and without weight decay.
* :func:`gradients_at_init`: per-layer gradient norms of deep networks at initialisation.
* :func:`jacobian_spectra`: singular values of layer Jacobians, at initialisation and trained.
* :func:`constant_channel`: the forward and backward of batch norm on a channel of zero variance.
* :func:`batch_noise`, :func:`generalisation_gap`: the noise of batch statistics, and the
  train-test gap against the number of examples behind each statistic (ghost batches).
* :func:`dropout_variance_shift`: Li et al.'s (2019) variance shift of dropout before batch norm.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bncourse import analysis, get_device, torch_bn
from bncourse.data import BatchSampler, Dataset, load_digits
from bncourse.inference import recompute_population_statistics
from bncourse.models import MLP, make_mlp
from bncourse.training import TrainingHistory, evaluate, train

__all__ = [
    "VARIANTS",
    "InjectedNoise",
    "make_variant",
    "ProbedRun",
    "probe_training",
    "WeightDecayRun",
    "weight_decay_runs",
    "ResidualMLP",
    "gradients_at_init",
    "jacobian_spectra",
    "ConstantChannel",
    "constant_channel",
    "batch_noise",
    "GhostBatchNorm",
    "GapResult",
    "generalisation_gap",
    "DropoutMLP",
    "VarianceShift",
    "dropout_variance_shift",
]

VARIANTS: tuple[str, ...] = ("no BN", "BN", "noisy BN")
"""The networks compared in :func:`probe_training`."""


def _fit(model: nn.Module, data: Dataset, **kwargs) -> TrainingHistory:
    """:func:`bncourse.training.train` without intermediate evaluations (``eval_every=0``)."""
    return train(model, data, eval_every=0, **kwargs)


class InjectedNoise(nn.Module):
    """Random, time-varying scale and shift of each unit, applied after a batch norm in training.

    Santurkar et al. (2018) injected noise "with non-zero mean and non-unit variance" after
    every batch-norm layer, changing at every step, so that the distribution each layer sees
    moves all the time. Here each unit ``j`` is mapped to ``scale_j * x + shift_j`` with
    ``shift_j`` drawn from U(-shift_range, shift_range) and ``scale_j`` from U(1, max_scale);
    :meth:`advance` draws new values (call it after every update). In evaluation mode it applies
    the noise's expected value, ``(1 + max_scale) / 2 * x``, which the next layer saw on average.
    """

    def __init__(self, num_features: int, *, shift_range: float, max_scale: float, seed: int = 0):
        super().__init__()
        if shift_range < 0 or max_scale < 1:
            raise ValueError(
                f"need shift_range >= 0 and max_scale >= 1, got {shift_range}, {max_scale}"
            )
        self.num_features = num_features
        self.shift_range = shift_range
        self.max_scale = max_scale
        self.rng = np.random.default_rng(seed)
        self.register_buffer("scale", torch.ones(num_features))
        self.register_buffer("shift", torch.zeros(num_features))
        self.advance()

    def advance(self) -> None:
        """Draw a new scale and shift for every unit."""
        n = self.num_features
        scale = self.rng.uniform(1.0, self.max_scale, n)
        shift = self.rng.uniform(-self.shift_range, self.shift_range, n)
        self.scale.copy_(torch.as_tensor(scale, dtype=self.scale.dtype))
        self.shift.copy_(torch.as_tensor(shift, dtype=self.shift.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return x * self.scale + self.shift
        return x * ((1.0 + self.max_scale) / 2.0)


def _advance_noise(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, InjectedNoise):
            module.advance()


def make_variant(
    variant: str,
    *,
    depth: int = 4,
    width: int = 64,
    activation: str = "relu",
    shift_range: float = 1.0,
    max_scale: float = 2.0,
    seed: int = 0,
) -> MLP:
    """A digits MLP without BN, with BN, or with BN followed by :class:`InjectedNoise`.

    Parameters
    ----------
    variant : {"no BN", "BN", "noisy BN"}
    depth, width, activation
        As in :func:`bncourse.models.make_mlp` (64 inputs, 10 classes).
    shift_range, max_scale : float
        The noise of the noisy variant.
    seed : int
        Seed of the weights (and of the noise).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    norm = None if variant == "no BN" else "bn"
    model = make_mlp(64, 10, depth=depth, width=width, activation=activation, norm=norm, seed=seed)
    if variant == "noisy BN":
        for i, block in enumerate(model.hidden):
            noise = InjectedNoise(
                width, shift_range=shift_range, max_scale=max_scale, seed=seed * 1000 + i
            )
            block.norm = nn.Sequential(block.norm, noise)
    return model


@dataclass
class ProbedRun:
    """One network trained by :func:`probe_training`, with its probes.

    Attributes
    ----------
    train_loss : np.ndarray, shape (S,)
        Training loss at every step.
    test_accuracy : float
        Final test accuracy (evaluation mode).
    probe_steps : np.ndarray, shape (P,)
        Steps (updates done) at which the probes ran.
    shift_l2, shift_relative, shift_cosine : np.ndarray, shape (P, depth)
        Internal covariate shift of layers 1 .. depth (output last) at each probe:
        ``||G - G'||``, ``||G - G'|| / ||G||`` and the cosine between ``G`` and ``G'``.
    probe_losses : np.ndarray, shape (P, K)
        Loss at each probed step size along the gradient.
    probe_start_loss : np.ndarray, shape (P,)
        Loss at the probed point itself (step size 0).
    loss_range, gradient_change, beta_smoothness : np.ndarray, shape (P,)
        From :class:`bncourse.analysis.GradientProbe` at each probe.
    model : nn.Module
        The trained network (on the CPU, evaluation mode).
    """

    train_loss: np.ndarray
    test_accuracy: float
    probe_steps: np.ndarray
    shift_l2: np.ndarray
    shift_relative: np.ndarray
    shift_cosine: np.ndarray
    probe_losses: np.ndarray
    probe_start_loss: np.ndarray
    loss_range: np.ndarray
    gradient_change: np.ndarray
    beta_smoothness: np.ndarray
    model: nn.Module = field(repr=False)

    def steps_to_loss(self, threshold: float, window: int = 20) -> int | None:
        """First step ``t`` whose mean loss over steps ``t - window + 1 .. t`` is below threshold.

        None if the running mean never goes below ``threshold``.
        """
        kernel = np.ones(window) / window
        smooth = np.convolve(self.train_loss, kernel, mode="valid")
        below = np.flatnonzero(smooth < threshold)
        return int(below[0] + window - 1) if below.size else None


def probe_training(
    variants: Sequence[str] = VARIANTS,
    *,
    steps: int = 300,
    probe_every: int = 50,
    lr: float = 0.1,
    batch_size: int = 64,
    depth: int = 4,
    width: int = 64,
    step_sizes: Sequence[float] = (0.05, 0.1, 0.2, 0.4),
    shift_range: float = 1.0,
    max_scale: float = 2.0,
    data: Dataset | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, ProbedRun]:
    """Train each variant with SGD and probe it every ``probe_every`` steps.

    At each probe, on the mini-batch of that step: the internal covariate shift of every layer
    (:func:`bncourse.analysis.internal_covariate_shift` with the step's ``lr``; for the noisy
    variant the noise is redrawn after the update below, since it is part of what moves) and the
    loss landscape along the gradient (:func:`bncourse.analysis.gradient_probe`). All variants
    start from the same weights (same ``seed``) and see the same batches.

    Returns
    -------
    dict of str to ProbedRun
        Keyed by variant.
    """
    data = load_digits() if data is None else data
    device = get_device(device)
    runs = {}
    for variant in variants:
        model = make_variant(
            variant,
            depth=depth,
            width=width,
            shift_range=shift_range,
            max_scale=max_scale,
            seed=seed,
        )
        records: dict[str, list] = {"steps": [], "l2": [], "rel": [], "cos": [], "probe": []}

        def callback(step, model, inputs, labels, records=records):
            if step % probe_every == 0:
                shift = analysis.internal_covariate_shift(
                    model, inputs, labels, lr, after_update=_advance_noise
                )
                records["steps"].append(step)
                records["l2"].append(shift.l2)
                records["rel"].append(shift.relative)
                records["cos"].append(shift.cosine)
                records["probe"].append(analysis.gradient_probe(model, inputs, labels, step_sizes))
            _advance_noise(model)

        history = _fit(
            model,
            data,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            device=device,
            callback=callback,
        )
        probes = records["probe"]
        runs[variant] = ProbedRun(
            train_loss=history.train_loss,
            test_accuracy=history.final_test_accuracy,
            probe_steps=np.array(records["steps"]),
            shift_l2=np.array(records["l2"]),
            shift_relative=np.array(records["rel"]),
            shift_cosine=np.array(records["cos"]),
            probe_losses=np.array([p.losses for p in probes]),
            probe_start_loss=np.array([p.loss for p in probes]),
            loss_range=np.array([p.loss_range for p in probes]),
            gradient_change=np.array([p.max_gradient_change for p in probes]),
            beta_smoothness=np.array([p.beta_smoothness for p in probes]),
            model=model.cpu().eval(),
        )
    return runs


@dataclass
class WeightDecayRun:
    """Scale-invariant weights over training (:func:`weight_decay_runs`).

    Attributes
    ----------
    lr, weight_decay, init_scale : float
        The run's settings.
    norms : np.ndarray, shape (S + 1, depth)
        ``||W_i||`` of every hidden layer before training and after every update.
    angles : np.ndarray, shape (S, depth)
        Angle (radians) by which each update turned each ``W_i``.
    train_loss : np.ndarray, shape (S,)
    test_accuracy : float
    """

    lr: float
    weight_decay: float
    init_scale: float
    norms: np.ndarray
    angles: np.ndarray
    train_loss: np.ndarray
    test_accuracy: float

    @property
    def effective_lr(self) -> np.ndarray:
        """``lr / ||W_i||**2``, shape (S + 1, depth)."""
        return analysis.effective_learning_rates(self.lr, self.norms)

    @property
    def equilibrium_angle(self) -> float:
        """``sqrt(2 lr weight_decay)``: the angular update per step at the norm's equilibrium."""
        return float(np.sqrt(2 * self.lr * self.weight_decay))


def weight_decay_runs(
    settings: Sequence[tuple[float, float, float]] = (
        (0.1, 0.0, 1.0),
        (0.1, 0.1, 1.0),
        (0.4, 0.025, 2.0),
    ),
    *,
    steps: int = 300,
    batch_size: int = 64,
    depth: int = 3,
    width: int = 64,
    bn_eps: float = 1e-5,
    data: Dataset | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> list[WeightDecayRun]:
    """Train a network whose every trained weight is scale-invariant, for several settings.

    The network is a ReLU MLP with batch norm without affine parameters after every hidden linear
    layer (no biases) and a *fixed* random output layer (Hoffer et al., 2018, show that a fixed
    classifier costs little). Every trained parameter is then followed by batch norm, so the loss
    does not depend on its scale, and SGD with learning rate ``lr`` and weight decay ``wd`` from
    initial weights scaled by ``c`` follows the same functions as ``(c**2 lr, wd / c**2)`` from
    scale ``c``: the effective learning rate ``lr / ||W||**2`` is what matters.

    Parameters
    ----------
    settings : sequence of (lr, weight_decay, init_scale)
        One run per setting, all from the same seed (same directions of the initial weights,
        same batches).
    bn_eps : float, default 1e-5
        The batch norms' ``eps``. It is the one thing that breaks scale invariance (the
        variance it is added to scales with ``||W||**2``, it does not); with a tiny ``eps`` the
        equivalent settings give the same losses to the last bit.
    steps, batch_size, depth, width, data, seed, device
        As usual.

    Returns
    -------
    list of WeightDecayRun
    """
    data = load_digits() if data is None else data
    device = get_device(device)
    runs = []
    for lr, weight_decay, init_scale in settings:
        model = make_mlp(
            64,
            10,
            depth=depth,
            width=width,
            activation="relu",
            norm="bn_no_affine",
            init_scale=init_scale,
            seed=seed,
        )
        model.output.requires_grad_(False)
        for block in model.hidden:
            block.norm.eps = bn_eps
        weights = analysis.hidden_weights(model)
        previous = [w.detach().clone() for w in weights]
        norms = [analysis.weight_norms(model)]
        angles = []

        def callback(step, model, inputs, labels, previous=previous, norms=norms, angles=angles):
            row = []
            for i, w in enumerate(analysis.hidden_weights(model)):
                pair = torch.stack([previous[i].flatten(), w.detach().flatten()]).cpu()
                row.append(analysis.angular_updates(pair.double().numpy())[0])
                previous[i] = w.detach().clone()
            angles.append(row)
            norms.append(analysis.weight_norms(model))

        history = _fit(
            model,
            data,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            seed=seed,
            device=device,
            callback=callback,
        )
        runs.append(
            WeightDecayRun(
                lr=lr,
                weight_decay=weight_decay,
                init_scale=init_scale,
                norms=np.array(norms),
                angles=np.array(angles),
                train_loss=history.train_loss,
                test_accuracy=history.final_test_accuracy,
            )
        )
    return runs


class _ResidualBlock(nn.Module):
    def __init__(self, width: int, norm: bool):
        super().__init__()
        self.linear = nn.Linear(width, width, bias=not norm)
        self.norm = torch_bn.BatchNorm1d(width) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.linear(x)
        return x + torch.relu(z if self.norm is None else self.norm(z))


class ResidualMLP(nn.Module):
    """A stack of residual blocks ``h + relu(BN(W h))`` after a linear input layer.

    Laid out like :class:`bncourse.models.MLP` for :mod:`bncourse.analysis`: ``hidden`` holds the
    input layer (a plain linear map, as ``.linear`` of its block) and the residual blocks, each
    with ``.linear``; ``output`` is the final linear layer.
    """

    def __init__(self, in_features: int, num_classes: int, depth: int, width: int, norm: bool):
        super().__init__()
        stem = nn.Module()
        stem.linear = nn.Linear(in_features, width)
        self.stem = stem
        blocks = [_ResidualBlock(width, norm) for _ in range(depth - 1)]
        self.hidden = nn.ModuleList([stem, *blocks])
        self.output = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem.linear(x.flatten(1))
        for block in self.hidden[1:]:
            h = block(h)
        return self.output(h)


def gradients_at_init(
    *,
    depth: int = 32,
    width: int = 128,
    batch_size: int = 128,
    num_batches: int = 3,
    networks: Sequence[str] = ("BN", "no BN", "residual BN"),
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Norm of each hidden layer's weight gradient at initialisation, for deep ReLU networks.

    Yang et al. (2019) showed that a deep fully connected network with batch norm and no skip
    connections has gradients that explode with depth at initialisation, whatever the weights'
    scale. The networks: "BN" (``Linear -> BN -> ReLU`` blocks, :func:`~bncourse.models.make_mlp`),
    "no BN" (``Linear -> ReLU``, PyTorch's default initialisation) and "residual BN"
    (:class:`ResidualMLP`). The norms are averaged over ``num_batches`` training batches of the
    digits (CPU, float32).

    Returns
    -------
    dict of str to np.ndarray, shape (depth,)
        Per network, the gradient norm of hidden layer 1 .. depth (first layer first).
    """
    data = load_digits()
    x, y = data.x_train, data.y_train
    batches = BatchSampler(len(x), batch_size, seed=seed).take(num_batches)
    result = {}
    for name in networks:
        if name == "residual BN":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = ResidualMLP(64, 10, depth, width, norm=True)
        elif name in ("BN", "no BN"):
            norm = "bn" if name == "BN" else None
            model = make_mlp(
                64, 10, depth=depth, width=width, activation="relu", norm=norm, seed=seed
            )
        else:
            raise ValueError(f"unknown network {name!r}")
        norms = [
            analysis.layer_gradient_norms(
                model, torch.as_tensor(x[index]), torch.as_tensor(y[index])
            )
            for index in batches
        ]
        result[name] = np.mean(norms, axis=0)
    return result


def jacobian_spectra(
    models: dict[str, nn.Module], x: torch.Tensor, *, include_activation: bool = False
) -> dict[str, np.ndarray]:
    """Singular values of every hidden layer's Jacobian, pooled over layers and examples.

    Parameters
    ----------
    models : dict of str to nn.Module
        MLP-like models (for example the trained networks of :func:`probe_training`).
    x : torch.Tensor, shape (N, in_features)
        The points (examples) at which to differentiate, on the models' device.
    include_activation : bool
        See :func:`bncourse.analysis.layer_jacobian_singular_values`.

    Returns
    -------
    dict of str to np.ndarray, shape (depth, N * min(fan_in, width))
        Per model, the singular values of each layer (rows), all examples pooled.
    """
    return {
        name: np.stack(
            [
                values.reshape(-1)
                for values in analysis.layer_jacobian_singular_values(
                    model, x, include_activation=include_activation
                )
            ]
        )
        for name, model in models.items()
    }


@dataclass
class ConstantChannel:
    """Batch norm on a channel of zero variance (:func:`constant_channel`).

    Attributes
    ----------
    eps : np.ndarray, shape (E,)
    output : np.ndarray, shape (E,)
        The largest ``|y - beta|`` of the constant channel over the batch.
    gain : np.ndarray, shape (E,)
        ``||dL/dz|| / ||dL/dy - mean(dL/dy)||`` for the constant channel: the backward's gain.
    weight_gradient : np.ndarray, shape (E,)
        Norm of the gradient of the row of the layer below that produces the constant channel.
    other_weight_gradient : np.ndarray, shape (E,)
        Median gradient norm of the other rows.
    gamma : float
    """

    eps: np.ndarray
    output: np.ndarray
    gain: np.ndarray
    weight_gradient: np.ndarray
    other_weight_gradient: np.ndarray
    gamma: float


def constant_channel(
    eps_values: Sequence[float] = (1e-1, 1e-3, 1e-5, 1e-8),
    *,
    gamma: float = 1.0,
    batch_size: int = 32,
    in_features: int = 16,
    channels: int = 8,
    seed: int = 0,
) -> ConstantChannel:
    """A linear layer whose channel 0 is constant, then our batch norm, then a random head.

    Row 0 of the linear layer's weight is zero, so channel 0 is 0 for every example (a dead
    input or unit does this in a real network). Batch norm maps it to ``beta`` in the forward;
    in the backward it multiplies the centred incoming gradient by ``gamma / sqrt(eps)``, which
    reaches row 0 of the weight. The loss is the cross-entropy of a fixed random linear head.

    Returns
    -------
    ConstantChannel
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, in_features, generator=generator, dtype=torch.float64)
    w0 = torch.randn(channels, in_features, generator=generator, dtype=torch.float64)
    w0[0] = 0.0
    head = torch.randn(10, channels, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 10, (batch_size,), generator=generator)
    weight_bn = torch.full((channels,), gamma, dtype=torch.float64)
    bias_bn = torch.linspace(-0.5, 0.5, channels, dtype=torch.float64)
    rows = {key: [] for key in ("output", "gain", "row0", "others")}
    for eps in eps_values:
        w = w0.clone().requires_grad_(True)
        z = x @ w.T
        z.retain_grad()
        y = torch_bn.batch_norm(z, None, None, weight_bn, bias_bn, training=True, eps=eps)
        y.retain_grad()
        F.cross_entropy(y @ head.T, labels).backward()
        g = y.grad[:, 0]
        rows["output"].append(float((y[:, 0] - bias_bn[0]).abs().max().detach()))
        rows["gain"].append(float(z.grad[:, 0].norm() / (g - g.mean()).norm()))
        row_norms = w.grad.norm(dim=1)
        rows["row0"].append(float(row_norms[0]))
        rows["others"].append(float(row_norms[1:].median()))
    return ConstantChannel(
        eps=np.asarray(eps_values, dtype=np.float64),
        output=np.array(rows["output"]),
        gain=np.array(rows["gain"]),
        weight_gradient=np.array(rows["row0"]),
        other_weight_gradient=np.array(rows["others"]),
        gamma=gamma,
    )


def batch_noise(
    model: nn.Module,
    data: Dataset,
    batch_sizes: Sequence[int] = (4, 8, 16, 32, 64, 128),
    *,
    num_examples: int = 10,
    num_batches: int = 40,
    seed: int = 0,
) -> np.ndarray:
    """Spread of an example's logits across random batches, against batch size.

    :func:`bncourse.analysis.output_spread` for ``num_examples`` test examples (batch-mates from
    the training split), averaged over the examples.

    Returns
    -------
    np.ndarray, shape (len(batch_sizes),)
    """
    device = next(model.parameters()).device
    x_train, _, x_test, _ = data.tensors(device)
    return np.array(
        [
            np.mean(
                [
                    analysis.output_spread(
                        model, x_test[k], x_train, b, num_batches=num_batches, seed=seed + k
                    )
                    for k in range(num_examples)
                ]
            )
            for b in batch_sizes
        ]
    )


class GhostBatchNorm(nn.Module):
    """Batch norm whose training statistics come from ghost batches of ``ghost_size`` examples.

    Hoffer et al. (2017): the training batch is split into consecutive chunks of ``ghost_size``
    examples and each chunk is normalised with its own mean and variance. The gradient step still
    uses the whole batch, so the noise of the batch statistics changes while the noise of SGD
    does not. The chunks are normalised in one call of :func:`bncourse.torch_bn.batch_norm` (each
    (chunk, channel) pair is a channel of its own); the wrapped layer's running statistics are
    updated once per batch with the average of the chunks' means and unbiased variances. In
    evaluation mode, or when the batch is not a multiple of ``ghost_size``, it is the wrapped
    batch norm.

    Parameters
    ----------
    norm : bncourse.torch_bn.BatchNorm1d or torch.nn.BatchNorm1d
        An affine batch norm with running statistics and a numeric ``momentum``, input (N, C).
    ghost_size : int
        Examples per statistic, at least 2.
    """

    def __init__(self, norm: nn.Module, ghost_size: int):
        super().__init__()
        if ghost_size < 2:
            raise ValueError(f"ghost_size must be at least 2, got {ghost_size}")
        self.norm = norm
        self.ghost_size = ghost_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm, g = self.norm, self.ghost_size
        n, c = x.shape
        if not self.training or n % g != 0 or n == g:
            return norm(x)
        k = n // g
        grouped = x.reshape(k, g, c).transpose(0, 1).reshape(g, k * c)
        out = torch_bn.batch_norm(
            grouped, None, None, norm.weight.repeat(k), norm.bias.repeat(k), True, 0.0, norm.eps
        )
        with torch.no_grad():
            m = norm.momentum
            norm.running_mean.mul_(1 - m).add_(m * grouped.mean(0).reshape(k, c).mean(0))
            norm.running_var.mul_(1 - m).add_(m * grouped.var(0).reshape(k, c).mean(0))
            norm.num_batches_tracked.add_(1)
        return out.reshape(g, k, c).transpose(0, 1).reshape(n, c)


@dataclass
class GapResult:
    """Train and test loss and accuracy against the batch size of the statistics.

    Attributes
    ----------
    ghost_sizes : np.ndarray, shape (B,)
        Examples per batch-norm statistic (the training batch is ``batch_size``).
    train_accuracy, test_accuracy, train_loss, test_loss : np.ndarray, shape (B,)
        In evaluation mode on the whole split, averaged over the seeds.
    """

    ghost_sizes: np.ndarray
    train_accuracy: np.ndarray
    test_accuracy: np.ndarray
    train_loss: np.ndarray
    test_loss: np.ndarray

    @property
    def gap(self) -> np.ndarray:
        """Test loss minus training loss, shape (B,)."""
        return self.test_loss - self.train_loss


def generalisation_gap(
    ghost_sizes: Sequence[int] = (4, 16, 128),
    *,
    batch_size: int = 128,
    steps: int = 300,
    lr: float = 0.1,
    depth: int = 3,
    width: int = 64,
    seeds: Sequence[int] = (0,),
    data: Dataset | None = None,
    device: torch.device | str | None = None,
) -> GapResult:
    """Train BN networks whose statistics use ghost batches of several sizes.

    Every run trains the same ReLU MLP (``depth`` hidden layers with batch norm) with the same
    batches of ``batch_size`` examples, learning rate and number of steps; only the number of
    examples behind each batch-norm statistic changes (:class:`GhostBatchNorm`). Results are
    averaged over ``seeds`` (weights and batch order).

    Returns
    -------
    GapResult
    """
    data = load_digits() if data is None else data
    device = get_device(device)
    x_train, y_train, x_test, y_test = data.tensors(device)
    results = np.zeros((len(ghost_sizes), len(seeds), 4))
    for i, ghost in enumerate(ghost_sizes):
        for j, seed in enumerate(seeds):
            model = make_mlp(
                64, 10, depth=depth, width=width, activation="relu", norm="bn", seed=seed
            )
            for block in model.hidden:
                block.norm = GhostBatchNorm(block.norm, ghost)
            _fit(model, data, steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device)
            results[i, j] = (*evaluate(model, x_train, y_train), *evaluate(model, x_test, y_test))
    mean = results.mean(axis=1)
    return GapResult(
        ghost_sizes=np.asarray(ghost_sizes),
        train_loss=mean[:, 0],
        train_accuracy=mean[:, 1],
        test_loss=mean[:, 2],
        test_accuracy=mean[:, 3],
    )


class DropoutMLP(nn.Module):
    """A ReLU MLP with batch norm and dropout, the dropout before or after the batch norms.

    ``position="before"``: every hidden block is ``Dropout -> Linear -> BN -> ReLU`` (dropout
    feeds the batch norm: Li et al.'s harmful order). ``position="after"``: blocks are
    ``Linear -> BN -> ReLU`` and one dropout sits after the last block, before the output layer
    (no batch norm after it). ``position="none"``: no dropout.
    """

    def __init__(self, depth: int, width: int, p: float, position: str, seed: int = 0):
        super().__init__()
        if position not in ("before", "after", "none"):
            raise ValueError(f"position must be 'before', 'after' or 'none', got {position!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layers: list[nn.Module] = []
            fan_in = 64
            for _ in range(depth):
                if position == "before":
                    layers.append(nn.Dropout(p))
                layers += [nn.Linear(fan_in, width, bias=False), torch_bn.BatchNorm1d(width)]
                layers.append(nn.ReLU())
                fan_in = width
            if position == "after":
                layers.append(nn.Dropout(p))
            layers.append(nn.Linear(fan_in, 10))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


@dataclass
class VarianceShift:
    """Li et al.'s variance shift and its cost (:func:`dropout_variance_shift`).

    Attributes
    ----------
    positions : tuple of str
        The dropout positions trained.
    shift : dict of str to np.ndarray, shape (depth,)
        Per batch norm, the median over units of ``running_var / test-time variance`` of its
        input (1: no shift).
    accuracy : dict of str to float
        Test accuracy in evaluation mode with the running statistics.
    accuracy_recomputed : dict of str to float
        Test accuracy after recomputing the statistics with dropout off.
    """

    positions: tuple[str, ...]
    shift: dict[str, np.ndarray]
    accuracy: dict[str, float]
    accuracy_recomputed: dict[str, float]


@torch.no_grad()
def _eval_input_variances(model: DropoutMLP, x: torch.Tensor) -> list[torch.Tensor]:
    """Variance of each batch norm's input in evaluation mode (dropout off) over ``x``."""
    variances, h = [], x.flatten(1)
    model.eval()
    for layer in model.net:
        if isinstance(layer, torch_bn.BatchNorm1d):
            variances.append(h.var(dim=0))
        h = layer(h)
    return variances


def dropout_variance_shift(
    positions: Sequence[str] = ("none", "after", "before"),
    *,
    p: float = 0.5,
    depth: int = 3,
    width: int = 128,
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 0.1,
    data: Dataset | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> VarianceShift:
    """Train :class:`DropoutMLP` for each dropout position and measure the variance shift.

    In training, dropout before a batch norm adds its noise to the batch norm's input, whose
    running variance learns the noisy variance; at test time dropout is off and the input's
    variance is smaller, so the layer divides by too large a standard deviation (Li et al.,
    2019). The shift is measured per batch norm as running variance over the variance of its
    input with dropout off on the training split; the cost as the test accuracy gained by
    recomputing the statistics with dropout off (:func:`~bncourse.inference.
    recompute_population_statistics`).

    Returns
    -------
    VarianceShift
    """
    data = load_digits() if data is None else data
    device = get_device(device)
    shift, accuracy, recomputed = {}, {}, {}
    for position in positions:
        model = DropoutMLP(depth, width, 0.0 if position == "none" else p, position, seed=seed)
        _fit(model, data, steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device)
        x_train, _, x_test, y_test = data.tensors(device)
        norms = [m for m in model.net if isinstance(m, torch_bn.BatchNorm1d)]
        test_vars = _eval_input_variances(model, x_train)
        shift[position] = np.array(
            [
                float((bn.running_var / v.clamp_min(1e-12)).median())
                for bn, v in zip(norms, test_vars, strict=True)
            ]
        )
        accuracy[position] = evaluate(model, x_test, y_test)[1]
        fixed = copy.deepcopy(model)
        sampler = BatchSampler(len(x_train), 256, seed=seed)
        batches = sampler.take(sampler.batches_per_epoch)
        recompute_population_statistics(fixed, [x_train[torch.as_tensor(i)] for i in batches])
        recomputed[position] = evaluate(fixed, x_test, y_test)[1]
    return VarianceShift(tuple(positions), shift, accuracy, recomputed)
