"""Training loops that record what the book looks at: losses, test accuracy, activation statistics.

:func:`train` runs plain mini-batch training of a classifier on a :class:`~bncourse.data.Dataset`
and returns a :class:`TrainingHistory`: the training loss at every step, test loss and accuracy
every ``eval_every`` steps, and (when ``record_every > 0``) per-unit statistics of the inputs to
the hidden nonlinearities, the quantity plotted in Figure 1(b, c) of Ioffe & Szegedy (2015).
:func:`evaluate` computes loss and accuracy in evaluation mode.

Step convention: "step t" is the state of the model after t parameter updates. Step 0 is the
initial model; the training loss at step t is the loss of the mini-batch used for update t + 1,
computed by the model at step t, and the activation statistics at step t come from that same
forward pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bncourse.data import BatchSampler, Dataset
from bncourse.utils import torch_threads

__all__ = [
    "ActivationRecord",
    "TrainingHistory",
    "train",
    "evaluate",
    "learning_rate_sweep",
    "OPTIMIZERS",
]

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
"""The optimizer names :func:`train` accepts."""


@dataclass
class ActivationRecord:
    """Statistics over training of the inputs of one hidden layer's nonlinearity.

    Each statistic is computed per unit over the training mini-batch of the recorded step (for
    convolutional feature maps of shape (N, C, H, W), per channel over batch and positions).

    Attributes
    ----------
    steps : np.ndarray, int64, shape (T,)
        The recorded steps (0, record_every, 2 * record_every, ...).
    mean : np.ndarray, float32, shape (T, U)
        Per-unit mean over the batch.
    std : np.ndarray, float32, shape (T, U)
        Per-unit standard deviation over the batch (biased, dividing by the batch size, as BN
        does).
    percentiles : np.ndarray, float32, shape (T, U, P)
        Per-unit percentiles over the batch at the levels ``levels`` (linear interpolation, as
        :func:`numpy.percentile`).
    units : np.ndarray, int64, shape (U,)
        Which units of the layer were recorded (column ``j`` is unit ``units[j]``).
    levels : np.ndarray, float64, shape (P,)
        The percentile levels, in percent (default 15, 50, 85).
    """

    steps: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    percentiles: np.ndarray
    units: np.ndarray
    levels: np.ndarray

    def unit_percentiles(self, unit: int) -> np.ndarray:
        """Percentiles over training of one unit (a layer index, not a column), shape (T, P)."""
        matches = np.flatnonzero(self.units == unit)
        if matches.size == 0:
            raise ValueError(f"unit {unit} was not recorded; recorded units: {self.units.tolist()}")
        return self.percentiles[:, matches[0], :]


@dataclass
class TrainingHistory:
    """What :func:`train` recorded.

    Attributes
    ----------
    train_steps : np.ndarray, int64, shape (S,)
        ``0 .. steps - 1``.
    train_loss : np.ndarray, float32, shape (S,)
        Cross-entropy of the training mini-batch at each step (before that step's update).
    train_accuracy : np.ndarray, float32, shape (S,)
        Accuracy on that mini-batch (training mode).
    eval_steps : np.ndarray, int64, shape (E,)
        Steps at which the test split was evaluated: 0, every ``eval_every`` steps, and the last.
    test_loss : np.ndarray, float64, shape (E,)
        Mean cross-entropy on the full test split, in evaluation mode.
    test_accuracy : np.ndarray, float64, shape (E,)
        Accuracy on the full test split, in evaluation mode.
    activations : dict of int to ActivationRecord
        Pre-activation statistics per recorded hidden layer (key: layer index, 0 = first hidden
        layer); empty when ``record_every == 0``.
    config : dict
        The arguments of the run (for the record).
    wall_time : float
        Seconds spent in the training loop, evaluations included.
    """

    train_steps: np.ndarray
    train_loss: np.ndarray
    train_accuracy: np.ndarray
    eval_steps: np.ndarray
    test_loss: np.ndarray
    test_accuracy: np.ndarray
    activations: dict[int, ActivationRecord] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    wall_time: float = 0.0

    @property
    def final_test_accuracy(self) -> float:
        """Test accuracy at the last step."""
        return float(self.test_accuracy[-1])

    @property
    def final_test_loss(self) -> float:
        """Test loss at the last step."""
        return float(self.test_loss[-1])

    @property
    def steps_per_second(self) -> float:
        """Training speed of the run (evaluations and recording included)."""
        return len(self.train_steps) / self.wall_time if self.wall_time > 0 else float("nan")

    def steps_to_accuracy(self, threshold: float) -> int | None:
        """First evaluation step whose test accuracy is at least ``threshold``, or None."""
        reached = np.flatnonzero(self.test_accuracy >= threshold)
        return int(self.eval_steps[reached[0]]) if reached.size else None


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    batch_size: int | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)`` in evaluation mode.

    The model is switched to ``eval()`` (BN uses its running statistics) and back to the mode it
    was in; no gradients are computed.

    Parameters
    ----------
    model : nn.Module
        A classifier returning logits of shape (N, num_classes).
    x : torch.Tensor or np.ndarray, shape (N, ...)
        Inputs; moved to the model's device.
    y : torch.Tensor or np.ndarray, int, shape (N,)
        Labels.
    batch_size : int, optional
        Evaluate in chunks of this size (saves memory on large sets); default all at once.

    Returns
    -------
    loss : float
        Mean cross-entropy over the N examples.
    accuracy : float
        Fraction of correctly classified examples, in [0, 1].
    """
    device = _model_device(model)
    x = torch.as_tensor(x, dtype=torch.float32, device=device)
    y = torch.as_tensor(y, dtype=torch.int64, device=device)
    n = x.shape[0]
    if n == 0:
        raise ValueError("evaluate: x holds no examples")
    if batch_size is None:
        batch_size = n
    was_training = model.training
    model.eval()
    try:
        total_loss = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        for start in range(0, n, batch_size):
            logits = model(x[start : start + batch_size])
            labels = y[start : start + batch_size]
            total_loss += F.cross_entropy(logits, labels, reduction="sum").double()
            correct += (logits.argmax(dim=1) == labels).sum()
    finally:
        model.train(was_training)
    return float(total_loss) / n, int(correct) / n


def _training_mode(model: nn.Module, freeze_batch_norm: bool) -> None:
    """Training mode, with every batch norm in evaluation mode when ``freeze_batch_norm``."""
    model.train()
    if freeze_batch_norm:
        from bncourse.inference import batch_norm_modules

        for bn in batch_norm_modules(model):
            bn.eval()


def _make_optimizer(
    name: str, parameters: list[nn.Parameter], lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        if momentum != 0.0:
            raise ValueError("momentum applies to optimizer='sgd' only; Adam uses its betas")
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


class _ActivationRecorder:
    """Per-unit statistics of pre-activations at recording steps, kept on the device."""

    def __init__(
        self,
        num_records: int,
        layers: Sequence[int] | None,
        levels: Sequence[float],
        units: Sequence[int] | None,
        device: torch.device,
    ):
        self.num_records = num_records
        self.requested_layers = None if layers is None else [int(i) for i in layers]
        self.levels = np.asarray(levels, dtype=np.float64)
        if self.levels.ndim != 1 or np.any((self.levels < 0) | (self.levels > 100)):
            raise ValueError(f"percentiles must be levels in [0, 100], got {levels!r}")
        self.requested_units = None if units is None else np.asarray(units, dtype=np.int64)
        self.device = device
        self.steps: list[int] = []
        self.layers: list[int] = []
        self.buffers: dict[int, dict[str, torch.Tensor]] = {}
        self.unit_index: dict[int, torch.Tensor | None] = {}

    def _setup(self, preactivations: list[torch.Tensor]) -> None:
        depth = len(preactivations)
        requested = range(depth) if self.requested_layers is None else self.requested_layers
        for layer in requested:
            if not -depth <= layer < depth:
                raise ValueError(
                    f"record_layers: layer {layer} does not exist; the model has {depth} "
                    f"hidden layers (indices 0 .. {depth - 1})"
                )
            layer = layer % depth
            if layer in self.layers:
                continue
            num_units = preactivations[layer].shape[1]
            if self.requested_units is None:
                units = np.arange(num_units)
                self.unit_index[layer] = None
            else:
                units = self.requested_units
                if units.ndim != 1 or np.any((units < -num_units) | (units >= num_units)):
                    raise ValueError(
                        f"record_units must be indices of units in 0 .. {num_units - 1} of "
                        f"layer {layer}, got {self.requested_units.tolist()}"
                    )
                units = units % num_units
                self.unit_index[layer] = torch.as_tensor(units, device=self.device)
            shape = (self.num_records, len(units))
            self.layers.append(layer)
            self.buffers[layer] = {
                "mean": torch.empty(shape, device=self.device),
                "std": torch.empty(shape, device=self.device),
                "percentiles": torch.empty((*shape, len(self.levels)), device=self.device),
                "units": torch.as_tensor(units),
            }

    @torch.no_grad()
    def record(self, step: int, preactivations: list[torch.Tensor]) -> None:
        if not self.layers:
            self._setup(preactivations)
        row = len(self.steps)
        self.steps.append(step)
        for layer in self.layers:
            z = preactivations[layer].detach()
            if z.ndim > 2:  # feature maps (N, C, ...): statistics per channel over N and positions
                z = z.transpose(0, 1).flatten(1).T
            index = self.unit_index[layer]
            if index is not None:
                z = z[:, index]
            z = z.float()
            buffers = self.buffers[layer]
            # (torch.std_mean and torch.quantile are several times slower on small CPU batches)
            mean = z.mean(dim=0)
            buffers["mean"][row] = mean
            buffers["std"][row] = (z - mean).square().mean(dim=0).sqrt()
            buffers["percentiles"][row] = _percentiles_over_batch(z, self.levels)

    def result(self) -> dict[int, ActivationRecord]:
        steps = np.asarray(self.steps, dtype=np.int64)
        records = {}
        for layer in sorted(self.layers):
            buffers = self.buffers[layer]
            records[layer] = ActivationRecord(
                steps=steps,
                mean=buffers["mean"].cpu().numpy(),
                std=buffers["std"].cpu().numpy(),
                percentiles=buffers["percentiles"].cpu().numpy(),
                units=buffers["units"].numpy().astype(np.int64),
                levels=self.levels.copy(),
            )
        return records


def _percentiles_over_batch(
    z: torch.Tensor, levels: np.ndarray, use_numpy: bool | None = None
) -> torch.Tensor:
    """Percentiles of each column of ``z``, shape (B, U) -> (U, P), as ``np.percentile`` computes.

    Linear interpolation between the sorted values at positions ``levels / 100 * (B - 1)``. On the
    CPU the sort runs in NumPy (torch's CPU sort is about ten times slower on small batches);
    ``use_numpy`` overrides that choice.
    """
    n = z.shape[0]
    position = levels / 100.0 * (n - 1)
    lower = np.floor(position).astype(np.int64)
    upper = np.minimum(lower + 1, n - 1)
    fraction = (position - lower)[:, None]
    if use_numpy is None:
        use_numpy = z.device.type == "cpu"
    if use_numpy:
        ordered = np.sort(z.cpu().numpy(), axis=0)
        low, high = ordered[lower], ordered[upper]
        result = (low + (high - low) * fraction).T.astype(np.float32)
        return torch.from_numpy(result).to(z.device)
    ordered = torch.sort(z, dim=0).values
    low = ordered[torch.as_tensor(lower, device=z.device)]
    high = ordered[torch.as_tensor(upper, device=z.device)]
    fraction = torch.as_tensor(fraction, dtype=z.dtype, device=z.device)
    return (low + (high - low) * fraction).T


def train(
    model: nn.Module,
    data: Dataset,
    *,
    steps: int = 500,
    batch_size: int = 60,
    lr: float = 0.1,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: torch.device | str | None = None,
    eval_every: int = 25,
    record_every: int = 0,
    record_layers: Sequence[int] | None = None,
    percentiles: Sequence[float] = (15, 50, 85),
    record_units: Sequence[int] | None = None,
    cpu_threads: int | None = 1,
    callback: Callable[[int, nn.Module, torch.Tensor, torch.Tensor], object] | None = None,
    preactivation_callback: Callable[[int, list[torch.Tensor]], object] | None = None,
    freeze_batch_norm: bool = False,
    batches: Iterable[np.ndarray] | None = None,
) -> TrainingHistory:
    """Train a classifier with mini-batch SGD (or Adam) on cross-entropy, recording its progress.

    The whole data set is put on ``device`` once; mini-batches are drawn without replacement by
    a :class:`~bncourse.data.BatchSampler` seeded with ``seed`` (each epoch's incomplete last
    batch is dropped, so every batch has ``batch_size`` examples). ``torch.manual_seed(seed)`` is
    called first for anything else random in the model (e.g. dropout); the initial weights are
    whatever ``model`` holds (build it with ``make_mlp(..., seed=...)`` for a seeded start).
    Same model, data and arguments give the same history on the same device.

    Parameters
    ----------
    model : nn.Module
        A classifier returning logits of shape (batch, num_classes). It is moved to ``device``
        in place and trained in place. To record activations it must have a method
        ``forward_with_preactivations(x) -> (logits, list of tensors)`` like
        :class:`bncourse.models.MLP`.
    data : Dataset
        Training and test splits.
    steps : int, default 500
        Number of parameter updates.
    batch_size : int, default 60
        Mini-batch size (at most the number of training examples).
    lr : float, default 0.1
        Learning rate.
    optimizer : {"sgd", "adam"}, default "sgd"
        The optimizer; ``weight_decay`` applies to all parameters, BN's gamma and beta included.
    momentum : float, default 0.0
        SGD momentum (``optimizer="sgd"`` only).
    weight_decay : float, default 0.0
        L2 penalty coefficient.
    seed : int, default 0
        Seed of the mini-batch order and of ``torch.manual_seed``.
    device : torch.device or str, optional
        Default :func:`bncourse.get_device` (CUDA when present, else CPU).
    eval_every : int, default 25
        Evaluate test loss and accuracy (eval mode, full test split) at step 0, every
        ``eval_every`` steps and after the last step; 0 evaluates only at the start and the end.
    record_every : int, default 0
        If positive, record pre-activation statistics at steps 0, record_every, ... < steps,
        from the training forward pass of that step (no extra forward pass).
    record_layers : sequence of int, optional
        Hidden layers to record (0 = first, negative counts from the last); default all.
    percentiles : sequence of float, default (15, 50, 85)
        Percentile levels (in percent) recorded per unit.
    record_units : sequence of int, optional
        Unit indices to record in every recorded layer (to save memory); default all units.
    cpu_threads : int or None, default 1
        On the CPU, run with ``torch.set_num_threads(cpu_threads)`` and restore the previous
        setting afterwards; None keeps the current setting. One thread is the fastest for the
        book's small models, and it avoids a 10-20x slow-down when the cores are shared with
        another busy process (intra-op threads then wait on each other); raise it for large
        models.
    callback : callable, optional
        Called after every parameter update as ``callback(step, model, inputs, labels)``:
        ``step`` is the number of updates done so far (1 .. ``steps``), ``inputs`` (B, ...)
        and ``labels`` (B,) the mini-batch of that update, on ``device``; the model is still
        in training mode. Its return value is ignored. Use it to record statistics the
        history does not hold (the update's gradients are still in ``.grad``, BN buffers,
        weights).
    preactivation_callback : callable, optional
        With ``record_every > 0``, called at every recorded step as
        ``callback(step, preactivations)`` with the inputs of the hidden nonlinearities of that
        step's training forward pass (a list of tensors (B, units) or (B, C, H, W), before the
        update, still attached to the graph: detach what you keep).
    freeze_batch_norm : bool, default False
        Keep every batch-norm layer in evaluation mode while the rest trains: the layers
        normalise with their running statistics and do not update them (their ``weight`` and
        ``bias`` still learn). For fine-tuning with fixed statistics.
    batches : iterable of np.ndarray, optional
        The mini-batches as arrays of indices into the training split (each of shape (B,),
        any B >= 1), used in order instead of the seeded sampler: the first ``steps`` of them
        (e.g. batches sorted by class). ``batch_size`` is then unused.

    Returns
    -------
    TrainingHistory
        Losses, accuracies and activation records. The model is left in training mode, on
        ``device``, holding its final parameters; call ``model.eval()`` before using it for
        inference.
    """
    from bncourse import get_device

    if not isinstance(data, Dataset):
        raise TypeError(f"data must be a bncourse.data.Dataset, got {type(data).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    if eval_every < 0:
        raise ValueError(
            f"eval_every must be >= 0 (0: only at the start and end), got {eval_every}"
        )
    if record_every < 0:
        raise ValueError(f"record_every must be >= 0 (0: no recording), got {record_every}")
    if cpu_threads is not None and cpu_threads < 1:
        raise ValueError(f"cpu_threads must be a positive int or None, got {cpu_threads}")
    if preactivation_callback is not None and record_every == 0:
        raise ValueError("preactivation_callback needs record_every > 0")
    if record_every > 0 and not hasattr(model, "forward_with_preactivations"):
        raise TypeError(
            "record_every > 0 needs a model with forward_with_preactivations(x) -> (logits, "
            f"preactivations), such as bncourse.models.MLP; got {type(model).__name__}"
        )
    config = dict(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        momentum=momentum,
        weight_decay=weight_decay,
        seed=seed,
        eval_every=eval_every,
        record_every=record_every,
        record_layers=None if record_layers is None else list(record_layers),
        percentiles=list(percentiles),
        record_units=None if record_units is None else list(record_units),
        cpu_threads=cpu_threads,
    )
    device = get_device() if device is None else torch.device(device)
    config["device"] = str(device)
    torch.manual_seed(seed)
    if batches is None:
        batches = BatchSampler(data.num_train, batch_size, seed=seed)
    model.to(device)
    _training_mode(model, freeze_batch_norm)
    optim = _make_optimizer(optimizer, list(model.parameters()), lr, momentum, weight_decay)
    x_train, y_train, x_test, y_test = data.tensors(device)

    num_records = len(range(0, steps, record_every)) if record_every > 0 else 0
    recorder = _ActivationRecorder(num_records, record_layers, percentiles, record_units, device)
    train_loss = torch.empty(steps, device=device)
    train_correct = torch.empty(steps, dtype=torch.int64, device=device)
    batch_sizes = np.empty(steps)
    eval_steps: list[int] = []
    test_loss: list[float] = []
    test_accuracy: list[float] = []

    def evaluate_now(step: int) -> None:
        loss, accuracy = evaluate(model, x_test, y_test)
        _training_mode(model, freeze_batch_norm)
        eval_steps.append(step)
        test_loss.append(loss)
        test_accuracy.append(accuracy)

    with torch_threads(cpu_threads, device):
        start_time = time.perf_counter()
        evaluate_now(0)
        batches = iter(batches)
        for step in range(steps):
            index = next(batches, None)
            if index is None:
                raise ValueError(f"batches holds fewer than steps={steps} mini-batches")
            index = torch.as_tensor(np.asarray(index, dtype=np.int64)).to(device, non_blocking=True)
            batch_sizes[step] = len(index)
            inputs, labels = x_train[index], y_train[index]
            if record_every > 0 and step % record_every == 0:
                logits, preactivations = model.forward_with_preactivations(inputs)
                recorder.record(step, preactivations)
                if preactivation_callback is not None:
                    preactivation_callback(step, preactivations)
            else:
                logits = model(inputs)
            loss = F.cross_entropy(logits, labels)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            with torch.no_grad():
                train_loss[step] = loss
                train_correct[step] = (logits.argmax(dim=1) == labels).sum()
            done = step + 1
            if callback is not None:
                callback(done, model, inputs, labels)
            if done == steps or (eval_every > 0 and done % eval_every == 0):
                evaluate_now(done)
        wall_time = time.perf_counter() - start_time

    return TrainingHistory(
        train_steps=np.arange(steps, dtype=np.int64),
        train_loss=train_loss.cpu().numpy(),
        train_accuracy=(train_correct.cpu().numpy() / batch_sizes).astype(np.float32),
        eval_steps=np.asarray(eval_steps, dtype=np.int64),
        test_loss=np.asarray(test_loss, dtype=np.float64),
        test_accuracy=np.asarray(test_accuracy, dtype=np.float64),
        activations=recorder.result(),
        config=config,
        wall_time=wall_time,
    )


def learning_rate_sweep(
    make_model: Callable[[str | None, int], nn.Module],
    data: Dataset,
    lrs: Sequence[float],
    norms: Sequence[str | None] = (None, "bn"),
    seeds: Sequence[int] = (0,),
    **train_kwargs: Any,
) -> dict[tuple[str | None, float, int], TrainingHistory]:
    """Train a fresh model with :func:`train` for every (norm, learning rate, seed).

    Parameters
    ----------
    make_model : callable
        ``make_model(norm, seed)`` returns a new, seeded model (``norm`` is an entry of
        ``norms``, e.g. None or ``"bn"``).
    data : Dataset
    lrs : sequence of float
        The learning rates.
    norms : sequence of str or None, default (None, "bn")
    seeds : sequence of int, default (0,)
        Each seeds the model (through ``make_model``) and the mini-batch order.
    **train_kwargs
        Passed to :func:`train` (``steps``, ``batch_size``, ``device``, ``eval_every``, ...).

    Returns
    -------
    dict of (norm, lr, seed) to TrainingHistory
        In the order norm, then lr, then seed. ``history.final_test_accuracy`` is the usual
        summary; a diverged run has a non-finite ``final_test_loss``.
    """
    return {
        (norm, lr, seed): train(make_model(norm, seed), data, lr=lr, seed=seed, **train_kwargs)
        for norm in norms
        for lr in lrs
        for seed in seeds
    }
