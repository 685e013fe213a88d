"""Speed-tuned training-mode kernels for :mod:`bncourse.torch_bn`, same names and signatures.

:func:`batch_norm_forward` and :func:`batch_norm_backward` compute what the reference kernels
of :mod:`bncourse.torch_bn` compute (``tests/test_fast_torch_bn.py`` checks them against each
other), with fewer passes over memory and fewer full-size tensors. Batch norm does a few
arithmetic operations per value, so its time is set by memory: every pass over a full-size
tensor costs about as much as a copy, and a *fresh* full-size tensor costs more (its pages
come from the operating system, a page fault each, when the allocator has given them back).
PyTorch's native kernel makes one new tensor each way (``y``, then ``dx``); so do these:

* **A pivot for the mean.** ``d = x - pivot`` (one sample of each channel) goes into the
  tensor that becomes the output. The pivot is close to the data, so ``mean(d)`` is small and
  ``var = mean(d**2) - mean(d)**2`` loses no digits even for a mean of ``1e4`` in float32;
  a constant channel gives ``d = 0`` exactly (output exactly ``beta``).
* **Sums of products without temporaries.** For NCHW input each (sample, channel) pair is a
  contiguous row, and ``sum(d * d)`` is taken from the row norms
  (``torch.linalg.vector_norm``), one read of ``d``; otherwise, and for ``g * (x - pivot)``
  in the backward pass, the products are accumulated slab by slab (about 512 KiB of whole
  samples) into a small buffer that stays in the CPU's cache, ``acc.addcmul_(slab, slab)``,
  instead of writing a full-size product and summing it.
* **Scale in place.** ``y = d * scale + (beta - mean(d) * scale)``: two in-place passes
  over ``d``, no new tensor.
* **The backward from the input.** :func:`batch_norm_backward_from_input` keeps no centred
  input between the passes: it writes ``x - mu`` into the tensor that becomes ``dx``, takes
  the sums from it, then turns it into ``dx = p * (x - mu) + q + scale * g`` in place. ``mu``
  rounded to float32 is off by up to half a unit in its last place (``5e-4`` for a mean of
  ``1e4``); the forward's pivot and ``mean(x - pivot)`` give that rounding exactly, and it
  is taken out of the sums and of ``q``. ``p`` is formed as
  ``inv_std * (inv_std * sum(g * (x - mu)))`` so that ``inv_std**2`` alone is never formed
  (it overflows float32 for a constant channel and a tiny ``eps``).

* **One pass when the mean is small.** On a CPU, when every channel's mean lies within
  ``ONE_PASS_MEAN`` (2) standard deviations of zero, ``sum(x)`` and ``sum(x * x)`` lose no
  digits that matter, so the modules' forward takes them from ``x`` and writes
  ``y = x * scale + (beta - mu * scale)`` in one pass, and their backward takes
  ``sum(g * (x - mu))`` as ``sum(g * x) - mu * sum(g)`` and ``dx`` from ``x`` directly; the
  pivot route above runs otherwise (a check of C values, and a host sync, which is why the
  route is CPU only).

* **One loop in C.** On a CPU, for contiguous NCHW input of at least 16 positions, the modules'
  forward and backward go one step further than any arrangement of PyTorch operations can: one
  loop per channel in C (``bn_forward`` and ``bn_backward`` of ``norm_rows.c``, built on first
  use by :mod:`bncourse.fast.native`), which takes a channel's sums and then writes its output
  (or ``dx``) while the channel's values are in the cache, the pivot route's formulas; its mean
  is kept in float64 (C values) for the backward. Without a C compiler, or after
  ``native.use_native(False)``, the routes above run.

The modules use :func:`batch_norm_forward` with ``keep_centred=False`` and
:func:`batch_norm_backward_from_input`; with ``keep_centred=True`` (the default, the
reference kernels' contract) the forward also returns ``x - mu`` for
:func:`batch_norm_backward`. :func:`compiled_kernels` gives plain formulas fused by
:func:`torch.compile` (the ``"compiled"`` choice of :func:`bncourse.torch_bn.use_kernels`): the
pivot route's forward, two passes over ``x``, and the reference backward.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bncourse import torch_bn as reference
from bncourse.fast import native

__all__ = [
    "batch_norm_forward",
    "batch_norm_backward",
    "batch_norm_backward_from_input",
    "compiled_kernels",
    "compiled_backward_from_input",
]

SMALL_INPUT = 1 << 16  # the modules run the reference kernels on inputs of fewer values
# (measured at two threads: (2, 64, 8, 8) 0.30 ms reference, 0.43 ms fast; (32, 64, 32, 32)
# 11.0 ms reference, 4.6 ms fast)
ONE_PASS_MEAN = 2.0  # on a CPU, the sums of x itself when every |mean| <= 2 std (see above)
SLAB_BYTES = 1 << 20  # whole samples per slab: about 1 MiB, inside a core's L2 cache


def _channel_sum_of_products(a: Tensor, b: Tensor, dims: list[int]) -> Tensor:
    """Per-channel ``sum(a * b)``, shape (1, C, 1, ...), for ``a``, ``b`` of shape (N, C, *); no
    full-size temporary when the tensors span several slabs."""
    n = a.shape[0]
    rows = max(1, SLAB_BYTES // max(1, a[0].numel() * a.element_size()))
    if rows * 2 > n:  # one or two slabs: a plain product and sum
        return (a * b).sum(dims, keepdim=True)
    accumulator = a[:rows] * b[:rows]
    whole = n - n % rows
    for start in range(rows, whole, rows):
        accumulator.addcmul_(a[start : start + rows], b[start : start + rows])
    total = accumulator.sum(dims, keepdim=True)
    if whole < n:
        total.add_((a[whole:] * b[whole:]).sum(dims, keepdim=True))
    return total


def _rows(t: Tensor) -> Tensor | None:
    """``t`` (N, C, *) as (N * C, positions) rows when each (sample, channel) pair is a contiguous
    row of at least 16 values (NCHW layout), else None."""
    n, channels = t.shape[0], t.shape[1]
    row = t.numel() // max(1, n * channels)
    if t.dim() > 2 and row >= 16 and t.is_contiguous():
        return t.view(n * channels, row)
    return None


def _channel_sums(t: Tensor, dims: list[int]) -> Tensor:
    """Per-channel ``sum(t)``, shape (1, C, 1, ...), of ``t`` (N, C, *); by rows for NCHW."""
    rows = _rows(t)
    if rows is None:
        return t.sum(dims, keepdim=True)
    return reference._per_channel(rows.sum(1).view(t.shape[0], -1).sum(0), t)


def _sum_and_sum_of_squares(d: Tensor, dims: list[int]) -> Tensor:
    """Per-channel ``sum(d)`` and ``sum(d * d)`` of ``d`` (N, C, *), stacked: (2, 1, C, 1, ...).

    When every (sample, channel) pair is a contiguous row (NCHW layout), both are row
    reductions over contiguous memory, the squares through the row norms, a single read
    of ``d`` each; otherwise a plain sum and the slab-by-slab sum of squares."""
    rows = _rows(d)
    if rows is None:
        return torch.stack([d.sum(dims, keepdim=True), _channel_sum_of_products(d, d, dims)])
    per_row = d.new_empty(2, rows.shape[0])
    torch.sum(rows, 1, out=per_row[0])
    torch.linalg.vector_norm(rows, dim=1, out=per_row[1])
    per_row[1].square_()
    return per_row.view(2, d.shape[0], -1).sum(1).view([2, 1, d.shape[1]] + [1] * (d.dim() - 2))


def _mean_and_variance(d: Tensor, dims: list[int]) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance (1, C, 1, ...) of ``d`` (N, C, *), from its sums:
    ``mean(d * d) - mean(d)**2``, accurate when the mean is not large against the spread."""
    mean, mean_of_squares = _sum_and_sum_of_squares(d, dims).div_(d.numel() // d.shape[1])
    return mean, torch.addcmul(mean_of_squares, mean, mean, value=-1.0).clamp_(min=0.0)


def _one_pass(mu: Tensor, var: Tensor) -> bool:
    """Whether every channel's mean lies within ``ONE_PASS_MEAN`` standard deviations of zero
    (``mu``, ``var`` of any shape): ``var - mu**2 / ONE_PASS_MEAN**2 >= 0``."""
    return bool(torch.addcmul(var, mu, mu, value=-1.0 / ONE_PASS_MEAN**2).min() >= 0.0)


def _along_rows(a: Tensor, b: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel values ``a``, ``b`` (1, C, 1, ...) shaped to broadcast against ``x`` (N, C, *)
    so that an elementwise operation with both runs on contiguous rows. For NCHW input each
    channel's value is repeated over one sample's positions, (1, C, *spatial), as an elementwise
    kernel runs on contiguous rows when at most one operand is broadcast along them. Otherwise
    (channels-last, or (N, C) input) they are already constant along the contiguous dimension."""
    if x.dim() > 2 and x.shape[0] > 1 and x.is_contiguous():
        both = torch.stack([a, b]).expand((2, 1) + tuple(x.shape[1:])).contiguous()
        return both[0], both[1]
    return a, b


def _scale_and_offset(
    centre: Tensor, var: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float, x: Tensor
) -> tuple[Tensor, Tensor]:
    """``scale = gamma / sqrt(var + eps)`` and ``offset = beta - centre * scale`` (1, C, 1, ...):
    the output is ``(x - centre) * scale + offset``, an affine map of ``x - centre``."""
    scale = (var + eps).rsqrt_()
    if gamma is not None:
        scale = scale.mul_(reference._per_channel(gamma, x))
    if beta is None:
        return scale, torch.mul(centre, scale).neg_()
    return scale, torch.addcmul(reference._per_channel(beta, x), centre, scale, value=-1.0)


def _c_layout(x: Tensor) -> tuple[int, int, int] | None:
    """``(N, C, L)`` when the C kernels take ``x``: on a CPU, float32 or float64, with the rows
    of :func:`_rows` (contiguous NCHW, at least 16 positions); else None."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return None
    rows = _rows(x)
    return None if rows is None else (x.shape[0], x.shape[1], rows.shape[1])


def _pivot(x: Tensor) -> Tensor:
    """One sample of each channel of ``x`` (N, C, *): its first value, shape (1, C, 1, ...)."""
    return x[(slice(0, 1), slice(None)) + (slice(0, 1),) * (x.dim() - 2)]


def _c_forward(
    lib: Any,
    layout: tuple[int, int, int],
    x: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    eps: float,
):
    """The C kernel's forward on ``x`` of :func:`_c_layout` ``layout``: ``(y, mu, var, mean)``,
    ``mean`` (C,) in float64."""
    n, channels, positions = layout
    y = torch.empty_like(x)
    mean = torch.empty(channels, dtype=torch.float64)
    var = torch.empty(channels, dtype=torch.float64)
    gamma, beta = (None if p is None else p.contiguous() for p in (gamma, beta))
    threads = native.threads(channels)
    native.call(
        lib, "bn_forward", x, gamma, beta, y, mean, var, n, channels, positions, eps, threads
    )
    # (mu a copy even in float64: the Function marks the last output, mean, non-differentiable)
    return y, mean.to(x.dtype, copy=True), var.to(x.dtype), mean


def _c_backward(
    lib: Any,
    layout: tuple[int, int, int],
    g: Tensor,
    x: Tensor,
    mean: Tensor,
    gamma: Tensor | None,
    var: Tensor,
    eps: float,
):
    """The C kernel's backward from the input and the batch mean: ``(dx, dgamma, dbeta)``."""
    n, channels, positions = layout
    mean = mean.to(torch.float64).contiguous()
    rstd = (var.to(torch.float64) + eps).rsqrt_()
    gamma = None if gamma is None else gamma.contiguous()
    dx = torch.empty_like(x)
    dgamma, dbeta = x.new_empty(channels), x.new_empty(channels)
    native.call(
        lib,
        "bn_backward",
        g.contiguous(),
        x,
        mean,
        rstd,
        gamma,
        dx,
        dgamma,
        dbeta,
        n,
        channels,
        positions,
        native.threads(channels),
    )
    return dx, dgamma, dbeta


def batch_norm_forward(
    x: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float, keep_centred: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training-mode batch norm; see :func:`bncourse.torch_bn.batch_norm_forward`.

    Returns ``(y, mu, var, x_mu)``: output (N, C, *), batch mean and biased variance (C,), and
    the centred input (N, C, *), the same values as the reference kernel up to rounding. With
    ``keep_centred=False`` the centred input is not formed (one full-size tensor fewer) and the
    fourth output is instead ``centring`` for :func:`batch_norm_backward_from_input`: on a CPU,
    when every channel's mean is within ``ONE_PASS_MEAN`` standard deviations of zero, the
    mean itself (C,) (the one-pass route: statistics and output straight from ``x``); else
    (2C,) each channel's pivot, then ``mean(x - pivot)`` (their sum is ``mu``, more exactly than
    ``mu`` in the input's dtype).
    """
    dims = reference._reduction_dims(x)
    layout = None if keep_centred else _c_layout(x)
    if layout is not None and (lib := native.library()) is not None:
        return _c_forward(lib, layout, x, gamma, beta, eps)
    if not keep_centred and x.device.type == "cpu":
        mu, var = _mean_and_variance(x, dims)
        if _one_pass(mu, var):  # y = x * scale + (beta - mu * scale): one pass, one new tensor
            scale, offset = _scale_and_offset(mu, var, gamma, beta, eps, x)
            offset_rows, scale_rows = _along_rows(offset, scale, x)
            y = torch.addcmul(offset_rows, x, scale_rows)
            return y, mu.flatten().clone(), var.view(-1), mu.view(-1)
    # one sample per channel, a small contiguous copy (broadcasting a strided view is slow)
    pivot = _pivot(x).contiguous()
    d = torch.sub(x, pivot)  # x - pivot, in x's memory layout; becomes y (or x - mu)
    shift, var = _mean_and_variance(d, dims)  # mean(d) = mu - pivot, small
    mu = (pivot + shift).view(-1)
    scale, offset = _scale_and_offset(shift, var, gamma, beta, eps, x)
    if keep_centred:
        x_mu = d.sub_(shift)  # now x - mu, exactly centred
        y = torch.mul(x_mu, scale)
        if beta is not None:
            y.add_(reference._per_channel(beta, x))
        return y, mu, var.view(-1), x_mu
    offset_rows, scale_rows = _along_rows(offset, scale, x)
    y = torch.addcmul(offset_rows, d, scale_rows, out=d)  # d * scale + beta - shift * scale
    return y, mu, var.view(-1), torch.cat([pivot.view(-1), shift.view(-1)])


def batch_norm_backward(
    g: Tensor, x_mu: Tensor, gamma: Tensor | None, var: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form gradients; see :func:`bncourse.torch_bn.batch_norm_backward`.

    Returns ``(dx, dgamma, dbeta)``, shapes (N, C, *), (C,), (C,). Not differentiable itself
    (in-place operations): :class:`bncourse.torch_bn` uses the reference backward when a graph of
    the backward is recorded.
    """
    dims = reference._reduction_dims(g)
    sum_g = g.sum(dims, keepdim=True)
    sum_g_x_mu = _channel_sum_of_products(g, x_mu, dims)
    p, q, scale, inv_std = _backward_coefficients(g, gamma, var, eps, sum_g, sum_g_x_mu)
    dx = torch.mul(x_mu, p).add_(q).addcmul_(g, scale)
    return dx, (inv_std * sum_g_x_mu).view(-1), sum_g.view(-1)


def batch_norm_backward_from_input(
    g: Tensor, x: Tensor, centring: Tensor, gamma: Tensor | None, var: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`batch_norm_backward` from the input ``x`` (N, C, *) and the ``centring`` that
    :func:`batch_norm_forward` returned with ``keep_centred=False``.

    With the mean (C,) (the one-pass route), ``sum(g * (x - mu))`` is ``sum(g * x) - mu *
    sum(g)`` and ``dx = p * x + (q - p * mu) + scale * g``, straight from ``x``. With a pivot and
    shift (2C,), ``x - mu`` (``mu`` rounded to the input's dtype) is formed in the tensor that
    becomes ``dx`` and the rounding is taken out per channel, so that ``dx`` sums to zero over
    each channel up to rounding, however large the mean.

    Returns ``(dx, dgamma, dbeta)``, shapes (N, C, *), (C,), (C,).
    """
    dims = reference._reduction_dims(g)
    channels = x.shape[1]
    layout = _c_layout(x) if centring.numel() == channels else None
    if layout is not None and (lib := native.built()) is not None:
        return _c_backward(lib, layout, g, x, centring, gamma, var, eps)  # (mean, any dtype)
    # dx = p * (source - centre) + q + scale * g, where source - centre = x - mu
    if centring.numel() == channels:  # one pass: from x, centre mu
        source, centre, out = x, reference._per_channel(centring, x), None
    else:
        pivot = reference._per_channel(centring[:channels], x)
        shift = reference._per_channel(centring[channels:], x)  # mu = pivot + shift
        mu = pivot + shift  # rounded to x's dtype, as the forward's mu
        source = out = torch.sub(x, mu)  # becomes dx: x - mu = source - centre
        centre = (pivot - mu) + shift  # what the rounding left out (pivot - mu is exact): tiny
    sum_g = _channel_sums(g, dims)
    sum_g_source = _channel_sum_of_products(g, source, dims)
    sum_g_x_mu = torch.addcmul(sum_g_source, centre, sum_g, value=-1.0)
    p, q, scale, inv_std = _backward_coefficients(g, gamma, var, eps, sum_g, sum_g_x_mu)
    q_rows, p_rows = _along_rows(torch.addcmul(q, p, centre, value=-1.0), p, x)
    dx = torch.addcmul(q_rows, source, p_rows, out=out)
    dx.addcmul_(g, scale)
    return dx, (inv_std * sum_g_x_mu).view(-1), sum_g.view(-1)


def _backward_coefficients(
    g: Tensor, gamma: Tensor | None, var: Tensor, eps: float, sum_g: Tensor, sum_g_x_mu: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-channel ``(p, q, scale, inv_std)`` of ``dx = p * (x - mu) + q + scale * g``, the
    closed form ``scale * (g - mean(g) - x_hat * mean(g * x_hat))`` regrouped."""
    m = g.numel() // g.shape[1]
    inv_std = reference._per_channel(torch.rsqrt(var + eps), g)
    scale = inv_std if gamma is None else reference._per_channel(gamma, g) * inv_std
    p = (scale * (inv_std * (inv_std * sum_g_x_mu))).mul_(-1.0 / m)
    q = (scale * sum_g).mul_(-1.0 / m)
    return p, q, scale, inv_std


_compiled: dict[str, Callable[..., Any]] = {}  # a cache of the compiled kernels, made on first use


def _compile_or_fall_back(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    compiled = torch.compile(function, dynamic=None)

    def run(*args: Any) -> Any:
        try:
            return compiled(*args)
        except Exception as error:  # e.g. no C++ compiler: BackendCompilerFailed
            warnings.warn(
                "bncourse.fast.torch_bn: compiling the batch-norm kernels failed, using the "
                f"same operations uncompiled ({type(error).__name__}: {str(error)[:200]})",
                RuntimeWarning,
                stacklevel=2,
            )
            _compiled[name] = function
            return function(*args)

    return run


def _forward_keeping_no_centred_input(
    x: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The forward for :func:`torch.compile`: the pivot route in plain operations, so that the
    compiler reads ``x`` twice (one fused pass for ``sum(d)`` and ``sum(d * d)``, one for
    ``y``) where the reference's exact two-step centring reads it four times."""
    dims = reference._reduction_dims(x)
    pivot = _pivot(x)
    d = x - pivot
    shift = d.mean(dims, keepdim=True)  # mu - pivot, small
    var = ((d * d).mean(dims, keepdim=True) - shift * shift).clamp(min=0.0)
    scale, offset = _scale_and_offset(shift, var, gamma, beta, eps, x)
    return d * scale + offset, (pivot + shift).view(-1), var.view(-1)


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
    """Kernels fused by :func:`torch.compile` (made on first use; each new kind of
    input compiles again, a second shape makes shapes dynamic). If compiling fails, a
    ``RuntimeWarning`` says so and the same formulas run uncompiled.

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
