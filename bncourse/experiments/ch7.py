"""Experiments of chapter 7: the normalization family and batch norm in modern architectures.

* :func:`axes_masks`: which elements of a (batch, channel, position) cube share statistics
  with one element, for each layer of the family (found with :mod:`bncourse.numpy_norm`).
* :func:`batch_dependence`: does an example's output depend on its batch-mates, do training and
  evaluation agree, which layers keep running statistics.
* :func:`make_sequence_task` / :func:`sequence_experiment`: a small transformer on padded,
  variable-length sequences with BN over (batch, time), masked BN, LayerNorm or RMSNorm.
* :func:`norm_timing`: forward + backward time of LayerNorm and RMSNorm.
* :func:`placement_experiment`: BN before or after the ReLU in the digits MLP and CNN.
* :func:`stream_variance`: the residual stream's variance against depth at initialisation.
* :func:`residual_training`: a deep residual network trained with each way of normalising.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from bncourse import numpy_norm, torch_norm
from bncourse.architectures import PAD, PlacementNet, ResNet, SequenceClassifier
from bncourse.data import Dataset, load_digits
from bncourse.fast import native
from bncourse.models import make_cnn, make_mlp
from bncourse.torch_bn import BatchNorm1d
from bncourse.training import TrainingHistory, train
from bncourse.utils import interleaved_times, memory_policy, torch_threads

__all__ = [
    "FAMILY",
    "axes_masks",
    "BatchDependenceRow",
    "batch_dependence",
    "make_sequence_task",
    "SequenceResult",
    "sequence_experiment",
    "norm_timing",
    "PlacementResult",
    "placement_experiment",
    "RESIDUAL_VARIANTS",
    "stream_variance",
    "residual_training",
]

FAMILY: tuple[str, ...] = ("BatchNorm", "LayerNorm", "InstanceNorm", "GroupNorm")
"""The layers drawn in the axes figure (RMSNorm shares LayerNorm's axes)."""


def axes_masks(
    shape: tuple[int, int, int] = (4, 6, 5), index: tuple[int, int, int] = (0, 0, 0)
) -> dict[str, np.ndarray]:
    """For each layer, the elements of an (N, C, positions) input sharing statistics with
    ``index`` (bool arrays of ``shape``; GroupNorm with 2 groups)."""
    return {
        layer: numpy_norm.shared_statistics(layer, shape, index, num_groups=2)
        for layer in FAMILY + ("RMSNorm",)
    }


# ---------------------------------------------------------------------------------------------
# Batch dependence, train/eval, running statistics


@dataclass
class BatchDependenceRow:
    """One layer's answers in :func:`batch_dependence`.

    Attributes
    ----------
    layer : str
    batch_change : float
        Largest change of example 0's output (training mode) when its batch-mates are replaced.
    train_eval_gap : float
        Largest difference between the training-mode and evaluation-mode outputs of a batch
        (after one training-mode batch has updated any running statistics).
    buffers : list of str
        The layer's buffers (running statistics, if it keeps them).
    """

    layer: str
    batch_change: float
    train_eval_gap: float
    buffers: list[str]


def _dependence_layers(channels: int, length: int) -> dict[str, nn.Module]:
    return {
        "BatchNorm1d": BatchNorm1d(channels),
        "LayerNorm": torch_norm.LayerNorm((channels, length)),
        "InstanceNorm1d": torch_norm.InstanceNorm1d(channels),
        "InstanceNorm1d (tracking)": torch_norm.InstanceNorm1d(channels, track_running_stats=True),
        "GroupNorm": torch_norm.GroupNorm(2, channels),
        "RMSNorm": torch_norm.RMSNorm((channels, length)),
    }


def batch_dependence(
    seed: int = 0, batch_size: int = 8, channels: int = 4, length: int = 6
) -> list[BatchDependenceRow]:
    """Feed the same example with two sets of batch-mates through each layer, and compare
    training and evaluation modes after one training step's worth of statistics.

    Inputs are (batch_size, channels, length); the batch-mates of the second batch are drawn
    with a different mean and scale, as a batch of other data would be.
    """
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, channels, length)
    batch_a = torch.randn(shape, generator=generator)
    batch_b = 3.0 * torch.randn(shape, generator=generator) + 2.0
    batch_b[0] = batch_a[0]
    rows = []
    for name, layer in _dependence_layers(channels, length).items():
        layer.train()
        with torch.no_grad():
            change = (layer(batch_a)[0] - layer(batch_b)[0]).abs().max().item()
            train_out = layer(batch_a)
            layer.eval()
            gap = (train_out - layer(batch_a)).abs().max().item()
        rows.append(BatchDependenceRow(name, change, gap, [n for n, _ in layer.named_buffers()]))
    return rows


def _train(model: nn.Module, data: Dataset, seed: int, **options) -> TrainingHistory:
    """The book's training loop on the CPU, test accuracy every 50 steps."""
    return train(model, data, seed=seed, device="cpu", eval_every=50, **options)


# ---------------------------------------------------------------------------------------------
# Sequences: why transformers use LayerNorm


def make_sequence_task(
    num_train: int = 1500,
    num_test: int = 500,
    min_len: int = 3,
    max_len: int = 24,
    num_markers: int = 4,
    vocab_size: int = 10,
    seed: int = 0,
) -> Dataset:
    """Padded token sequences labelled by their most frequent marker token.

    Each sequence has a length drawn uniformly from ``min_len .. max_len`` and tokens drawn
    uniformly from ``1 .. vocab_size - 1``; tokens ``1 .. num_markers`` are the markers and the
    label is the marker that occurs most often (sequences with a tie are drawn again). Positions
    after the end hold :data:`~bncourse.architectures.PAD` (0). Features are stored as float32
    token ids of shape (max_len,).
    """
    rng = np.random.default_rng(seed)
    total = num_train + num_test
    x = np.full((total, max_len), PAD, dtype=np.float32)
    y = np.empty(total, dtype=np.int64)
    count = 0
    while count < total:
        length = int(rng.integers(min_len, max_len + 1))
        tokens = rng.integers(1, vocab_size, size=length)
        counts = np.bincount(tokens, minlength=vocab_size)[1 : num_markers + 1]
        if counts.max() == 0 or (counts == counts.max()).sum() > 1:
            continue
        x[count, :length] = tokens
        y[count] = int(counts.argmax())
        count += 1
    return Dataset(
        x[:num_train],
        y[:num_train],
        x[num_train:],
        y[num_train:],
        num_classes=num_markers,
        input_shape=(max_len,),
        name="markers",
    )


@dataclass
class SequenceResult:
    """One normalisation's run in :func:`sequence_experiment`.

    Attributes
    ----------
    norm : str
    history : TrainingHistory
    padding_fraction : float
        Fraction of the (batch, time) positions of a training batch that are padding (the
        share of BN's statistics that comes from padding, for ``norm="bn"``), mean over batches.
    statistics_shift : float
        At initialisation, in the first block's first norm: the largest difference, in units of
        the real tokens' standard deviation, between the per-feature mean over all positions
        (padding included, what plain BN uses) and over the real tokens only.
    batch_change : float
        Largest change of a test sequence's logits (training mode) between a batch of short
        and a batch of long sequences, after training.
    train_eval_disagreement : float
        Fraction of test sequences whose predicted class differs between training mode
        (batches of ``batch_size`` test sequences) and evaluation mode, after training.
    """

    norm: str
    history: TrainingHistory
    padding_fraction: float
    statistics_shift: float
    batch_change: float
    train_eval_disagreement: float
    config: dict = field(default_factory=dict)


def _first_norm_statistics_shift(model: SequenceClassifier, x: torch.Tensor) -> float:
    """How far padding moves the per-feature mean of the first norm's input, in real-token SDs."""
    tokens = x.round().long()
    mask = tokens != PAD
    with torch.no_grad():
        h = model.embedding(tokens) + model.position[: tokens.shape[1]]
        real = h[mask]
        all_mean = h.reshape(-1, h.shape[-1]).mean(dim=0)
        shift = (all_mean - real.mean(dim=0)).abs() / real.std(dim=0)
    return shift.max().item()


@torch.no_grad()
def _batch_change(model: SequenceClassifier, data: Dataset, batch_size: int) -> float:
    lengths = (data.x_test != PAD).sum(axis=1)
    order = np.argsort(lengths, kind="stable")
    probe = int(order[len(order) // 2])
    x = torch.tensor(data.x_test)
    short = x[order[: batch_size - 1]]
    long = x[order[-(batch_size - 1) :]]
    model.train()
    with_short = model(torch.cat([x[probe : probe + 1], short]))[0]
    with_long = model(torch.cat([x[probe : probe + 1], long]))[0]
    return (with_short - with_long).abs().max().item()


@torch.no_grad()
def _train_eval_disagreement(model: nn.Module, data: Dataset, batch_size: int) -> float:
    x = torch.tensor(data.x_test)
    model.eval()
    eval_pred = model(x).argmax(dim=1)
    model.train()
    train_pred = torch.cat([model(chunk).argmax(dim=1) for chunk in x.split(batch_size)])
    return (train_pred != eval_pred).float().mean().item()


def sequence_experiment(
    norms: tuple[str, ...] = ("bn", "bn_masked", "ln", "rms"),
    seed: int = 0,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 3e-3,
    d_model: int = 32,
    num_layers: int = 2,
    data: Dataset | None = None,
) -> list[SequenceResult]:
    """Train the same transformer with each normalisation on :func:`make_sequence_task`.

    Adam, ``steps`` updates of ``batch_size`` sequences, the same initial weights (``seed``)
    for the parts the variants share; the test split is evaluated every 50 steps. Runs on the
    CPU (the model is small).
    """
    data = make_sequence_task(seed=seed) if data is None else data
    vocab = int(max(data.x_train.max(), data.x_test.max())) + 1
    max_len = data.input_shape[0]
    pads = data.x_train == PAD
    sampler_fraction = float(pads.mean())
    results = []
    for norm in norms:
        model = SequenceClassifier(
            vocab, max_len, data.num_classes, d_model, 2, num_layers, norm, seed=seed
        )
        shift = _first_norm_statistics_shift(model, torch.tensor(data.x_train[:batch_size]))
        history = _train(
            model, data, seed, steps=steps, batch_size=batch_size, lr=lr, optimizer="adam"
        )
        trained = copy.deepcopy(model.state_dict())  # the probes below move running stats
        disagreement = _train_eval_disagreement(model, data, batch_size)
        model.load_state_dict(trained)
        change = _batch_change(model, data, batch_size)
        model.load_state_dict(trained)
        results.append(SequenceResult(norm, history, sampler_fraction, shift, change, disagreement))
    return results


def norm_timing(
    shape: tuple[int, ...] = (16, 128, 512), repeats: int = 15, seed: int = 0
) -> dict[str, float]:
    """Median CPU time (ms) of forward + backward of LayerNorm and RMSNorm over the last dim.

    Times this package's modules in both implementations of their fast kernels (the PyTorch
    operations, ``"(bncourse, operations)"``, and the fused C loop, ``"(bncourse, C)"``, left
    out where it cannot be built, see :mod:`bncourse.fast.native`), each the same code with and
    without centring, and PyTorch's modules, interleaved (:func:`bncourse.utils.interleaved_times`,
    ``repeats`` rounds after two warm-up calls) on one thread, in CPU time so that other
    processes on the machine count less, with freed memory kept by the process
    (:func:`bncourse.utils.memory_policy`) so that page faults do not decide the result.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator).requires_grad_(True)
    dy = torch.randn(shape, generator=generator)
    width = shape[-1]
    ours = {"LayerNorm": torch_norm.LayerNorm(width), "RMSNorm": torch_norm.RMSNorm(width)}
    theirs = {"LayerNorm": nn.LayerNorm(width), "RMSNorm": nn.RMSNorm(width)}
    variants = {"operations": False} | ({"C": True} if native.library() is not None else {})

    def step(layer: nn.Module) -> None:
        layer(x).backward(dy)

    def ours_step(layer: nn.Module, c_kernels: bool) -> None:
        with native.native_kernels(c_kernels):
            step(layer)

    calls = {
        f"{name} (bncourse, {variant})": (lambda layer=layer, c=c: ours_step(layer, c))
        for variant, c in variants.items()
        for name, layer in ours.items()
    }
    calls |= {
        f"{name} (torch)": (lambda layer=layer: step(layer)) for name, layer in theirs.items()
    }
    with torch_threads(1), memory_policy("keep"):
        times = interleaved_times(calls, repeats=repeats, warmup=2, clock="cpu")
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


# ---------------------------------------------------------------------------------------------
# Before or after the nonlinearity


@dataclass
class PlacementResult:
    """One run of :func:`placement_experiment`.

    Attributes
    ----------
    net, placement : str
    history : TrainingHistory
        With the statistics of each block's output recorded every 50 steps.
    output_mean, output_std : float
        Mean over units of the per-unit mean and standard deviation (over the batch) of the
        last hidden block's output, at the last recorded step.
    """

    net: str
    placement: str
    history: TrainingHistory
    output_mean: float
    output_std: float


def placement_experiment(
    net: str = "mlp", seed: int = 0, steps: int = 300, lr: float = 0.1, batch_size: int = 60
) -> list[PlacementResult]:
    """Train the digits MLP (3 x 100, ReLU) or CNN (16, 32 channels) with BN before the ReLU
    and after it, from the same initial weights; SGD with momentum 0.9."""
    data = load_digits(seed=0, flatten=(net == "mlp"))
    results = []
    for placement in ("before", "after"):
        if net == "mlp":
            base = make_mlp(64, 10, depth=3, width=100, activation="relu", norm="bn", seed=seed)
        elif net == "cnn":
            base = make_cnn(10, channels=(16, 32), norm="bn", seed=seed)
        else:
            raise ValueError(f"net must be 'mlp' or 'cnn', got {net!r}")
        model = PlacementNet(base, placement)
        history = _train(
            model,
            data,
            seed,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            momentum=0.9,
            record_every=50,
            record_layers=[-1],
        )
        record = history.activations[max(history.activations)]
        results.append(
            PlacementResult(
                net,
                placement,
                history,
                float(record.mean[-1].mean()),
                float(record.std[-1].mean()),
            )
        )
    return results


# ---------------------------------------------------------------------------------------------
# Residual networks

RESIDUAL_VARIANTS: dict[str, dict] = {
    "no norm": dict(norm="none"),
    "BN, post-act.": dict(norm="bn", preactivation=False),
    "BN, post-act., zero gamma": dict(norm="bn", preactivation=False, zero_init_last_gamma=True),
    "BN, pre-act.": dict(norm="bn"),
    "GN + WS, pre-act.": dict(norm="gn_ws"),
    "SkipInit": dict(norm="skipinit"),
    "Fixup": dict(norm="fixup"),
    "NF (scaled WS)": dict(norm="nf"),
}
"""The residual networks of the chapter: name -> keyword arguments of :class:`ResNet`."""


def stream_variance(
    variants: tuple[str, ...] = tuple(RESIDUAL_VARIANTS),
    num_blocks: int = 16,
    channels: int = 8,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """Variance of the residual stream after the stem and after each block, at initialisation,
    on a batch of digits (training mode): name -> array of shape (num_blocks + 1,)."""
    data = load_digits(seed=0, flatten=False)
    x = torch.tensor(data.x_train[:batch_size])
    result = {}
    for name in variants:
        model = ResNet(num_blocks, channels, **RESIDUAL_VARIANTS[name], seed=seed)
        with torch.no_grad():
            result[name] = np.array([h.var().item() for h in model.stream(x)])
    return result


def residual_training(
    variants: tuple[str, ...] = tuple(RESIDUAL_VARIANTS),
    num_blocks: int = 8,
    channels: int = 8,
    seed: int = 0,
    steps: int = 150,
    lr: float = 3e-3,
    batch_size: int = 64,
) -> dict[str, TrainingHistory]:
    """Train :class:`ResNet` with each variant on the digits (Adam): name -> history."""
    data = load_digits(seed=0, flatten=False)
    histories = {}
    for name in variants:
        model = ResNet(num_blocks, channels, **RESIDUAL_VARIANTS[name], seed=seed)
        histories[name] = _train(
            model, data, seed, steps=steps, batch_size=batch_size, lr=lr, optimizer="adam"
        )
    return histories
