"""Batch normalization in PyTorch with a hand-derived backward pass.

The module has three parts, in the order the book introduces them:

* :func:`batch_norm`, a functional core with the signature and semantics of
  :func:`torch.nn.functional.batch_norm`. In training it normalises with the batch statistics and
  runs an autograd :class:`~torch.autograd.Function` whose backward is the closed form of the book,

  .. math::

      \\frac{\\partial L}{\\partial x} = \\frac{\\gamma}{\\sigma}\\Big(g - \\overline{g}
      - \\hat{x}\\,\\overline{g\\,\\hat{x}}\\Big), \\qquad
      \\frac{\\partial L}{\\partial \\gamma} = \\sum g\\,\\hat{x}, \\qquad
      \\frac{\\partial L}{\\partial \\beta} = \\sum g,

  where :math:`g` is the incoming gradient, bars are means and sums run over every dimension but
  the channel one. In evaluation it is a fixed affine map per channel with its own backward.
* :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d`: drop-in replacements of the
  ``torch.nn`` modules (same arguments, parameters, buffers and ``state_dict`` keys), built on
  ``nn.Module`` and :func:`batch_norm`.
* :func:`fold_batch_norm`: merge an evaluation-mode batch norm into the linear or convolution
  layer before it.

Only plain tensor operations are used (reductions and elementwise arithmetic); none of PyTorch's
own batch-norm kernels. :func:`use_compiled_kernels` (off by default) runs the same training-mode
formulas through kernels fused by :func:`torch.compile`, which brings the speed to that of
``torch.nn.BatchNorm2d``; the plain path makes about twelve full-size passes to native's four.
Everything runs on any device, in float64, float32, and in float16 or bfloat16 (computed in
float32, like PyTorch).
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

try:  # PyTorch's own rule for the layout of a new tensor like a given one
    from torch._prims_common import suggest_memory_format as _suggest_memory_format
except ImportError:  # pragma: no cover - older or newer PyTorch without it

    def _suggest_memory_format(input: Tensor) -> torch.memory_format:
        last = torch.channels_last if input.dim() == 4 else torch.channels_last_3d
        if not input.is_contiguous() and input.is_contiguous(memory_format=last):
            return last
        return torch.contiguous_format


__all__ = [
    "batch_norm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "fold_batch_norm",
    "use_compiled_kernels",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _compute_dtype(input: Tensor) -> torch.dtype:
    """The dtype the arithmetic runs in: float32 for half-precision input, else the input's."""
    return torch.float32 if input.dtype in _HALF_DTYPES else input.dtype


def _check_input(input: Any) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"batch_norm: input must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            "batch_norm: input must be a floating-point tensor (float16, bfloat16, float32 or "
            f"float64), got dtype {input.dtype}"
        )
    if input.dim() < 2:
        raise ValueError(
            "batch_norm: input must have shape (N, C, *) with at least 2 dimensions, got a "
            f"{input.dim()}-D tensor of shape {tuple(input.shape)}"
        )


def _check_per_channel(name: str, tensor: Any, input: Tensor) -> None:
    """Check that ``tensor`` is a vector of one value per channel that ``input`` can use."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"batch_norm: {name} must be a torch.Tensor or None, got {type(tensor)}")
    channels = input.shape[1]
    if tuple(tensor.shape) != (channels,):
        raise ValueError(
            f"batch_norm: {name} should have shape ({channels},), one value per channel of input "
            f"of shape {tuple(input.shape)}, got shape {tuple(tensor.shape)}"
        )
    allowed = (input.dtype, torch.float32) if input.dtype in _HALF_DTYPES else (input.dtype,)
    if tensor.dtype not in allowed:
        expected = " or ".join(str(dtype) for dtype in allowed)
        raise TypeError(
            f"batch_norm: {name} has dtype {tensor.dtype}, expected {expected} for input of "
            f"dtype {input.dtype}"
        )
    if tensor.device != input.device:
        raise ValueError(
            f"batch_norm: {name} is on device {tensor.device} but input is on {input.device}"
        )


def _channel_view_shape(input: Tensor) -> list[int]:
    """``[1, C, 1, ..., 1]``: the shape that broadcasts a per-channel vector against ``input``."""
    return [1, input.shape[1]] + [1] * (input.dim() - 2)


def _reduction_dims(input: Tensor) -> list[int]:
    """Every dimension but the channel dimension 1."""
    return [0] + list(range(2, input.dim()))


def _memory_format_of(input: Tensor) -> torch.memory_format:
    """The layout PyTorch's batch norm gives its output for ``input``: channels-last (2-D or 3-D)
    where the input's strides are channels-last-like, else contiguous."""
    return _suggest_memory_format(input) if input.dim() in (4, 5) else torch.contiguous_format


def _in_layout_of(tensor: Tensor, input: Tensor) -> Tensor:
    """``tensor`` (shaped like ``input``) in the memory layout of PyTorch's output for ``input``:
    itself when it already is (the usual case), else a copy. Elementwise operations keep the
    input's strides, which for an unusual permutation (say a transposed (N, L, C) tensor) differ
    from what ``torch.nn`` returns."""
    memory_format = _memory_format_of(input)
    if tensor.is_contiguous(memory_format=memory_format):
        return tensor
    return tensor.contiguous(memory_format=memory_format)


# ---------------------------------------------------------------------------------------------
# Training: batch statistics, hand-derived backward
# ---------------------------------------------------------------------------------------------


def _update_running(running: Tensor, batch_value: Tensor, momentum: float) -> None:
    """``running <- (1 - momentum) * running + momentum * batch_value``, in place."""
    if running.dtype == batch_value.dtype:
        running.mul_(1.0 - momentum).add_(batch_value, alpha=momentum)
    else:  # half-precision buffers: update in float32, store rounded
        updated = (
            running.to(batch_value.dtype).mul_(1.0 - momentum).add_(batch_value, alpha=momentum)
        )
        running.copy_(updated)


def _update_running_statistics(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float,
) -> None:
    """Fold a batch's ``mean`` and biased ``var`` (C values each, over ``count`` values per
    channel) into the running statistics, in place, the variance made unbiased first; nothing
    when there are no running statistics."""
    if running_mean is None or running_var is None:
        return
    _update_running(running_mean, mean.view(-1), momentum)
    _update_running(running_var, var.view(-1) * (count / (count - 1)), momentum)


class _BatchNormTraining(torch.autograd.Function):
    """Batch norm with batch statistics; the backward is the closed form, not autograd.

    Forward (every tensor in the compute dtype, ``shape = (1, C, 1, ...)``)::

        pivot   = x[0:1, :, 0:1, ...]              one sample per channel (C values)
        d       = (x - pivot) - mean(x - pivot)     = x - mean(x), the centred input (saved)
        var     = sum(d * d) / count                biased batch variance
        invstd  = 1 / sqrt(var + eps)
        scale   = weight * invstd                   so that y = d * scale + bias
        y       = d * scale + bias

    Subtracting a sample of each channel before averaging (the "shifted data" algorithm) keeps
    the mean and variance accurate when the mean is large compared with the spread, and makes a
    constant channel give ``d == 0`` exactly, hence ``y == bias`` exactly.

    Backward, with ``g`` the incoming gradient and ``x_hat = d * invstd``::

        dx = scale * (g - mean(g) - x_hat * mean(g * x_hat))
           = scale * g + p * d + q,   p = -scale * invstd**2 * mean(g * d),  q = -scale * mean(g)
        dweight = sum(g * x_hat) = invstd * sum(g * d)
        dbias   = sum(g)

    Seven full-size operations forward and five backward, chosen by timing on the CPU: three
    allocations (the centred input, the output, the input gradient), the squares written into
    the output's memory before the output is. Some fusions are slower than what they replace:
    ``torch.linalg.vector_norm`` for the sum of squares (and over ten times slower on
    channels-last input), ``addcmul`` into the squares' buffer for ``d * scale + bias``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
    ) -> Tensor:
        dtype = _compute_dtype(input)
        x = input.to(dtype)
        shape = _channel_view_shape(x)
        dims = _reduction_dims(x)
        count = x.numel() // x.shape[1]  # values per channel

        # a small contiguous copy: broadcasting a strided view of x is slow (channels-last)
        pivot = x[(slice(0, 1), slice(None)) + (slice(0, 1),) * (x.dim() - 2)].contiguous()
        centred = torch.sub(x, pivot)  # x - pivot, in x's memory layout
        shifted_mean = centred.sum(dims, keepdim=True).div_(count)
        centred.sub_(shifted_mean)  # now x - mean(x)

        output = torch.mul(centred, centred)  # scratch for the squares, then the output
        var = output.sum(dims, keepdim=True).div_(count)
        invstd = var.add(eps).rsqrt_()
        scale = invstd if weight is None else invstd * weight.to(dtype).view(shape)
        torch.mul(centred, scale, out=output)
        if bias is not None:  # (addcmul with two broadcast operands is slower than the two)
            output.add_(bias.to(dtype).view(shape))

        _update_running_statistics(
            running_mean, running_var, pivot + shifted_mean, var, count, momentum
        )

        ctx.save_for_backward(centred, scale, invstd)
        ctx.input_dtype = input.dtype
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _in_layout_of(output.to(input.dtype), input)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        centred, scale, invstd = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad = grad_output.to(centred.dtype)
        dims = _reduction_dims(centred)
        count = centred.numel() // centred.shape[1]

        grad_input = grad_weight = grad_bias = None
        if need_input or need_bias:
            sum_grad = grad.sum(dims, keepdim=True)
        if need_input or need_weight:
            buffer = torch.mul(grad, centred)
            sum_grad_centred = buffer.sum(dims, keepdim=True)
        if need_input:
            p = (scale * invstd * invstd).mul_(sum_grad_centred).mul_(-1.0 / count)
            q = (scale * sum_grad).mul_(-1.0 / count)
            torch.addcmul(q, grad, scale, out=buffer)
            buffer.addcmul_(centred, p)
            grad_input = _in_layout_of(buffer.to(ctx.input_dtype), centred)
        if need_weight:
            grad_weight = (sum_grad_centred * invstd).view(-1).to(ctx.weight_dtype)
        if need_bias:
            grad_bias = sum_grad.view(-1).to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Training with compiled kernels (opt-in): the same formulas, fused by torch.compile
# ---------------------------------------------------------------------------------------------
#
# The plain path above runs twelve separate full-size operations per training step, and each
# one reads (and most write) the whole tensor; PyTorch's native kernel makes about four passes.
# torch.compile can fuse the same formulas into a few loops (reductions and the elementwise
# map over the data in one kernel each), which brings the speed to that of the native kernel.
# It is off by default: the first call compiles for tens of seconds, needs a C++ compiler on
# the CPU (Triton on CUDA), and the plain path is the one the book reads line by line.


def _training_forward_math(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Output, batch mean and biased variance (C,), ``invstd`` and ``scale`` (broadcastable).

    The algorithm of :class:`_BatchNormTraining` written without in-place operations, so that
    torch.compile can fuse it; the centred input is not kept (backward recomputes it).
    """
    dtype = _compute_dtype(input)
    x = input.to(dtype)
    shape = _channel_view_shape(x)
    dims = _reduction_dims(x)
    count = x.numel() // x.shape[1]
    pivot = x[(slice(0, 1), slice(None)) + (slice(0, 1),) * (x.dim() - 2)]
    shifted_mean = (x - pivot).sum(dims, keepdim=True) / count
    centred = (x - pivot) - shifted_mean
    var = (centred * centred).sum(dims, keepdim=True) / count
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else invstd * weight.to(dtype).view(shape)
    output = centred * scale
    if bias is not None:
        output = output + bias.to(dtype).view(shape)
    return output.to(input.dtype), (pivot + shifted_mean).view(-1), var.view(-1), invstd, scale


def _training_backward_math(
    grad_output: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, scale: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_input, sum(g * x_hat), sum(g))``: the closed form of :class:`_BatchNormTraining`."""
    dtype = scale.dtype
    g = grad_output.to(dtype)
    centred = input.to(dtype) - mean.view(_channel_view_shape(input))
    dims = _reduction_dims(g)
    count = g.numel() // g.shape[1]
    sum_grad = g.sum(dims, keepdim=True)
    sum_grad_centred = (g * centred).sum(dims, keepdim=True)
    grad_input = scale * (
        g - sum_grad / count - centred * (invstd * invstd) * (sum_grad_centred / count)
    )
    return (
        grad_input.to(grad_output.dtype),
        (sum_grad_centred * invstd).view(-1),
        sum_grad.view(-1),
    )


class _Compiled:
    """The compiled kernels, made on first use, and whether :func:`batch_norm` uses them."""

    enabled = False
    forward: Any = None
    backward: Any = None

    @classmethod
    def kernels(cls) -> tuple[Any, Any]:
        if cls.forward is None:
            cls.forward = torch.compile(_training_forward_math)
            cls.backward = torch.compile(_training_backward_math)
        return cls.forward, cls.backward

    @classmethod
    def run(cls, which: int, fallback: Any, *args: Any) -> Any:
        """Call compiled kernel ``which`` (0 forward, 1 backward); on a compilation failure warn,
        switch the compiled path off and return ``fallback(*args)`` (the same formulas, eager)."""
        try:
            return cls.kernels()[which](*args)
        except Exception as error:  # e.g. no C++ compiler: BackendCompilerFailed
            if not cls.enabled:
                raise
            cls.enabled = False
            warnings.warn(
                "bncourse.torch_bn: compiling the batch-norm kernels failed, using the plain "
                f"operations from now on ({type(error).__name__}: {str(error)[:200]})",
                RuntimeWarning,
                stacklevel=4,
            )
            return fallback(*args)


def use_compiled_kernels(enabled: bool = True) -> bool:
    """Run training-mode batch norm through kernels fused by :func:`torch.compile`.

    The formulas are those of the plain path (the same pivot-shifted statistics and the same
    closed-form backward); only the number of passes over memory changes, which on a CPU brings
    :class:`BatchNorm2d` to about the speed of ``torch.nn.BatchNorm2d`` (see
    ``benchmarks/bench_torch_bn.py``). Evaluation mode is unchanged (it is already two passes).

    The first call for each new kind of input (rank, dtype, affine or not; a second input shape
    makes the shapes dynamic) compiles, which takes tens of seconds on a small CPU and needs a
    C++ compiler (Triton on CUDA). If compiling fails, a ``RuntimeWarning`` says so and the
    plain operations are used from then on.

    Parameters
    ----------
    enabled : bool
        True to use the compiled kernels, False for the plain operations (the default).

    Returns
    -------
    bool
        The previous setting, so that ``previous = use_compiled_kernels(); ...;
        use_compiled_kernels(previous)`` restores it.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"use_compiled_kernels: enabled must be a bool, got {enabled!r}")
    previous = _Compiled.enabled
    _Compiled.enabled = enabled
    return previous


class _BatchNormTrainingCompiled(torch.autograd.Function):
    """:class:`_BatchNormTraining` with the compiled kernels; saves the input, not the centred
    input (the backward kernel recomputes ``x - mean`` while it reads ``x``)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
    ) -> Tensor:
        output, mean, var, invstd, scale = _Compiled.run(
            0, _training_forward_math, input, weight, bias, eps
        )
        count = input.numel() // input.shape[1]
        _update_running_statistics(running_mean, running_var, mean, var, count, momentum)
        output = _in_layout_of(output, input)
        ctx.save_for_backward(input, mean, invstd, scale)
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        input, mean, invstd, scale = ctx.saved_tensors
        grad_input, grad_weight, grad_bias = _Compiled.run(
            1, _training_backward_math, grad_output, input, mean, invstd, scale
        )
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        if need_input:
            grad_input = _in_layout_of(grad_input, input)
        return (
            grad_input if need_input else None,
            grad_weight.to(ctx.weight_dtype) if need_weight else None,
            grad_bias.to(ctx.bias_dtype) if need_bias else None,
            None,
            None,
            None,
            None,
        )


# ---------------------------------------------------------------------------------------------
# Evaluation: running statistics, an affine map per channel
# ---------------------------------------------------------------------------------------------


class _BatchNormEvaluation(torch.autograd.Function):
    """Batch norm with fixed statistics: ``y = (x - running_mean) * scale + bias`` per channel.

    ``scale = weight / sqrt(running_var + eps)``; centring first keeps the map accurate for
    inputs with a large mean.
    Backward: ``dx = g * scale``, ``dweight = sum(g * (x - running_mean)) / sqrt(running_var +
    eps)``, ``dbias = sum(g)``. The running statistics get no gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        eps: float,
    ) -> Tensor:
        dtype = _compute_dtype(input)
        shape = _channel_view_shape(input)
        mean = running_mean.to(dtype)
        invstd = running_var.to(dtype).add(eps).rsqrt_()
        scale = invstd if weight is None else invstd * weight.to(dtype)
        # centre first, (x - mean) * scale + bias, rather than x * scale + (bias - mean * scale):
        # the same two passes, without cancellation when the mean is large
        output = torch.sub(input.to(dtype), mean.view(shape))
        if bias is None:
            output.mul_(scale.view(shape))
        else:
            torch.addcmul(bias.to(dtype).view(shape), output, scale.view(shape), out=output)

        ctx.save_for_backward(input if ctx.needs_input_grad[1] else None, mean, invstd, scale)
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _in_layout_of(output.to(input.dtype), input)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        input, mean, invstd, scale = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        shape = _channel_view_shape(grad_output)
        dims = _reduction_dims(grad_output)
        grad = grad_output.to(scale.dtype)

        grad_input = grad_weight = grad_bias = None
        if need_input:
            grad_input = torch.mul(grad, scale.view(shape)).to(grad_output.dtype)
            grad_input = _in_layout_of(grad_input, grad_output)
        if need_weight:
            centred = torch.sub(input.to(scale.dtype), mean.view(shape))
            grad_weight = (centred.mul_(grad).sum(dims) * invstd).to(ctx.weight_dtype)
        if need_bias:
            grad_bias = grad.sum(dims).to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None


# ---------------------------------------------------------------------------------------------
# The functional interface
# ---------------------------------------------------------------------------------------------


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
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
        bfloat16 input is computed in float32 and returned in its own dtype.
    running_mean, running_var : Tensor of shape (C,) or None
        Running statistics; both or neither. Required when ``training=False``. Same dtype as
        ``input``, or float32 when ``input`` is float16/bfloat16.
    weight, bias : Tensor of shape (C,), optional
        Affine parameters gamma and beta (taken as 1 and 0 when None). Same dtype rule.
    training : bool
        Use (and track) batch statistics rather than the running ones.
    momentum : float
        Weight of the new batch in the running averages. ``None`` is refused, as by PyTorch;
        :class:`BatchNorm1d` and friends implement ``momentum=None`` (a cumulative average) by
        passing ``1 / num_batches_tracked``.
    eps : float
        Added to the variance before the square root; must be > 0 in training, >= 0 otherwise.

    Returns
    -------
    Tensor, shape (N, C, *)
        Same shape, dtype and memory layout (e.g. channels-last) as ``input``.

    Raises
    ------
    TypeError
        ``input`` is not a floating-point tensor, a parameter has the wrong dtype or
        ``momentum`` is not a number.
    ValueError
        A wrong shape, rank or device; only one value per channel in training; a bad ``eps``;
        only one of the running statistics given; no running statistics in evaluation.

    Notes
    -----
    The gradient is the hand-derived closed form (see the module docstring), computed by a
    custom :class:`torch.autograd.Function`. Double backward (gradients of gradients) is **not**
    supported: differentiating the backward raises ``RuntimeError`` ("trying to differentiate
    twice a function that was marked with @once_differentiable").

    Float32 statistics are accumulated in float32 (PyTorch's CPU kernel uses float64); the
    results agree to about 1e-6 relative for ordinary activations.
    """
    _check_input(input)
    if training:
        values_per_channel = input.shape[0] * math.prod(input.shape[2:])
        if values_per_channel == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{input.size()}"
            )
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if momentum is None or isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(
            f"batch_norm: momentum must be a float, got {momentum!r}; for a cumulative moving "
            "average pass 1 / num_batches_tracked, as the BatchNorm modules do for momentum=None"
        )
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if not training and running_mean is None:
        raise ValueError(
            "batch_norm: running_mean and running_var must be given in evaluation mode "
            "(training=False); pass training=True to normalise with batch statistics"
        )
    for name, tensor in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        if tensor is not None:
            _check_per_channel(name, tensor, input)

    if input.numel() == 0:  # like PyTorch: an empty output still connected to the graph
        output = input.clone()
        if weight is not None and weight.numel():
            output = output * weight[0]
        if bias is not None and bias.numel():
            output = output + bias[0]
        return output
    if training:
        function = _BatchNormTrainingCompiled if _Compiled.enabled else _BatchNormTraining
        return function.apply(
            input, weight, bias, running_mean, running_var, float(momentum), float(eps)
        )
    return _BatchNormEvaluation.apply(input, weight, bias, running_mean, running_var, float(eps))


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class _BatchNorm(nn.Module):
    """Shared logic of :class:`BatchNorm1d`, :class:`BatchNorm2d` and :class:`BatchNorm3d`.

    Mirrors ``torch.nn.modules.batchnorm._NormBase`` and ``_BatchNorm``: the same constructor,
    parameters (``weight``, ``bias``), buffers (``running_mean``, ``running_var``,
    ``num_batches_tracked``), ``state_dict`` layout and version, and forward logic. The
    subclasses only check the rank of the input.

    Parameters
    ----------
    num_features : int
        Number of channels ``C``.
    eps : float
        Added to the variance for numerical stability.
    momentum : float or None
        Weight of a new batch in the running statistics; ``None`` gives the cumulative average
        of all batches seen (momentum ``1 / num_batches_tracked``).
    affine : bool
        Learn a per-channel scale ``weight`` (gamma, initialised to 1) and shift ``bias`` (beta,
        initialised to 0).
    track_running_stats : bool
        Keep running statistics and use them in evaluation mode. When False the buffers are None
        and batch statistics are used in both modes.
    device, dtype
        Where and in which dtype to create the parameters and buffers.
    bias : bool, keyword-only
        With ``affine=True``, whether to learn the shift ``bias`` (PyTorch >= 2.10 has it too).
    """

    _version = 2
    __constants__ = ["track_running_stats", "momentum", "eps", "num_features", "affine"]
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool

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
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory_kwargs))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory_kwargs))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory_kwargs))
            self.register_buffer("running_var", torch.ones(num_features, **factory_kwargs))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Set ``running_mean`` to 0, ``running_var`` to 1 and ``num_batches_tracked`` to 0."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics, ``weight`` to 1 and ``bias`` to 0."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # state dicts saved before version 2 have no num_batches_tracked: default it to 0
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats:
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                tracked = self.num_batches_tracked
                state_dict[key] = (
                    tracked
                    if tracked is not None and tracked.device != torch.device("meta")
                    else torch.tensor(0, dtype=torch.long)
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _check_channels(self, input: Tensor) -> None:
        """The input's channel count must be ``num_features`` (when the module has per-channel
        tensors; without them, like PyTorch, any channel count is accepted)."""
        has_per_channel = self.weight is not None or self.running_mean is not None
        if has_per_channel and isinstance(input, Tensor) and input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}: expected input with {self.num_features} channels "
                f"(num_features) on dimension 1, got input of shape {tuple(input.shape)}"
            )

    def forward(self, input: Tensor) -> Tensor:
        """Normalise ``input`` of shape (N, C, *) per channel; returns the same shape."""
        self._check_input_dim(input)
        self._check_channels(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        # batch statistics in training, and in evaluation when there are no running statistics
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # the buffers are passed only when they are updated (training and tracking) or used (eval)
        pass_buffers = not self.training or self.track_running_stats
        return batch_norm(
            input,
            self.running_mean if pass_buffers else None,
            self.running_var if pass_buffers else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
        )


class BatchNorm1d(_BatchNorm):
    """Batch norm over a 2-D input (N, C) or 3-D input (N, C, L); see :class:`_BatchNorm`.

    A drop-in replacement of :class:`torch.nn.BatchNorm1d` (same arguments, state dict, repr).

    Shape: input (N, C) or (N, C, L); output the same.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchNorm2d(_BatchNorm):
    """Batch norm over a 4-D input (N, C, H, W); see :class:`_BatchNorm`.

    A drop-in replacement of :class:`torch.nn.BatchNorm2d` (same arguments, state dict, repr).

    Shape: input (N, C, H, W); output the same.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchNorm3d(_BatchNorm):
    """Batch norm over a 5-D input (N, C, D, H, W); see :class:`_BatchNorm`.

    A drop-in replacement of :class:`torch.nn.BatchNorm3d` (same arguments, state dict, repr).

    Shape: input (N, C, D, H, W); output the same.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


# ---------------------------------------------------------------------------------------------
# Folding a batch norm into the layer before it
# ---------------------------------------------------------------------------------------------

_FOLDABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def fold_batch_norm(
    layer: nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d, bn: nn.Module
) -> nn.Module:
    """Merge an evaluation-mode batch norm into the linear or convolution layer before it.

    In evaluation mode batch norm is the per-channel affine map ``y = z * s + t`` with
    ``s = gamma / sqrt(running_var + eps)`` and ``t = beta - running_mean * s``. Applied after
    ``z = W x + b`` it gives ``(s * W) x + (s * b + t)``: the same layer type with every output
    channel's weights scaled by ``s`` and a new bias ``s * b + t``.

    Parameters
    ----------
    layer : nn.Linear, nn.Conv1d, nn.Conv2d or nn.Conv3d
        Weight of shape (C_out, ...), bias (C_out,) or None. Any stride, padding, dilation,
        groups or padding mode. For ``nn.Linear`` the identity holds for 2-D input (N, features),
        where the batch-norm channel is the output feature.
    bn : BatchNorm1d/2d/3d from this module or from ``torch.nn``
        With ``num_features == C_out`` and running statistics (``track_running_stats=True``);
        ``affine=False`` is fine. Its mode does not matter: the running statistics are used.

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
    if not isinstance(layer, _FOLDABLE_LAYERS):
        raise TypeError(
            "fold_batch_norm: layer must be nn.Linear, nn.Conv1d, nn.Conv2d or nn.Conv3d, got "
            f"{type(layer).__name__}"
        )
    if not isinstance(bn, (_BatchNorm, nn.modules.batchnorm._BatchNorm)):
        raise TypeError(
            "fold_batch_norm: bn must be a BatchNorm1d/2d/3d module (bncourse.torch_bn or "
            f"torch.nn), got {type(bn).__name__}"
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            "fold_batch_norm: bn has no running statistics (it was built with "
            "track_running_stats=False and normalises with batch statistics even in evaluation), "
            "so it is not a fixed affine map and cannot be folded"
        )
    out_channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if bn.running_mean.numel() != out_channels:
        raise ValueError(
            f"fold_batch_norm: layer has {out_channels} output channels but bn has "
            f"{bn.running_mean.numel()} features (num_features={bn.num_features})"
        )

    weight = layer.weight.detach()
    device = weight.device
    # fold in float64 (float32 where the device has no float64) and round once at the end
    work = torch.float32 if device.type == "mps" else torch.float64

    def as_work(tensor: Tensor | None, default: float) -> Tensor:
        if tensor is None:
            return torch.full((out_channels,), default, dtype=work, device=device)
        return tensor.detach().to(device=device, dtype=work)

    scale = as_work(bn.weight, 1.0) / torch.sqrt(as_work(bn.running_var, 1.0) + bn.eps)
    shift = as_work(bn.bias, 0.0) - as_work(bn.running_mean, 0.0) * scale
    layer_bias = as_work(layer.bias, 0.0)
    scale_shape = [-1] + [1] * (weight.dim() - 1)

    folded = copy.deepcopy(layer)
    bias_dtype = weight.dtype if layer.bias is None else layer.bias.dtype
    requires_grad = layer.weight.requires_grad
    folded.weight = nn.Parameter(
        (weight.to(work) * scale.view(scale_shape)).to(weight.dtype), requires_grad=requires_grad
    )
    folded.bias = nn.Parameter(
        (layer_bias * scale + shift).to(bias_dtype), requires_grad=requires_grad
    )
    return folded
