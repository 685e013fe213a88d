"""Speed-tuned training-mode kernels for :mod:`bncourse.torch_bn`, same names and signatures.

:func:`batch_norm_forward` and :func:`batch_norm_backward` compute what the reference kernels
of :mod:`bncourse.torch_bn` compute (``tests/test_fast_torch_bn.py`` checks them against each
other), in fewer passes over memory and fewer allocations:

* forward: subtract one sample of each channel (a *pivot*) first, so the mean of what remains is
  small and one in-place subtraction of it centres the data exactly, even for a large mean (the
  reference centres twice instead); the squares go into the buffer that then receives the
  output (``torch.mul(..., out=)``), so the step allocates two full-size tensors, not five.
* backward: ``dx = scale * (g - mean(g) - x_hat * mean(g * x_hat))`` regrouped as
  ``scale * g + p * (x - mu) + q`` with per-channel ``p`` and ``q``, two ``addcmul`` passes into
  the buffer that held ``g * (x - mu)``: three full-size passes after the two sums. ``p`` is
  formed as ``inv_std * (inv_std * sum(g * (x - mu)))`` so that ``inv_std**2`` alone is never
  formed (it overflows float32 for a constant channel and a tiny ``eps``).

:func:`compiled_kernels` gives the reference formulas fused by :func:`torch.compile` (the
``"compiled"`` choice of :func:`bncourse.torch_bn.use_kernels`): a few loops over memory, like
PyTorch's native kernel; its forward keeps no centred input, its backward recomputes it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bncourse import torch_bn as reference

__all__ = [
    "batch_norm_forward",
    "batch_norm_backward",
    "compiled_kernels",
    "compiled_backward_from_input",
]


def batch_norm_forward(
    x: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training-mode batch norm; see :func:`bncourse.torch_bn.batch_norm_forward`.

    Returns ``(y, mu, var, x_mu)``: output (N, C, *), batch mean and biased variance (C,), and the
    centred input (N, C, *), the same values as the reference kernel up to rounding.
    """
    dims = reference._reduction_dims(x)
    m = x.numel() // x.shape[1]
    # one sample per channel, a small contiguous copy (broadcasting a strided view is slow)
    pivot = x[(slice(0, 1), slice(None)) + (slice(0, 1),) * (x.dim() - 2)].contiguous()
    x_mu = torch.sub(x, pivot)  # x - pivot, in x's memory layout
    shift = x_mu.sum(dims, keepdim=True).div_(m)
    x_mu.sub_(shift)  # now x - mu, exactly centred
    y = torch.mul(x_mu, x_mu)  # scratch for the squares, then the output
    var = y.sum(dims, keepdim=True).div_(m)
    inv_std = (var + eps).rsqrt_()
    scale = inv_std if gamma is None else inv_std * reference._per_channel(gamma, x)
    torch.mul(x_mu, scale, out=y)
    if beta is not None:  # (addcmul with two broadcast operands is slower than the two)
        y.add_(reference._per_channel(beta, x))
    return y, (pivot + shift).view(-1), var.view(-1), x_mu


def batch_norm_backward(
    g: Tensor, x_mu: Tensor, gamma: Tensor | None, var: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form gradients; see :func:`bncourse.torch_bn.batch_norm_backward`.

    Returns ``(dx, dgamma, dbeta)``, shapes (N, C, *), (C,), (C,). Not differentiable itself
    (in-place operations): :class:`bncourse.torch_bn` uses the reference backward when a graph of
    the backward is recorded.
    """
    dims = reference._reduction_dims(g)
    m = g.numel() // g.shape[1]
    inv_std = reference._per_channel(torch.rsqrt(var + eps), g)
    sum_g = g.sum(dims, keepdim=True)
    buffer = torch.mul(g, x_mu)
    sum_g_x_mu = buffer.sum(dims, keepdim=True)
    scale = inv_std if gamma is None else reference._per_channel(gamma, g) * inv_std
    p = (scale * (inv_std * (inv_std * sum_g_x_mu))).mul_(-1.0 / m)
    q = (scale * sum_g).mul_(-1.0 / m)
    torch.addcmul(q, g, scale, out=buffer)  # scale * g + q ...
    buffer.addcmul_(x_mu, p)  # ... + p * (x - mu)
    return buffer, (inv_std * sum_g_x_mu).view(-1), sum_g.view(-1)


_compiled: dict[str, Callable[..., Any]] = {}  # a cache of the compiled kernels, made on first use


def _compile_or_fall_back(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    compiled = torch.compile(function, dynamic=None)

    def run(*args: Any) -> Any:
        try:
            return compiled(*args)
        except Exception as error:  # e.g. no C++ compiler: BackendCompilerFailed
            warnings.warn(
                "bncourse.fast.torch_bn: compiling the batch-norm kernels failed, using the "
                f"reference operations instead ({type(error).__name__}: {str(error)[:200]})",
                RuntimeWarning,
                stacklevel=2,
            )
            _compiled[name] = function
            return function(*args)

    return run


def _forward_keeping_no_centred_input(
    x: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    y, mu, var, _ = reference.batch_norm_forward(x, gamma, beta, eps)
    return y, mu, var


def _backward_from_input(
    g: Tensor, x: Tensor, mu: Tensor, gamma: Tensor | None, var: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    return reference.batch_norm_backward(g, x - reference._per_channel(mu, x), gamma, var, eps)


def _kernel(name: str) -> Callable[..., Any]:
    if not _compiled:
        _compiled["forward"] = _compile_or_fall_back("forward", _forward_keeping_no_centred_input)
        _compiled["backward"] = _compile_or_fall_back("backward", _backward_from_input)
    return _compiled[name]


def compiled_kernels() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The reference kernels fused by :func:`torch.compile` (made on first use; each new kind of
    input compiles again, a second shape makes shapes dynamic). If compiling fails, a
    ``RuntimeWarning`` says so and the reference formulas run instead.

    The forward keeps no centred input: the ``x_mu`` it returns is an empty tensor, and the
    backward, :func:`compiled_backward_from_input`, recomputes ``x - mu`` from ``x`` while it
    reads it (one full-size tensor fewer written and read; as fast as PyTorch's native kernel on
    a CPU). Returns ``(forward, compiled_backward_from_input)``.
    """

    def forward(
        x: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        y, mu, var = _kernel("forward")(x, gamma, beta, eps)
        return y, mu, var, x.new_empty(0)

    return forward, compiled_backward_from_input


def compiled_backward_from_input(
    g: Tensor, x: Tensor, mu: Tensor, gamma: Tensor | None, var: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`bncourse.torch_bn.batch_norm_backward` of ``x - mu``, compiled: ``(dx, dgamma,
    dbeta)`` from the input ``x`` (N, C, *) and its batch mean ``mu`` (C,)."""
    return _kernel("backward")(g, x, mu, gamma, var, eps)
