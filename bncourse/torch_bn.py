"""Batch normalization in PyTorch with the backward pass derived by hand, as in chapter 2.

The module has four parts, in the order the book introduces them:

* :func:`batch_norm_forward` and :func:`batch_norm_backward`, the *reference* training-mode
  kernels: the equations of chapter 2 written with tensors, with the same symbols
  (``mu``, ``var``, ``inv_std``, ``x_hat``, ``gamma``, ``beta``, ``m``). The backward is the
  closed form

  .. math::

      \\frac{\\partial L}{\\partial x} = \\frac{\\gamma}{\\sqrt{\\sigma^2 + \\epsilon}}\\Big(g
      - \\overline{g} - \\hat{x}\\,\\overline{g\\,\\hat{x}}\\Big), \\qquad
      \\frac{\\partial L}{\\partial \\gamma} = \\sum g\\,\\hat{x}, \\qquad
      \\frac{\\partial L}{\\partial \\beta} = \\sum g,

  where :math:`g` is the incoming gradient, bars are means and sums run over every dimension
  but the channel one. :mod:`bncourse.fast.torch_bn` has the same two functions tuned for speed
  (fewer passes over memory) and the opt-in compiled kernels.
* :func:`batch_norm`, a drop-in replacement of :func:`torch.nn.functional.batch_norm`. In
  training it runs the kernels inside an autograd :class:`~torch.autograd.Function`, so that the
  gradient is the closed form above; in evaluation it is a fixed affine map per channel written
  with plain tensor operations. Which kernels run is chosen by :func:`use_kernels` (or the
  :func:`kernels` context manager, or the ``kernels`` keyword): ``"fast"`` (the default),
  ``"reference"`` or ``"compiled"``.
* :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d`: drop-in replacements of the
  ``torch.nn`` modules. They subclass ``torch.nn.modules.batchnorm._BatchNorm`` (so code that
  looks for batch norm by type, such as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, sees
  them) and replace only its ``forward``.
* :func:`fold_batch_norm`: merge an evaluation-mode batch norm into the layer before it (the
  fold of :mod:`bncourse.inference`). ``SyncBatchNorm`` is
  :class:`bncourse.distributed.SyncBatchNorm`.

Only plain tensor operations are used, none of PyTorch's batch-norm kernels. Everything works
on any device, in float64 and float32, and for float16/bfloat16 input (computed in float32, like
PyTorch). The training-mode autograd function is differentiable twice, has a forward-mode
derivative (``jvp``) and a generated ``vmap`` rule, so ``torch.func`` (``grad``, ``vmap``,
``jvp``, ``functional_call``), ``torch.autograd.forward_ad``, ``torch.fx``, ``torch.export``,
``torch.compile``, ``torch.jit.trace`` and ``torch.jit.script`` work with the modules (the last
two run the reference formulas with autograd's derivative, see :class:`BatchNorm2d`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from bncourse.utils import KernelChoice, signature_computed_once

__all__ = [
    "batch_norm",
    "batch_norm_forward",
    "batch_norm_backward",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "fold_batch_norm",
    "SyncBatchNorm",  # noqa: F822 (module __getattr__)
    "kernels",
    "use_kernels",
    "use_compiled_kernels",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)
KERNELS = ("fast", "reference", "compiled")


# ---------------------------------------------------------------------------------------------
# The reference kernels: chapter 2's equations
# ---------------------------------------------------------------------------------------------


def _reduction_dims(x: Tensor) -> list[int]:
    """Every dimension but the channel dimension 1: the dimensions a batch norm averages over."""
    return [0] + list(range(2, x.dim()))


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    """A vector of C values as ``(1, C, 1, ..., 1)``, to broadcast against ``x`` (N, C, *)."""
    return v.view([1, x.shape[1]] + [1] * (x.dim() - 2))


def batch_norm_forward(
    x: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training-mode batch norm of ``x`` with its batch statistics (the reference kernel).

    Parameters
    ----------
    x : Tensor, shape (N, C, *)
        float32 or float64; at least two values per channel.
    gamma, beta : Tensor of shape (C,) or None
        Scale and shift (1 and 0 when None), dtype of ``x``.
    eps : float
        Added to the variance.

    Returns
    -------
    y : Tensor, shape (N, C, *)
        ``gamma * x_hat + beta``.
    mu, var : Tensor, shape (C,)
        Batch mean and biased batch variance of each channel.
    x_mu : Tensor, shape (N, C, *)
        ``x - mu``, the centred input, which the backward uses.
    """
    dims = _reduction_dims(x)
    mu = x.mean(dims, keepdim=True)
    x_mu = x - mu
    correction = x_mu.mean(dims, keepdim=True)  # centre twice: exact for large means too
    mu, x_mu = mu + correction, x_mu - correction
    var = (x_mu * x_mu).mean(dims, keepdim=True)
    inv_std = torch.rsqrt(var + eps)
    x_hat = x_mu * inv_std
    y = x_hat
    if gamma is not None:
        y = y * _per_channel(gamma, x)
    if beta is not None:
        y = y + _per_channel(beta, x)
    return y, mu.view(-1), var.view(-1), x_mu


def batch_norm_backward(
    g: Tensor, x_mu: Tensor, gamma: Tensor | None, var: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of a training-mode batch norm, in closed form (the reference kernel).

    Parameters
    ----------
    g : Tensor, shape (N, C, *)
        The incoming gradient ``dL/dy``.
    x_mu : Tensor, shape (N, C, *)
        The centred input ``x - mu`` (from :func:`batch_norm_forward`).
    gamma : Tensor of shape (C,) or None
        The scale (1 when None).
    var : Tensor, shape (C,)
        The biased batch variance.
    eps : float
        Added to the variance.

    Returns
    -------
    dx : Tensor, shape (N, C, *)
    dgamma, dbeta : Tensor, shape (C,)
        ``sum(g * x_hat)`` and ``sum(g)`` per channel.
    """
    dims = _reduction_dims(g)
    m = g.numel() // g.shape[1]  # values per channel
    inv_std = _per_channel(torch.rsqrt(var + eps), g)
    x_hat = x_mu * inv_std
    dbeta = g.sum(dims, keepdim=True)
    dgamma = (g * x_hat).sum(dims, keepdim=True)
    scale = inv_std if gamma is None else _per_channel(gamma, g) * inv_std
    dx = scale * (g - dbeta / m - x_hat * (dgamma / m))  # x_hat before inv_std: no inv_std**3
    return dx, dgamma.view(-1), dbeta.view(-1)


def _batch_norm_jvp(
    tx: Tensor,
    tgamma: Tensor | None,
    tbeta: Tensor | None,
    x_mu: Tensor,
    gamma: Tensor | None,
    var: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward-mode derivative of :func:`batch_norm_forward`: the tangents of ``y``, ``mu`` and
    ``var`` for tangents ``tx``, ``tgamma``, ``tbeta`` of its inputs (None for zero)."""
    dims = _reduction_dims(x_mu)
    inv_std = _per_channel(torch.rsqrt(var + eps), x_mu)
    x_hat = x_mu * inv_std
    t_mu = tx.mean(dims, keepdim=True)
    t_var = 2.0 * (x_mu * tx).mean(dims, keepdim=True)
    t_x_hat = inv_std * (tx - t_mu - x_hat * (x_hat * tx).mean(dims, keepdim=True))
    t_y = t_x_hat if gamma is None else t_x_hat * _per_channel(gamma, x_mu)
    if tgamma is not None:
        t_y = t_y + x_hat * _per_channel(tgamma, x_mu)
    if tbeta is not None:
        t_y = t_y + _per_channel(tbeta, x_mu)
    return t_y, t_mu.view(-1), t_var.view(-1)


# ---------------------------------------------------------------------------------------------
# Which kernels run: a context variable, switched by a function or a context manager
# ---------------------------------------------------------------------------------------------

_KERNELS = KernelChoice("bncourse_torch_bn_kernels", KERNELS)
_check_kernels_name = _KERNELS.check


def use_kernels(name: str) -> str:
    """Choose the training-mode kernels of :func:`batch_norm` and the modules.

    Parameters
    ----------
    name : {"fast", "reference", "compiled"}
        ``"fast"`` (the default): :mod:`bncourse.fast.torch_bn`, the same formulas in fewer passes
        over memory and one new full-size tensor each way. ``"reference"``:
        :func:`batch_norm_forward` and :func:`batch_norm_backward` of this module, which read
        like the book. ``"compiled"``: plain formulas fused by :func:`torch.compile` (the
        pivot's sums in one pass, then the output; the reference backward), see
        :func:`bncourse.fast.torch_bn.compiled_kernels` (the first call for each kind of input
        compiles for seconds to a minute and needs a C++ compiler on the CPU); on a CPU about
        as fast as ``torch.nn`` or faster.

    Returns
    -------
    str
        The previous choice, so that ``previous = use_kernels("reference"); ...;
        use_kernels(previous)`` restores it. The choice is a :mod:`contextvars` variable: it holds
        in the current thread (and asyncio task) and is inherited by contexts created from it. A
        module's own ``kernels`` argument, when given, takes precedence.
    """
    return _KERNELS.set(name)


@contextlib.contextmanager
def kernels(name: str) -> Iterator[None]:
    """Context manager: :func:`use_kernels` ``(name)`` inside the block, the previous choice
    after it (also when the block raises). ``with torch_bn.kernels("reference"): ...``."""
    with _KERNELS.scoped(name):
        yield


def use_compiled_kernels(enabled: bool = True) -> bool:
    """Turn the compiled kernels on (``use_kernels("compiled")``) or off (``"fast"``).

    Returns whether they were on before, so that ``previous = use_compiled_kernels(); ...;
    use_compiled_kernels(previous)`` restores the setting. See :func:`use_kernels`.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"use_compiled_kernels: enabled must be a bool, got {enabled!r}")
    return use_kernels("compiled" if enabled else "fast") == "compiled"


def _resolve_kernels(name: str | None, x: Tensor) -> str:
    """The kernels that run on ``x``: ``name``, or the current :func:`use_kernels` choice when
    None; ``"reference"`` inside ``torch.compile`` / ``torch.export``, which fuse the plain
    formulas, and for ``"fast"`` on an input of fewer than ``fast.SMALL_INPUT`` values, where
    the reference's few operations cost less than the fast kernels' set-up."""
    from bncourse.fast import torch_bn as fast  # the fast layer imports this module

    if torch.compiler.is_compiling():
        return "reference"
    name = _KERNELS.get() if name is None else name
    if name == "fast" and x.numel() < fast.SMALL_INPUT:
        return "reference"
    return name


def _kernel_functions(name: str) -> tuple[Any, Any]:
    """``(forward, backward)`` of the kernels ``name`` (resolved). The forward returns
    ``(y, mu, var, saved)``; the backward is called as ``backward(g, x, mu, saved, gamma, var,
    eps)``. ``saved`` is the centred input for the reference kernels, the pivots and shifts of
    the fast ones and an empty tensor for the compiled ones (which recompute ``x - mu``)."""
    from bncourse.fast import torch_bn as fast  # the fast layer imports this module

    if name == "reference":
        return batch_norm_forward, lambda g, x, mu, x_mu, *rest: batch_norm_backward(g, x_mu, *rest)
    if name == "compiled":
        forward, backward_from_input = fast.compiled_kernels()
        return forward, lambda g, x, mu, _, *rest: backward_from_input(g, x, mu, *rest)

    def forward(x: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float) -> Any:
        return fast.batch_norm_forward(x, gamma, beta, eps, False)  # keeps no centred input

    def backward(g: Tensor, x: Tensor, mu: Tensor, centring: Tensor, *rest: Any) -> Any:
        return fast.batch_norm_backward_from_input(g, x, centring, *rest)

    return forward, backward


# ---------------------------------------------------------------------------------------------
# The autograd function of training mode
# ---------------------------------------------------------------------------------------------


@signature_computed_once
class _BatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm with the hand-derived backward of the chosen kernels.

    ``apply(x, gamma, beta, eps, kernels)`` returns ``(y, mu, var, saved)``. ``mu`` and ``var``
    are differentiable outputs: the backward takes their gradients too, which makes the backward
    itself differentiable (double backward) when it is built from the saved ``x``, ``mu`` and
    ``var`` with ordinary tensor operations, as it is whenever a graph is being recorded
    (``create_graph=True`` and ``torch.func`` transforms). In the ordinary first-order case the
    kernels' own backward runs on what their forward saved: the centred input ``x - mu`` for the
    reference kernels; for the fast ones each channel's pivot and the mean of ``x - pivot``
    (2C values), from which their backward rebuilds ``x - mu`` in the tensor that becomes
    ``dx``; nothing for the compiled ones, whose backward recomputes ``x - mu`` from ``x``. The
    fast and compiled kernels thus write one full-size tensor each way, as PyTorch's own does.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float, name: str | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        forward, _ = _kernel_functions(_resolve_kernels(name, x))
        return forward(x, gamma, beta, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        x, gamma, _, eps, name = inputs
        _, mu, var, x_mu = output
        ctx.mark_non_differentiable(x_mu)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, gamma, mu, var, x_mu)
        ctx.save_for_forward(x, gamma, mu, var, x_mu)
        ctx.eps, ctx.name = eps, _resolve_kernels(name, x)  # as the forward resolved it
        ctx.kept_x_mu = ctx.name == "reference"  # the fast and compiled forwards keep none

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, g: Tensor | None, g_mu: Tensor | None, g_var: Tensor | None, _: Any
    ) -> tuple[Tensor | None, ...]:
        x, gamma, mu, var, saved = ctx.saved_tensors
        x_mu = saved
        need_x, need_gamma, need_beta = ctx.needs_input_grad[:3]
        dx = dgamma = dbeta = None
        recording = torch.is_grad_enabled()  # a graph of the backward: differentiable ops only
        if recording or (not ctx.kept_x_mu and g_var is not None):
            x_mu = x - _per_channel(mu, x)  # (differentiable, from the saved x and mu)
        if g is not None and recording:
            dx, dgamma, dbeta = batch_norm_backward(g, x_mu, gamma, var, ctx.eps)
        elif g is not None:
            _, backward = _kernel_functions(ctx.name)
            dx, dgamma, dbeta = backward(g, x, mu, saved, gamma, var, ctx.eps)
        if g_mu is not None or g_var is not None:  # gradients through the statistics
            m = x.numel() // x.shape[1]
            extra = torch.zeros_like(x) if dx is None else dx
            if g_mu is not None:
                extra = extra + _per_channel(g_mu, x) / m
            if g_var is not None:
                extra = extra + x_mu * _per_channel(2.0 * g_var / m, x)
            dx = extra
        return (
            dx if need_x else None,
            dgamma if need_gamma else None,
            dbeta if need_beta else None,
            None,
            None,
        )

    @staticmethod
    def jvp(  # type: ignore[override]
        ctx: Any, tx: Tensor | None, tgamma: Tensor | None, tbeta: Tensor | None, *_: Any
    ) -> tuple[Tensor | None, ...]:
        x, gamma, mu, var, x_mu = ctx.saved_tensors
        if not ctx.kept_x_mu:
            x_mu = x - _per_channel(mu, x)
        if tx is None:
            tx = torch.zeros_like(x_mu)
        t_y, t_mu, t_var = _batch_norm_jvp(tx, tgamma, tbeta, x_mu, gamma, var, ctx.eps)
        return t_y, t_mu, t_var, None

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[Any, ...], x: Tensor, gamma: Any, beta: Any, eps: float, name: Any
    ) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
        """``torch.func.vmap``: B independent batch norms of C channels are one batch norm of
        B * C channels, so the vmapped dimension is folded into the channel dimension."""
        size = info.batch_size
        x = x.movedim(in_dims[0], 0) if in_dims[0] is not None else x.expand(size, *x.shape)
        per_sample = x.movedim(0, 1)  # (N, B, C, *)
        shape = per_sample.shape
        folded = per_sample.reshape(shape[0], shape[1] * shape[2], *shape[3:])

        def fold(vector: Tensor | None, dim: int | None) -> Tensor | None:
            if vector is None:
                return None
            if dim is None:
                return vector.repeat(size)
            return vector.movedim(dim, 0).reshape(-1)

        if _resolve_kernels(name, folded) == "compiled":
            name = "fast"  # (compiled code under vmap: the fast kernels instead)
        y, mu, var, x_mu = _BatchNormFunction.apply(
            folded, fold(gamma, in_dims[1]), fold(beta, in_dims[2]), eps, name
        )
        y = y.reshape(shape).movedim(1, 0)
        if _resolve_kernels(name, folded) != "reference":  # no centred input kept: none to unfold
            return (y, mu.view(size, -1), var.view(size, -1), x_mu), (0, 0, 0, None)
        x_mu = x_mu.reshape(shape).movedim(1, 0)
        return (y, mu.view(size, -1), var.view(size, -1), x_mu), (0, 0, 0, 0)


class _BatchNormFunctionForCompile(_BatchNormFunction):
    """:class:`_BatchNormFunction` for ``torch.compile``, which refuses an autograd function
    with its own ``jvp`` (forward-mode AD of compiled code then fails clearly)."""

    jvp = torch.autograd.Function.jvp


# ---------------------------------------------------------------------------------------------
# Argument checks: the exception types of torch.nn.functional.batch_norm, clearer messages
# ---------------------------------------------------------------------------------------------


def _as_float(name: str, value: Any) -> float:
    """A number (or a one-element tensor) as a float, as PyTorch's argument parser takes it."""
    if isinstance(value, Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    hint = ""
    if value is None and name == "momentum":
        hint = (
            "; for a cumulative moving average pass 1 / num_batches_tracked, as the BatchNorm "
            "modules do for momentum=None"
        )
    raise TypeError(f"batch_norm: {name} must be a float, got {value!r}{hint}")


def _check_per_channel(name: str, tensor: Any, input: Tensor, vector_only: bool) -> Tensor:
    """``tensor`` as a (C,) vector; PyTorch's exception types for a wrong size or dtype."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"batch_norm: {name} must be a Tensor or None, got {type(tensor).__name__}")
    channels = input.shape[1]
    if tensor.numel() != channels or (vector_only and tensor.dim() != 1):
        raise RuntimeError(
            f"batch_norm: {name} should be a vector of {channels} values, one per channel of "
            f"input of shape {tuple(input.shape)} (dimension 1), got shape {tuple(tensor.shape)}"
        )
    allowed = (input.dtype, torch.float32) if input.dtype in _HALF_DTYPES else (input.dtype,)
    if tensor.dtype not in allowed:
        expected = " or ".join(str(dtype) for dtype in allowed)
        raise RuntimeError(
            f"batch_norm: {name} has dtype {tensor.dtype}, expected {expected} for input of "
            f"dtype {input.dtype} (mixed dtypes)"
        )
    if tensor.device != input.device:
        raise RuntimeError(
            f"batch_norm: {name} is on device {tensor.device} but input is on {input.device}"
        )
    return tensor.reshape(channels) if tensor.dim() != 1 else tensor


def _check_input(input: Any, training: Any) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"batch_norm: input must be a Tensor, got {type(input).__name__}")
    if not isinstance(training, bool):
        raise TypeError(f"batch_norm: training must be a bool, got {training!r}")
    if input.dtype not in _FLOAT_DTYPES:
        raise NotImplementedError(
            "batch_norm: input must be a floating-point tensor (float16, bfloat16, float32 or "
            f"float64), got dtype {input.dtype}"
        )
    if input.dim() < 2 and input.numel() > 0:
        if training and input.dim() == 1 and input.numel() == 1:
            _check_enough_values(input)
        error = IndexError if training or input.dim() == 0 else RuntimeError
        raise error(
            "batch_norm: input must have shape (N, C, *) with at least 2 dimensions, got a "
            f"{input.dim()}-D tensor of shape {tuple(input.shape)}"
        )


def _check_enough_values(input: Tensor) -> None:
    values_per_channel = input.shape[0] * math.prod(input.shape[2:])
    if values_per_channel == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{input.size()}: batch statistics need at least two values per channel"
        )


# ---------------------------------------------------------------------------------------------
# The functional interface
# ---------------------------------------------------------------------------------------------


def _compute_dtype(input: Tensor) -> torch.dtype:
    """The dtype the arithmetic runs in: float32 for half-precision input, else the input's."""
    return torch.float32 if input.dtype in _HALF_DTYPES else input.dtype


def _strides_like_channels_last(input: Tensor) -> bool:
    """Whether the strides of a 4-D or 5-D ``input`` order its dimensions as channels-last does
    (C fastest, then W, H, (D,) N), PyTorch's rule for choosing a channels-last output."""
    order = [1, 3, 2, 0] if input.dim() == 4 else [1, 4, 3, 2, 0]
    if input.stride(1) == 0:  # an expanded channel dimension: contiguous by default
        return False
    smallest = 0
    for dim in order:
        size, stride = input.shape[dim], input.stride(dim)
        if size == 0 or stride < smallest or (dim == 0 and smallest == input.stride(1)):
            return False
        smallest = stride * size if size > 1 else stride
    return True


def _suggest_memory_format(input: Tensor) -> torch.memory_format:
    """The layout of PyTorch's batch-norm output for ``input``: channels-last (2-D or 3-D)
    where the input's strides are channels-last-like, else contiguous."""
    if input.dim() in (4, 5) and not input.is_contiguous() and _strides_like_channels_last(input):
        return torch.channels_last if input.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format


def _in_layout_of(tensor: Tensor, input: Tensor) -> Tensor:
    """``tensor`` (shaped like ``input``) in the layout PyTorch's batch norm gives its output."""
    memory_format = _suggest_memory_format(input)
    if tensor.is_contiguous(memory_format=memory_format):
        return tensor
    return tensor.contiguous(memory_format=memory_format)


def _update_running(
    running: Tensor, batch_value: Tensor, momentum: float, factor: float = 1.0
) -> None:
    """``running <- (1 - momentum) * running + momentum * factor * batch_value``, in place."""
    with torch.no_grad():
        if running.dtype == batch_value.dtype:  # two in-place operations, no temporaries
            running.mul_(1.0 - momentum).add_(batch_value, alpha=momentum * factor)
        else:  # (float32 statistics of float16 / bfloat16 input): computed in batch_value's
            updated = running.to(batch_value.dtype) * (1.0 - momentum)
            running.copy_(updated.add_(batch_value, alpha=momentum * factor))


def _evaluation(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """``(x - running_mean) * weight / sqrt(running_var + eps) + bias``, plain tensor operations
    (autograd differentiates them); centring first stays accurate for inputs with a large mean."""
    dtype = _compute_dtype(input)
    inv_std = torch.rsqrt(running_var.detach().to(dtype) + eps)
    scale = inv_std if weight is None else inv_std * weight.to(dtype)
    x_mu = input.to(dtype) - _per_channel(running_mean.detach().to(dtype), input)
    if bias is None:
        output = x_mu * _per_channel(scale, input)
    else:
        output = torch.addcmul(
            _per_channel(bias.to(dtype), input), x_mu, _per_channel(scale, input)
        )
    return output.to(input.dtype)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    kernels: str | None = None,
) -> Tensor:
    """Batch normalization, a drop-in replacement of :func:`torch.nn.functional.batch_norm`.

    In training (``training=True``) every channel is normalised with the mean and the biased
    variance of its values in the batch, ``y = (x - mean) / sqrt(var + eps) * weight + bias``,
    and, when ``running_mean``/``running_var`` are given, they are updated in place:
    ``running <- (1 - momentum) * running + momentum * batch_value``, with the *unbiased* variance
    ``var * n / (n - 1)`` (``n`` values per channel) going into ``running_var``. In evaluation
    (``training=False``) the running statistics normalise instead and nothing is updated.

    Parameters
    ----------
    input : Tensor, shape (N, C, *)
        Floating-point input; ``*`` is any number of further (spatial) dimensions. float16 and
        bfloat16 input is computed in float32 and returned in its own dtype. An empty input
        (including a 1-D one of shape (0,)) gives an empty output.
    running_mean, running_var : Tensor of shape (C,) or None
        Running statistics; both or neither. Required when ``training=False``. Same dtype as
        ``input``, or float32 when ``input`` is float16/bfloat16.
    weight, bias : Tensor of C values, optional
        Affine parameters gamma and beta (1 and 0 when None), any shape with C elements (as in
        PyTorch). Same dtype rule.
    training : bool
        Use (and track) batch statistics rather than the running ones.
    momentum : float or one-element Tensor
        Weight of the new batch in the running averages. ``None`` is refused, as by PyTorch;
        :class:`BatchNorm1d` and friends implement ``momentum=None`` (a cumulative average) by
        passing ``1 / num_batches_tracked``.
    eps : float
        Added to the variance before the square root; must be > 0 in training, >= 0 otherwise.
    kernels : {"fast", "reference", "compiled"} or None, keyword-only
        The training-mode kernels; None follows :func:`use_kernels` (``"fast"`` by default).

    Returns
    -------
    Tensor, shape (N, C, *)
        Same shape, dtype and memory layout (e.g. channels-last) as PyTorch's output.

    Raises
    ------
    TypeError
        ``input`` is not a tensor, ``training`` not a bool, ``momentum`` or ``eps`` not a number.
    NotImplementedError
        ``input`` is not a floating-point tensor.
    RuntimeError
        A per-channel tensor with the wrong number of values (or a running statistic that is not
        a vector), the wrong dtype or device; no running statistics in evaluation.
    ValueError
        Only one value per channel in training; a bad ``eps``; only one running statistic.
    IndexError
        A non-empty input with fewer than 2 dimensions (``RuntimeError`` in evaluation).

    Notes
    -----
    Training mode runs an autograd function whose backward is the closed form (module docstring);
    it is differentiable again (double backward, ``torch.autograd.gradgradcheck``), has a
    forward-mode derivative and a vmap rule. Evaluation mode is plain tensor operations.
    """
    _check_input(input, training)
    if training:
        _check_enough_values(input)
    momentum = _as_float("momentum", momentum)
    eps = _as_float("eps", eps)
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if not training and running_mean is None:
        raise RuntimeError(
            "batch_norm: running_mean must be defined in evaluation mode (training=False); pass "
            "running_mean and running_var, or training=True to normalise with batch statistics"
        )
    if kernels is not None:
        _check_kernels_name(kernels)
    if input.dim() < 2:  # empty and 1-D, as PyTorch: an empty result
        return input.clone()
    running_mean, running_var = (
        None if t is None else _check_per_channel(name, t, input, True)
        for name, t in (("running_mean", running_mean), ("running_var", running_var))
    )
    weight, bias = (
        None if t is None else _check_per_channel(name, t, input, False)
        for name, t in (("weight", weight), ("bias", bias))
    )

    if input.numel() == 0:  # like PyTorch: an empty output still connected to the graph
        output = input.clone()
        if weight is not None and weight.numel():
            output = output * weight[0]
        if bias is not None and bias.numel():
            output = output + bias[0]
        return output
    if not training:
        output = _evaluation(input, running_mean, running_var, weight, bias, eps)
        return _in_layout_of(output, input)

    dtype = _compute_dtype(input)
    compiling = torch.compiler.is_compiling()
    function = _BatchNormFunctionForCompile if compiling else _BatchNormFunction
    output, mu, var, _ = function.apply(
        input.to(dtype),
        None if weight is None else weight.to(dtype),
        None if bias is None else bias.to(dtype),
        eps,
        kernels,
    )
    if running_mean is not None and running_var is not None:
        m = input.numel() // input.shape[1]
        _update_running(running_mean, mu.detach(), momentum)
        _update_running(running_var, var.detach(), momentum, m / (m - 1))  # unbiased
    return _in_layout_of(output.to(input.dtype), input)


# ---------------------------------------------------------------------------------------------
# TorchScript and tracing: the reference formulas with autograd's derivative
# ---------------------------------------------------------------------------------------------


def _batch_norm_script(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    """:func:`batch_norm` for ``torch.jit.script`` and ``torch.jit.trace``, which cannot record a
    Python autograd function: the reference forward, differentiated by autograd (the same values;
    the gradient is autograd's, equal up to rounding). Inputs are assumed valid (the modules
    check the rank; PyTorch's own operations raise on the rest)."""
    dtype = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    x = input.to(dtype)
    gamma = None if weight is None else weight.reshape(-1).to(dtype)
    beta = None if bias is None else bias.reshape(-1).to(dtype)
    if training:
        y, mu, var, _ = batch_norm_forward(x, gamma, beta, eps)
        if running_mean is not None and running_var is not None:
            m = x.numel() // x.shape[1]
            mu, var = mu.detach(), var.detach()  # (jit.trace records no no_grad blocks)
            with torch.no_grad():
                running_mean.copy_(running_mean * (1.0 - momentum) + mu * momentum)
                running_var.copy_(running_var * (1.0 - momentum) + var * (momentum * m / (m - 1)))
        return y.to(input.dtype)
    assert running_mean is not None and running_var is not None
    inv_std = torch.rsqrt(running_var.to(dtype) + eps)
    y = (x - _per_channel(running_mean.to(dtype), x)) * _per_channel(inv_std, x)
    if gamma is not None:
        y = y * _per_channel(gamma, x)
    if beta is not None:
        y = y + _per_channel(beta, x)
    return y.to(input.dtype)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


def _check_module_input(module: _BatchNorm, input: Any) -> None:
    """The module's checks: a tensor of the right rank (``_check_input_dim``) and channels."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{type(module).__name__}: input must be a Tensor, got {type(input)}")
    module._check_input_dim(input)
    if module.weight is not None or module.running_mean is not None:
        if input.shape[1] != module.num_features:
            raise RuntimeError(
                f"{type(module).__name__}: expected input with {module.num_features} channels "
                f"(num_features) on dimension 1, got input of shape {tuple(input.shape)}"
            )


def _module_forward(module: _BatchNorm, input: Tensor) -> Tensor:
    """The forward of the modules, kept whole under ``torch.fx`` (a leaf function that receives
    the module, so that its mode and buffers are read when the traced graph runs)."""
    _check_module_input(module, input)
    factor = module._count_batch()
    # batch statistics in training, and in evaluation when there are no running statistics
    use_batch_stats = module.training or (
        module.running_mean is None and module.running_var is None
    )
    # the buffers are passed only when they are updated (training and tracking) or used (eval)
    pass_buffers = not module.training or module.track_running_stats
    return batch_norm(
        input,
        module.running_mean if pass_buffers else None,
        module.running_var if pass_buffers else None,
        module.weight,
        module.bias,
        use_batch_stats,
        factor,
        module.eps,
        kernels=module.kernels,
    )


torch.fx.wrap("_module_forward")


class _BatchNorm(nn.modules.batchnorm._BatchNorm):
    """Shared logic of :class:`BatchNorm1d`, :class:`BatchNorm2d` and :class:`BatchNorm3d`.

    A subclass of ``torch.nn.modules.batchnorm._BatchNorm`` that keeps everything of it (the
    constructor, parameters, buffers, ``state_dict`` layout and version, loading of old checkpoints
    without ``num_batches_tracked``, ``reset_parameters``, ``extra_repr``) and replaces only
    ``forward``, which calls :func:`batch_norm` of this module instead of PyTorch's kernel.
    """

    __constants__ = ["track_running_stats", "momentum", "eps", "num_features", "affine"]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        kernels: str | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.kernels = None if kernels is None else _check_kernels_name(kernels)

    def forward(self, input: Tensor) -> Tensor:
        """Normalise ``input`` of shape (N, C, *) per channel; returns the same shape."""
        if torch.jit.is_scripting():
            return self._script_forward(input)
        if torch.jit.is_tracing():
            return self._traced_forward(input)
        return self._eager_forward(input)

    @torch.jit.unused
    def _eager_forward(self, input: Tensor) -> Tensor:
        return _module_forward(self, input)

    @torch.jit.unused
    def _traced_forward(self, input: Tensor) -> Tensor:
        _check_module_input(self, input)
        return self._script_forward(input)

    def _count_batch(self) -> float:
        """Count a training batch in ``num_batches_tracked``; the momentum factor to use
        (``1 / num_batches_tracked`` for ``momentum=None``, a cumulative average)."""
        factor = 0.0
        if self.momentum is not None:
            factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    factor = 1.0 / float(self.num_batches_tracked)
        return factor

    def _script_forward(self, input: Tensor) -> Tensor:
        # torch.nn.modules.batchnorm._BatchNorm.forward, with our TorchScript-able functional
        self._check_input_dim(input)
        factor = self._count_batch()
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        pass_buffers = not self.training or self.track_running_stats
        return _batch_norm_script(
            input,
            self.running_mean if pass_buffers else None,
            self.running_var if pass_buffers else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
        )


_SHAPE_DOC = """
    A drop-in replacement of :class:`torch.nn.{name}` (same arguments, parameters ``weight``
    (gamma) and ``bias`` (beta), buffers ``running_mean``, ``running_var``,
    ``num_batches_tracked``, state dict and repr; an instance of
    ``torch.nn.modules.batchnorm._BatchNorm``) whose computation is :func:`batch_norm`: the
    hand-derived backward of chapter 2 instead of PyTorch's kernel.

    Parameters
    ----------
    num_features : int
        Number of channels ``C``.
    eps : float
        Added to the variance for numerical stability (default 1e-5).
    momentum : float or None
        Weight of a new batch in the running statistics (default 0.1); ``None`` gives the
        cumulative average of all batches seen (momentum ``1 / num_batches_tracked``).
    affine : bool
        Learn a per-channel scale ``weight`` (initialised to 1) and shift ``bias`` (to 0).
    track_running_stats : bool
        Keep running statistics and use them in evaluation mode. When False the buffers are None
        and batch statistics are used in both modes.
    device, dtype
        Where and in which dtype to create the parameters and buffers.
    bias : bool, keyword-only
        With ``affine=True``, whether to learn the shift ``bias``.
    kernels : {{"fast", "reference", "compiled"}} or None, keyword-only
        The training-mode kernels of this module; None (the default) follows
        :func:`use_kernels`, which is ``"fast"`` unless changed.

    Shape: input {shape}; output the same.

    Notes
    -----
    Works with ``torch.func`` (``grad``, ``vmap`` in evaluation mode and in training mode without
    running statistics, ``jvp``, ``functional_call``), forward-mode AD, double backward,
    ``torch.fx.symbolic_trace`` (the module stays one call in the graph and reads its mode when
    the graph runs), ``torch.export`` and ``torch.compile`` (which trace the reference formulas).
    ``torch.jit.script`` and ``torch.jit.trace`` cannot record the Python autograd function;
    there the module runs the same reference formulas differentiated by autograd, with the same
    values (gradients equal up to rounding).
"""


class BatchNorm1d(_BatchNorm):
    __doc__ = "Batch norm over a 2-D input (N, C) or a 3-D input (N, C, L).\n" + _SHAPE_DOC.format(
        name="BatchNorm1d", shape="(N, C) or (N, C, L)"
    )

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(
                f"BatchNorm1d: expected 2D or 3D input (N, C) or (N, C, L) (got {input.dim()}D "
                "input)"
            )


class BatchNorm2d(_BatchNorm):
    __doc__ = "Batch norm over a 4-D input (N, C, H, W).\n" + _SHAPE_DOC.format(
        name="BatchNorm2d", shape="(N, C, H, W)"
    )

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(
                f"BatchNorm2d: expected 4D input (N, C, H, W) (got {input.dim()}D input)"
            )


class BatchNorm3d(_BatchNorm):
    __doc__ = "Batch norm over a 5-D input (N, C, D, H, W).\n" + _SHAPE_DOC.format(
        name="BatchNorm3d", shape="(N, C, D, H, W)"
    )

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(
                f"BatchNorm3d: expected 5D input (N, C, D, H, W) (got {input.dim()}D input)"
            )


# ---------------------------------------------------------------------------------------------
# Folding, and SyncBatchNorm: kept under these names, implemented elsewhere
# ---------------------------------------------------------------------------------------------


def fold_batch_norm(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """Merge an evaluation-mode batch norm into the linear or convolution layer before it.

    The book's one fold, :func:`bncourse.inference.fold_batch_norm` (same arguments, result and
    errors), under the name the chapters use: a new ``nn.Linear``/``nn.Conv1d/2d/3d`` with
    ``weight * s`` and bias ``b * s + t`` per output channel, ``s = gamma / sqrt(running_var +
    eps)``, ``t = beta - running_mean * s``, for ``bn`` of ``torch.nn`` or of this module.
    """
    from bncourse.inference import fold_batch_norm as fold  # inference imports this module

    return fold(layer, bn)


def __getattr__(name: str) -> Any:
    """``bncourse.torch_bn.SyncBatchNorm`` is :class:`bncourse.distributed.SyncBatchNorm`
    (imported on first use: the distributed module builds on this one)."""
    if name == "SyncBatchNorm":
        from bncourse.distributed import SyncBatchNorm

        return SyncBatchNorm
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
