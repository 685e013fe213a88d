"""Batch norm at inference: running statistics, momentum conventions, folding and timing.

In evaluation mode a batch-norm layer normalises with fixed *population* statistics instead of the
statistics of the current mini-batch, so that an example's output does not depend on the other
examples it is processed with. This module holds the reusable pieces of chapter 4:

* :func:`convert_momentum`: translate a momentum between PyTorch's convention (the weight of the
  new batch, default 0.1) and Keras/TensorFlow's (the weight of the old average, default 0.99);
  :func:`initial_value_weight`, :func:`moving_average_weights` and :func:`cumulative_momentum`
  describe what an exponential or a cumulative moving average keeps of the past.
* :func:`batch_norm_modules`, :func:`recompute_population_statistics`: reset every batch-norm
  layer of a model and recompute its statistics in one pass over data, with ``momentum=None``
  (a cumulative average), for ``torch.nn`` and :mod:`bncourse.torch_bn` layers alike.
* :func:`inference_affine`: the per-channel affine map ``y = scale * x + shift`` an
  evaluation-mode batch norm computes; :func:`fold_batch_norms` folds every batch norm of a model
  into the linear or convolution layer before it (:func:`fold_batch_norm` folds one pair:
  ``nn.Linear``/``Conv1d/2d/3d`` with ``BatchNorm1d/2d/3d`` of ``torch.nn`` or
  :mod:`bncourse.torch_bn`).
* :func:`time_inference`: robust timings (median of interleaved repeats) of several models on the
  same input.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bncourse import torch_bn
from bncourse.utils import torch_threads

__all__ = [
    "MOMENTUM_CONVENTIONS",
    "convert_momentum",
    "cumulative_momentum",
    "initial_value_weight",
    "moving_average_weights",
    "is_batch_norm",
    "batch_norm_modules",
    "recompute_population_statistics",
    "inference_affine",
    "fold_batch_norm",
    "fold_batch_norms",
    "time_inference",
]

MOMENTUM_CONVENTIONS: dict[str, str] = {
    "pytorch": "weight of the new batch: running = (1 - m) * running + m * batch (default 0.1)",
    "keras": "weight of the old average: running = m * running + (1 - m) * batch (default 0.99)",
}
"""The two momentum conventions :func:`convert_momentum` knows, with their update rules.

``"keras"`` is also the convention of TensorFlow's ``tf.keras.layers.BatchNormalization`` and of
Flax's ``nn.BatchNorm``; ``"pytorch"`` that of ``torch.nn.BatchNorm*d`` and of
:mod:`bncourse.torch_bn` and :mod:`bncourse.numpy_bn`."""


def convert_momentum(momentum: float, source: str = "keras", target: str = "pytorch") -> float:
    """Translate a batch-norm momentum from one framework's convention to another's.

    PyTorch's ``momentum`` is the weight of the *new* batch statistic,
    ``running <- (1 - m) * running + m * batch``; Keras/TensorFlow's (and Flax's) is the weight of
    the *old* average, ``running <- m * running + (1 - m) * batch``. The same averaging therefore
    has ``m_pytorch = 1 - m_keras``: Keras' default 0.99 is PyTorch's 0.01, and PyTorch's default
    0.1 is Keras' 0.9.

    Parameters
    ----------
    momentum : float
        The momentum in the ``source`` convention, in [0, 1].
    source, target : {"pytorch", "keras"}
        The conventions (see :data:`MOMENTUM_CONVENTIONS`).

    Returns
    -------
    float
        The momentum that gives the same update in the ``target`` convention.

    Raises
    ------
    ValueError
        An unknown convention, or a momentum outside [0, 1]. PyTorch's ``momentum=None`` (a
        cumulative average) has no fixed value in either convention; see
        :func:`cumulative_momentum`.

    Examples
    --------
    >>> convert_momentum(0.99, "keras", "pytorch")
    0.01
    >>> convert_momentum(0.1, "pytorch", "keras")
    0.9
    """
    for name, value in (("source", source), ("target", target)):
        if value not in MOMENTUM_CONVENTIONS:
            raise ValueError(
                f"convert_momentum: {name} must be one of {tuple(MOMENTUM_CONVENTIONS)}, "
                f"got {value!r}"
            )
    if momentum is None:
        raise ValueError(
            "convert_momentum: momentum=None (PyTorch's cumulative average) has no fixed value; "
            "at step t it equals momentum 1/t in the PyTorch convention (cumulative_momentum)"
        )
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"convert_momentum: momentum must be in [0, 1], got {momentum!r}")
    if source == target:
        return float(momentum)
    return round(1.0 - float(momentum), 12)


def cumulative_momentum(step: int) -> float:
    """The PyTorch-convention momentum that ``momentum=None`` uses at batch ``step`` (1-based).

    With momentum ``1 / t`` at the ``t``-th batch, the running value is the plain average of the
    ``t`` batch statistics seen so far, and the initial value is forgotten after the first batch:
    ``running_t = running_{t-1} + (batch_t - running_{t-1}) / t``.
    """
    if not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"cumulative_momentum: step must be an int >= 1, got {step!r}")
    return 1.0 / int(step)


def initial_value_weight(momentum: float, num_batches: int | np.ndarray) -> float | np.ndarray:
    """Weight the initial running value still has after ``num_batches`` updates.

    An exponential moving average with PyTorch-convention momentum ``m`` is, after ``t`` batches,
    ``(1 - m)**t * initial + sum_k m (1 - m)**(t - k) * batch_k``: the initialisation (mean 0,
    variance 1) keeps the weight ``(1 - m)**t``. Early in training this weight is large when ``m``
    is small, so the running statistics *lag*: they still remember the initialisation and the
    statistics of early, long-gone weights.

    Parameters
    ----------
    momentum : float
        PyTorch-convention momentum in [0, 1].
    num_batches : int or array of int
        Number of updates ``t``.

    Returns
    -------
    float or np.ndarray
        ``(1 - momentum) ** num_batches``.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"initial_value_weight: momentum must be in [0, 1], got {momentum!r}")
    result = (1.0 - momentum) ** np.asarray(num_batches, dtype=np.float64)
    return float(result) if result.ndim == 0 else result


def moving_average_weights(momentum: float | None, num_batches: int) -> tuple[np.ndarray, float]:
    """How much each batch counts in a running statistic after ``num_batches`` updates.

    The running value after ``t`` updates is ``w_0 * initial + sum_k w_k * batch_k``. With a
    PyTorch-convention momentum ``m``, ``w_k = m (1 - m)**(t - k)`` decays geometrically into the
    past and ``w_0 = (1 - m)**t``; with ``momentum=None`` (PyTorch's cumulative average) every
    batch has ``w_k = 1 / t`` and ``w_0 = 0``. The weights sum to 1.

    Parameters
    ----------
    momentum : float or None
        PyTorch-convention momentum in [0, 1], or None for the cumulative average.
    num_batches : int
        Number of updates ``t`` >= 1.

    Returns
    -------
    batch_weights : np.ndarray, shape (num_batches,)
        ``w_1 .. w_t``, oldest batch first.
    initial_weight : float
        ``w_0``, the weight left on the initial value.
    """
    if not isinstance(num_batches, (int, np.integer)) or num_batches < 1:
        raise ValueError(
            f"moving_average_weights: num_batches must be an int >= 1, got {num_batches!r}"
        )
    if momentum is None:
        return np.full(num_batches, 1.0 / num_batches), 0.0
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"moving_average_weights: momentum must be in [0, 1], got {momentum!r}")
    age = np.arange(num_batches - 1, -1, -1, dtype=np.float64)  # updates since each batch
    return momentum * (1.0 - momentum) ** age, float((1.0 - momentum) ** num_batches)


# ---------------------------------------------------------------------------------------------
# Population statistics
# ---------------------------------------------------------------------------------------------

_BATCH_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, torch_bn._BatchNorm)


def is_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a batch-norm layer of ``torch.nn`` or of :mod:`bncourse.torch_bn`."""
    return isinstance(module, _BATCH_NORM_TYPES)


def batch_norm_modules(model: nn.Module) -> list[nn.Module]:
    """Every batch-norm layer of ``model`` (``torch.nn`` or :mod:`bncourse.torch_bn`), in order."""
    return [module for module in model.modules() if is_batch_norm(module)]


def _batch_input(batch: Any) -> Tensor:
    """The input tensor of a batch given as a tensor, an array or an ``(x, y, ...)`` tuple."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("recompute_population_statistics: got an empty tuple as a batch")
        batch = batch[0]
    return torch.as_tensor(batch)


@torch.no_grad()
def recompute_population_statistics(model: nn.Module, batches: Iterable[Any]) -> int:
    """Reset the running statistics of every batch norm of ``model`` and recompute them in one pass.

    This is Algorithm 2 of Ioffe & Szegedy (2015): after training, estimate each layer's
    population mean as the average of the batch means, and its population variance as the average
    of the *unbiased* batch variances ``m / (m - 1) * var_B``. Each batch-norm layer is reset
    (running mean 0, variance 1, ``num_batches_tracked`` 0) and run with ``momentum=None``, which
    makes PyTorch (and :mod:`bncourse.torch_bn`) keep the cumulative average of the batch
    statistics instead of an exponential moving average. Only the batch-norm layers are in
    training mode during the pass; every other module is in evaluation mode (dropout off).
    Afterwards every module's mode and every layer's momentum are restored, and the parameters
    are unchanged.

    Every batch counts equally, whatever its size; give equally large batches (and at least two
    values per channel each). One batch holding the whole data set of ``N`` examples gives the
    exact population mean and unbiased variance of the first batch norm's input; deeper layers
    see the layers above them normalised with that batch's (biased) variance rather than the
    unbiased running one, a relative difference of order ``1 / N`` in their statistics.

    Parameters
    ----------
    model : nn.Module
        Holds ``torch.nn.BatchNorm*d`` or ``bncourse.torch_bn.BatchNorm*d`` layers with
        ``track_running_stats=True``.
    batches : iterable
        Mini-batches of inputs: tensors or arrays of shape (N, ...), or tuples ``(x, y, ...)``
        whose first element is the input. They are moved to the model's device (float32 unless
        already a floating tensor).

    Returns
    -------
    int
        The number of batches used.

    Raises
    ------
    ValueError
        ``model`` has no batch-norm layer with running statistics, or ``batches`` is empty.
    """
    layers = [bn for bn in batch_norm_modules(model) if bn.track_running_stats]
    if not layers:
        raise ValueError(
            "recompute_population_statistics: the model has no batch-norm layer with running "
            "statistics (track_running_stats=True)"
        )
    device = next(iter(model.parameters()), layers[0].running_mean).device
    modes = {module: module.training for module in model.modules()}
    momenta = {bn: bn.momentum for bn in layers}
    count = 0
    try:
        model.eval()
        for bn in layers:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        for batch in batches:
            x = _batch_input(batch)
            if not x.is_floating_point():
                x = x.float()
            model(x.to(device))
            count += 1
    finally:
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        for module, mode in modes.items():
            module.training = mode
    if count == 0:
        raise ValueError("recompute_population_statistics: batches is empty")
    return count


# ---------------------------------------------------------------------------------------------
# Inference batch norm as an affine map, and folding
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def inference_affine(bn: nn.Module, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """The per-channel affine map ``y = scale * x + shift`` of an evaluation-mode batch norm.

    ``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale``
    (``gamma = 1``, ``beta = 0`` without affine parameters). This is the one place the package
    computes them: :func:`fold_batch_norm` folds exactly this map into the layer before.

    Parameters
    ----------
    bn : BatchNorm1d/2d/3d of ``torch.nn`` or :mod:`bncourse.torch_bn`
        With running statistics.
    dtype : torch.dtype, optional
        Compute (and return) in this dtype; default the dtype of the running statistics.

    Returns
    -------
    scale, shift : Tensor, shape (C,)
        On the device of the running statistics.
    """
    if not is_batch_norm(bn):
        raise TypeError(f"inference_affine: expected a batch-norm module, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            "inference_affine: bn has no running statistics (track_running_stats=False), so "
            "evaluation uses batch statistics and is not a fixed affine map"
        )
    dtype = bn.running_var.dtype if dtype is None else dtype
    scale = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(dtype)
    shift = -bn.running_mean.to(dtype) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(dtype)
    return scale, shift


_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@torch.no_grad()
def fold_batch_norm(
    layer: nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d, bn: nn.Module
) -> nn.Module:
    """Merge an evaluation-mode batch norm into the linear or convolution layer before it.

    In evaluation mode batch norm is the per-channel affine map ``y = z * s + t`` of
    :func:`inference_affine`. Applied after ``z = W x + b`` it gives ``(s * W) x + (s * b + t)``:
    the same layer type with every output channel's weights scaled by ``s`` and a new bias
    ``s * b + t``. The map is computed in float64 (float32 on MPS) and rounded once at the end.

    Parameters
    ----------
    layer : nn.Linear, nn.Conv1d, nn.Conv2d or nn.Conv3d
        Weight of shape (C_out, ...), bias (C_out,) or None. Any stride, padding, dilation,
        groups or padding mode. For ``nn.Linear`` the identity holds for 2-D input
        (N, features), where the batch-norm channel is the output feature.
    bn : BatchNorm1d/2d/3d of ``torch.nn`` or :mod:`bncourse.torch_bn`
        With ``num_features == C_out`` and running statistics; ``affine=False`` is fine. Its
        mode does not matter: the running statistics are used.

    Returns
    -------
    nn.Module
        A new layer of the same type (a deep copy of ``layer`` with new ``weight`` and ``bias``
        parameters, in the dtype and on the device of ``layer``) such that, in evaluation mode,
        ``folded(x) == bn(layer(x))`` up to rounding. ``layer`` and ``bn`` are not modified.

    Raises
    ------
    TypeError
        ``layer`` is not one of the supported types or ``bn`` is not a batch-norm module.
    ValueError
        ``bn`` has no running statistics or the channel counts differ.
    """
    if not isinstance(layer, _FOLDABLE):
        raise TypeError(
            "fold_batch_norm: layer must be nn.Linear, nn.Conv1d, nn.Conv2d or nn.Conv3d, got "
            f"{type(layer).__name__}"
        )
    if not is_batch_norm(bn):
        raise TypeError(
            "fold_batch_norm: bn must be a BatchNorm1d/2d/3d module (bncourse.torch_bn or "
            f"torch.nn), got {type(bn).__name__}"
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            "fold_batch_norm: bn has no running statistics (it was built with "
            "track_running_stats=False and normalises with batch statistics even in "
            "evaluation), so it is not a fixed affine map and cannot be folded"
        )
    out_channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if bn.running_mean.numel() != out_channels:
        raise ValueError(
            f"fold_batch_norm: layer has {out_channels} output channels but bn has "
            f"{bn.running_mean.numel()} features (num_features={bn.num_features})"
        )
    weight = layer.weight.detach()
    work = torch.float32 if weight.device.type == "mps" else torch.float64
    scale, shift = inference_affine(bn, dtype=work)
    scale, shift = scale.to(weight.device), shift.to(weight.device)
    bias = torch.zeros_like(scale) if layer.bias is None else layer.bias.detach().to(work)
    folded = copy.deepcopy(layer)
    bias_dtype = weight.dtype if layer.bias is None else layer.bias.dtype
    grad = layer.weight.requires_grad
    scaled = weight.to(work) * scale.view([-1] + [1] * (weight.dim() - 1))
    folded.weight = nn.Parameter(scaled.to(weight.dtype), requires_grad=grad)
    folded.bias = nn.Parameter((bias * scale + shift).to(bias_dtype), requires_grad=grad)
    return folded


def _fold_children(module: nn.Module) -> None:
    """Fold, in place, every (linear/conv, batch norm) pair that ``module``'s children form."""
    names = list(module._modules)
    for first, second in zip(names, names[1:], strict=False):
        layer, bn = module._modules[first], module._modules[second]
        if isinstance(layer, _FOLDABLE) and is_batch_norm(bn):
            module._modules[first] = fold_batch_norm(layer, bn)
            module._modules[second] = nn.Identity()
    for child in module.children():
        _fold_children(child)


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in evaluation mode with every foldable batch norm folded away.

    A batch norm is folded when it directly follows an ``nn.Linear`` or ``nn.Conv1d/2d/3d``
    among the registered children of one module, in registration order, as in an
    ``nn.Sequential`` or in :class:`bncourse.models.HiddenBlock` (``linear`` then ``norm``):
    the layer is replaced by :func:`fold_batch_norm` of the pair and the batch
    norm by ``nn.Identity``. The caller must make sure that the registration order is the order
    of the computation; the result is checked by comparing outputs, as the book does.

    Parameters
    ----------
    model : nn.Module
        The trained model; it is not modified.

    Returns
    -------
    nn.Module
        A deep copy in evaluation mode such that ``folded(x) == model.eval()(x)`` up to rounding.
    """
    folded = copy.deepcopy(model).eval()
    _fold_children(folded)
    return folded.eval()


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def time_inference(
    models: Mapping[str, nn.Module],
    x: Tensor,
    repeats: int = 15,
    number: int = 20,
    warmup: int = 3,
    cpu_threads: int | None = 1,
) -> dict[str, np.ndarray]:
    """Time the forward pass of several models on the same input, interleaving the repeats.

    Each repeat times ``number`` consecutive forward passes of every model in turn (so that a
    burst of load on a shared machine hits all models alike), under ``torch.no_grad()``. Report
    the *median* over repeats; it ignores the occasional slow repeat.

    Parameters
    ----------
    models : dict of name to nn.Module
        The models, already on ``x``'s device and in the wanted mode.
    x : Tensor
        The input.
    repeats : int, default 15
        Number of timed repeats per model.
    number : int, default 20
        Forward passes per repeat.
    warmup : int, default 3
        Untimed forward passes per model first.
    cpu_threads : int or None, default 1
        Run with ``torch.set_num_threads(cpu_threads)`` (restored afterwards); None keeps the
        current setting.

    Returns
    -------
    dict of name to np.ndarray, shape (repeats,)
        Seconds per forward pass in each repeat.
    """
    if repeats < 1 or number < 1:
        raise ValueError(
            f"time_inference: repeats and number must be >= 1, got {repeats}, {number}"
        )
    synchronize = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    with torch_threads(cpu_threads):
        for model in models.values():
            for _ in range(warmup):
                model(x)
        times = {name: np.empty(repeats) for name in models}
        for repeat in range(repeats):
            for name, model in models.items():
                synchronize()
                start = time.perf_counter()
                for _ in range(number):
                    model(x)
                synchronize()
                times[name][repeat] = (time.perf_counter() - start) / number
    return times
