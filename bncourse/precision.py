"""Batch norm in reduced precision: where float16 statistics break, and how to keep them safe.

float16 has a largest finite value of 65504 and its smallest positive (subnormal) value is
about 6e-8. A variance is a mean of squares, so activations of magnitude above about 256
(``256 ** 2 = 65536``) give squares, sums of squares and variances that overflow to ``inf``, and
``inf - inf`` is NaN; activations below about 2.4e-4 give squares that underflow to zero. This
module holds the small pieces the book uses to show it:

* :func:`variance_in` computes a per-channel variance with its sums in a chosen dtype, naively
  (``E[x^2] - E[x]^2``) or in two passes, to show overflow and underflow;
* :func:`half_except_batch_norm` is the fix for a model converted with ``.half()``: every layer
  but the batch norms goes to float16, the batch norms keep float32 parameters and running
  statistics, which PyTorch's batch norm and :mod:`bncourse.torch_bn` accept with float16
  input (they compute in float32 and return float16);
* :func:`batch_norm_dtypes` lists the dtypes of every batch norm's parameters and buffers.

Under ``torch.autocast`` nothing of this is needed: autocast casts the *inputs* of selected
operations (matrix products, convolutions) and never a module's parameters or buffers, so a
batch norm keeps float32 parameters and statistics and receives low-precision input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bncourse.frozen import is_frozen_batch_norm
from bncourse.inference import batch_norm_modules, is_batch_norm

__all__ = [
    "FLOAT16_MAX",
    "FLOAT16_TINY",
    "variance_in",
    "half_except_batch_norm",
    "batch_norm_dtypes",
]

FLOAT16_MAX: float = float(torch.finfo(torch.float16).max)
"""The largest finite float16 value, 65504."""

FLOAT16_TINY: float = 2.0**-24
"""The smallest positive (subnormal) float16 value, about 5.96e-8; anything below half of it
rounds to zero."""


def variance_in(x: Tensor, dtype: torch.dtype, method: str = "naive") -> Tensor:
    """Per-channel biased variance of ``x`` (N, C) with every operation in ``dtype``.

    Parameters
    ----------
    x : Tensor, shape (N, C)
        Values; cast to ``dtype`` first.
    dtype : torch.dtype
        The dtype of the arithmetic and of the result (e.g. ``torch.float16``).
    method : {"naive", "two_pass"}, default "naive"
        ``"naive"``: ``sum(x^2) / N - (sum(x) / N)^2``, one pass over the data, whose sum of
        squares overflows first. ``"two_pass"``: the mean first, then the mean of squared
        deviations (what careful kernels do, in float32).

    Returns
    -------
    Tensor, shape (C,)
        In ``dtype``; ``inf`` or ``nan`` where a sum overflowed, 0 where squares underflowed.
    """
    if x.dim() != 2:
        raise ValueError(f"x must have shape (N, C), got {tuple(x.shape)}")
    x = x.to(dtype)
    n = x.shape[0]
    if method == "naive":
        mean = x.sum(dim=0) / n
        return (x * x).sum(dim=0) / n - mean * mean
    if method == "two_pass":
        centred = x - x.sum(dim=0) / n
        return (centred * centred).sum(dim=0) / n
    raise ValueError(f"method must be 'naive' or 'two_pass', got {method!r}")


def half_except_batch_norm(model: nn.Module, dtype: torch.dtype = torch.float16) -> nn.Module:
    """Convert ``model`` to ``dtype`` like ``model.half()``, except its batch norms, in place.

    The fix for ``model.half()``: every other layer's floating-point parameters and buffers
    become ``dtype``; the batch norms (``torch.nn``, :mod:`bncourse.torch_bn` and frozen ones)
    keep float32 gamma, beta and running statistics, so statistics and running averages are
    computed and stored in float32 (no overflow above 65504, no underflow of small variances).
    The batch norms then take float16 input and return float16 output. Apply it to the float32
    model: after ``.half()`` a running variance above 65504 is already ``inf`` and converting
    the layer back to float32 keeps the ``inf``.

    Parameters
    ----------
    model : nn.Module
        A float32 model.
    dtype : torch.dtype, default torch.float16
        The low-precision dtype (``torch.bfloat16`` works too).

    Returns
    -------
    nn.Module
        ``model`` itself.
    """
    for module in model.modules():
        if is_batch_norm(module) or is_frozen_batch_norm(module):
            module.float()
            continue
        for parameter in module.parameters(recurse=False):
            if parameter is not None and parameter.is_floating_point():
                parameter.data = parameter.data.to(dtype)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point():
                setattr(module, name, buffer.to(dtype))
    return model


def batch_norm_dtypes(model: nn.Module) -> list[dict[str, torch.dtype]]:
    """The dtype of each parameter and buffer of every batch norm of ``model``, in order.

    Returns
    -------
    list of dict
        One dict per batch-norm layer, e.g. ``{"weight": torch.float32, "running_var": ...}``
        (``num_batches_tracked`` is int64 and left out).
    """
    result = []
    for bn in batch_norm_modules(model):
        tensors: dict[str, Tensor | None] = {
            "weight": bn.weight,
            "bias": bn.bias,
            "running_mean": bn.running_mean,
            "running_var": bn.running_var,
        }
        result.append({name: t.dtype for name, t in tensors.items() if t is not None})
    return result
