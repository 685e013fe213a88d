"""Speed-tuned kernels for :mod:`bncourse.torch_norm`, same names and signatures.

:func:`normalize_forward` and :func:`normalize_backward` compute what the reference kernels of
:mod:`bncourse.torch_norm` compute (``tests/test_torch_norm.py`` checks them against each other)
for a contiguous input whose statistics run over its trailing dims (every layer of the family:
LayerNorm and RMSNorm on ``(*, D)``, GroupNorm on ``(N, G, C // G, *spatial)``, InstanceNorm on
``(N, C, *spatial)``). The input is seen as rows ``(R, S, L)``: one statistic per row, the scale
and shift constant along ``L`` (per column for LayerNorm, ``L = 1``; per channel for GroupNorm;
per row for InstanceNorm, ``S = 1``).

On a CPU the kernels are one fused loop per row, in C (``norm_rows.c``, built on first use by
:mod:`bncourse.fast.native`): the statistics of a row, then its output while it is still in the
cache; in the backward pass the row sums, then ``dx``. That is what ``torch.nn``'s own layers
do, and the only way to come near them: the fewest PyTorch operations that a LayerNorm can be
written with take 2 to 3 times ``torch.nn``'s time (``benchmarks/bench_norms_floor.py``).
Without a C compiler, on a GPU, or after ``native.use_native(False)``, the same formulas run as
PyTorch operations on chunks of rows, about 4 MiB per thread, which stay in the last-level
cache between the operations on them, so that each full-size array is read from memory or
written to it once:

* forward: per chunk, ``x - pivot`` (one sample of each row: a constant row gives exactly 0, and
  a large mean cancels exactly) goes into the output's memory, its mean is subtracted, its squares
  are summed in a small scratch buffer, and it is scaled and shifted in place. Reads ``x`` once,
  writes ``y`` once; saves the input and three numbers per row, no centred copy.
* backward: per chunk, ``x - mean`` is recomputed into the memory of ``dx``, the row sums of
  ``g`` and ``g * (x - mean)`` and the sums of ``dweight`` and ``dbias`` are taken from the
  cache, then ``dx = inv_std * (weight * dy + p * (x - mean) + q)`` with per-row ``p`` and
  ``q``, in place. Reads ``x`` and ``dy`` once, writes ``dx`` once.

Any other input (non-contiguous, half precision, statistics over dims that are not trailing) is
computed by the reference kernels, as is a backward that is itself differentiated.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bncourse.fast import native

__all__ = ["normalize_forward", "normalize_backward", "supports"]

CHUNK_BYTES = 4 << 20  # per thread: each operation on a chunk is a parallel region with a fixed
# cost, so fewer, larger chunks win while they stay in the cache (measured at two threads,
# GroupNorm(32, 64) on (32, 64, 32, 32): 5.6 ms with 512 KiB, 4.2 ms with 4 MiB, 4.1 ms whole)


def _first_trailing(shape: torch.Size, dims: tuple[int, ...]) -> int:
    """k with ``dims == (k, ..., ndim - 1)``, or -1 when the dims are not the trailing ones."""
    k = len(shape) - len(dims)
    return k if dims == tuple(range(k, len(shape))) else -1


def _param_layout(x: Tensor, k: int, param: Tensor | None) -> tuple[int, bool] | None:
    """``(m, per_column)`` for a scale or shift broadcast to ``x``: it varies along the dims
    ``k .. m - 1`` (``m = k``: it is constant along each row); ``per_column``: it is the same for
    every row. None when it is not of a shape the kernels handle."""
    if param is None:
        return len(x.shape), True
    if param.dim() > x.dim():
        return None
    shape = (1,) * (x.dim() - param.dim()) + tuple(param.shape)
    varying = [i for i, n in enumerate(shape) if n != 1]
    if any(shape[i] != x.shape[i] for i in varying):
        return None
    inner = [i for i in varying if i >= k]
    m = inner[-1] + 1 if inner else k
    if any(shape[i] == 1 and x.shape[i] != 1 for i in range(k, m)):
        return None  # constant along a dim inside the varying block: not handled
    return m, all(i >= k for i in varying)


def supports(x: Tensor, weight: Tensor | None, bias: Tensor | None, dims: tuple[int, ...]) -> bool:
    """Whether :func:`normalize_forward` handles these arguments (else use the reference)."""
    if x.dtype not in (torch.float32, torch.float64) or not x.is_contiguous() or x.numel() == 0:
        return False
    k = _first_trailing(x.shape, dims)
    if k < 1:
        return False
    layouts = [_param_layout(x, k, p) for p in (weight, bias)]
    if any(lay is None for lay in layouts):
        return False
    if weight is not None and bias is not None and layouts[0] != layouts[1]:
        return False
    for p in (weight, bias):
        if p is not None and (p.dtype != x.dtype or p.device != x.device):
            return False
    return True


def _rows(x: Tensor, dims: tuple[int, ...], weight: Tensor | None, bias: Tensor | None):
    """``(R, S, L, per_column)`` of the row view and the scale and shift as (1 or R, S, 1)."""
    k = _first_trailing(x.shape, dims)
    params = weight if weight is not None else bias
    m, per_column = _param_layout(x, k, params)
    if params is None:  # one statistic per row and nothing per column: rows (R, 1, D)
        m, per_column = k, False
    r = math.prod(x.shape[:k])
    s = math.prod(x.shape[k:m])
    ell = math.prod(x.shape[m:])
    per_column = per_column and ell == 1  # (else a scale per (row, s), expanded over the rows)

    def view(p: Tensor | None) -> Tensor | None:
        if p is None:
            return None
        full = (1,) * (x.dim() - p.dim()) + tuple(p.shape)
        if per_column:
            return p.reshape(_row_shape(1, s, 1, ell))
        return p.reshape(full).expand(*x.shape[:m], *full[m:]).reshape(_row_shape(r, s, 1, ell))

    return r, s, ell, per_column, view(weight), view(bias)


def _row_shape(r: int, s: int, ell: int, like: int | None = None) -> tuple[int, ...]:
    """(r, s, ell), or (r, s) when the rows have no L dim (``like`` when given decides): an
    inner dim of size 1 makes PyTorch's elementwise kernels very slow."""
    return (r, s, ell) if (ell if like is None else like) > 1 else (r, s)


def _chunk_rows(row_elements: int, element_size: int) -> int:
    """Rows per chunk: ``CHUNK_BYTES`` per thread (with more threads, fewer and larger chunks:
    each operation on a chunk is a parallel region that every thread waits for)."""
    per_chunk = CHUNK_BYTES * max(1, torch.get_num_threads())
    return max(1, per_chunk // (row_elements * element_size))


def _native_forward(lib, input, w, b, r, s, ell, per_column, eps, center):
    """The C kernel's forward: ``(y, (input, mean, rstd))``, mean and rstd in float64 (R,)."""
    y = torch.empty_like(input)
    mean = torch.empty(r, dtype=torch.float64)
    rstd = torch.empty(r, dtype=torch.float64)
    w, b = (None if p is None else p.contiguous() for p in (w, b))
    stride = 0 if per_column else s
    native.call(
        lib,
        "norm_forward",
        input,
        w,
        b,
        y,
        mean,
        rstd,
        r,
        s,
        ell,
        stride,
        int(center),
        eps,
        native.threads(r),
    )
    return y, (input, mean, rstd)


def _native_backward(lib, dy, saved, weight, bias_shape, dims, center, needs):
    """The C kernel's backward from ``(input, mean, rstd)``: ``(dx, dweight, dbias)``."""
    input, mean, rstd = saved
    bias = None if bias_shape is None else input.new_empty(bias_shape)
    r, s, ell, per_column, w, _ = _rows(input, dims, weight, bias)
    w = None if w is None else w.contiguous()
    need_dw, need_db = needs[1] and weight is not None, needs[2] and bias_shape is not None
    dx = torch.empty_like(input) if needs[0] else None
    threads = native.threads(r)
    acc = blocks = dw_rows = db_rows = None
    if ell == 1 and (need_dw or need_db):  # per column: summed over the rows, per thread
        acc = torch.zeros(threads, 2, s, dtype=torch.float64)
        blocks = input.new_zeros(threads, 2, s)  # (float sums of up to 32 rows, per thread)
    elif ell > 1:  # per (row, s), summed over the rows by _to_param_shape
        dw_rows = input.new_empty(r, s) if need_dw else None
        db_rows = input.new_empty(r, s) if need_db else None
    stride = 0 if per_column else s
    native.call(
        lib,
        "norm_backward",
        dy.contiguous(),
        input,
        mean,
        rstd,
        w,
        dx,
        acc,
        blocks,
        dw_rows,
        db_rows,
        r,
        s,
        ell,
        stride,
        int(center),
        threads,
    )
    if acc is not None:
        dw_rows, db_rows = acc.sum(0).to(input.dtype)
    dweight = dbias = None
    if need_dw:
        dweight = _to_param_shape(dw_rows, input, dims, weight.shape, per_column)
    if need_db:
        dbias = _to_param_shape(db_rows, input, dims, bias_shape, per_column)
    return dx, dweight, dbias


def _native_library(input: Tensor, ell: int, per_column: bool):
    """The C kernels when they handle this input (on a CPU; a scale per column, or constant
    along rows of more than one value), else None."""
    if input.device.type != "cpu" or (ell == 1 and not per_column):
        return None
    return native.library()


def normalize_forward(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    dims: tuple[int, ...],
    eps: float,
    center: bool,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Normalise over the trailing ``dims``; see :func:`bncourse.torch_norm.normalize_forward`.

    Returns ``(y, saved)``: the output (shape of ``input``) and what the backward needs. From
    the C kernels (:mod:`bncourse.fast.native`, on a CPU): the input, and the mean and
    ``1 / sqrt(var + eps)`` of each row in float64, shape (R,). From the PyTorch operations:
    the input and the pivot, the mean of ``x - pivot`` and ``1 / sqrt(var + eps)``, each of
    shape (R,). Requires :func:`supports`.
    """
    r, s, ell, per_column, w, b = _rows(input, dims, weight, bias)
    lib = _native_library(input, ell, per_column)
    if lib is not None:
        return _native_forward(lib, input, w, b, r, s, ell, per_column, eps, center)
    d = s * ell
    x = input.view(_row_shape(r, s, ell))
    y = torch.empty_like(x)
    stats = _row_shape(r, 1, 1, ell)
    pivot = x[(slice(None),) + (slice(0, 1),) * (x.dim() - 1)].contiguous() if center else None
    shift = x.new_zeros(stats)
    inv_std = torch.empty(stats, dtype=x.dtype, device=x.device)
    red = tuple(range(1, x.dim()))
    k = _chunk_rows(d, x.element_size())
    for start in range(0, r, k):
        rows = slice(start, min(start + k, r))
        xc, yc = x[rows], y[rows]
        if center:
            t = torch.sub(xc, pivot[rows], out=yc)  # exact for a constant row or a large mean
            m = t.sum(red, keepdim=True).div_(d)
            var = torch.linalg.vector_norm(t, dim=red, keepdim=True).square_().div_(d)
            var.sub_(m * m).clamp_(min=0)  # var of t about its own mean m (small: t ~ x - mean)
            shift[rows] = m
        else:
            t, m = xc, None
            var = torch.linalg.vector_norm(t, dim=red, keepdim=True).square_().div_(d)
        inv = var.add_(eps).rsqrt_()
        inv_std[rows] = inv
        wc = None if w is None else (w if w.shape[0] == 1 else w[rows])
        bc = None if b is None else (b if b.shape[0] == 1 else b[rows])
        if per_column:  # (t - m) * inv, then the per-column scale and shift
            if m is not None:
                t.sub_(m).mul_(inv)
            else:
                torch.mul(t, inv, out=yc)
            if wc is not None and bc is not None:
                torch.addcmul(bc, yc, wc, out=yc)
            elif wc is not None:
                yc.mul_(wc)
            elif bc is not None:
                yc.add_(bc)
        else:  # one scale and shift per (row, s): t * a + c with a = inv * w, c = b - m * a
            scale = inv if wc is None else inv * wc
            offset = None if m is None else -m * scale
            if bc is not None:
                offset = bc if offset is None else offset.add_(bc)
            torch.mul(t, scale, out=yc)
            if offset is not None:
                yc.add_(offset)
    pivot = shift if pivot is None else pivot  # zeros without centring
    return y.view(input.shape), (input, pivot.view(-1), shift.view(-1), inv_std.view(-1))


def normalize_backward(
    dy: Tensor,
    saved: tuple[Tensor, ...],
    weight: Tensor | None,
    bias_shape: torch.Size | None,
    dims: tuple[int, ...],
    center: bool,
    needs: tuple[bool, bool, bool],
    eps: float = 0.0,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`normalize_forward`: ``(dx, dweight, dbias)`` (None where not needed).

    ``dx = inv_std * (g - mean(g) - x_hat * mean(g * x_hat))`` with ``g = weight * dy``, written
    as ``a * dy + p * t + q`` with ``t = x - pivot``, ``a = inv_std * weight`` and per-row ``p``
    and ``q``. ``dweight`` and ``dbias`` have the shapes of ``weight`` and of ``bias_shape``.
    ``eps`` is not used (``saved`` holds ``inv_std``); it keeps the reference's signature.
    """
    if len(saved) == 3:  # (input, mean, rstd) of the C kernels' forward
        return _native_backward(native.built(), dy, saved, weight, bias_shape, dims, center, needs)
    input, pivot, shift, inv_std = saved
    bias = None if bias_shape is None else input.new_empty(bias_shape)
    r, s, ell, per_column, w, _ = _rows(input, dims, weight, bias)
    d = s * ell
    x = input.view(_row_shape(r, s, ell))
    g = dy.contiguous().view(x.shape)
    stats = _row_shape(r, 1, 1, ell)
    pivot, shift, inv_std = pivot.view(stats), shift.view(stats), inv_std.view(stats)
    need_dx, need_dw, need_db = needs[0], needs[1] and weight is not None, needs[2] and bias_shape
    dx = torch.empty_like(x)
    k = _chunk_rows(d, x.element_size())
    scratch = x.new_empty((min(k, r),) + x.shape[1:])
    # per column: the sums themselves; else per (row, s), summed over rows at the end
    col_dw = x.new_zeros(s) if per_column else x.new_empty(r, s)
    col_db = x.new_zeros(s) if per_column else x.new_empty(r, s)
    wv = None if w is None else w.view(-1, s)
    for start in range(0, r, k):
        rows = slice(start, min(start + k, r))
        n = rows.stop - rows.start
        xc, gc, dxc = x[rows], g[rows], dx[rows]
        inv, m = inv_std[rows], shift[rows]
        inv1, m1 = inv.view(n), m.view(n)
        t = torch.sub(xc, pivot[rows], out=dxc) if center else xc  # x - mean = t - m
        prod = torch.mul(gc, t, out=scratch[:n])
        wc = None if wv is None else (wv if wv.shape[0] == 1 else wv[rows])
        if per_column:
            # sum over the row of w * dy and of w * dy * (x - mean), by matrix-vector products
            if wc is None:
                sum_g, sum_gt = gc.sum(1), prod.sum(1)
            else:
                sum_g, sum_gt = gc @ wc.view(-1), prod @ wc.view(-1)
            if center:
                sum_gt.sub_(m1 * sum_g)
            if need_dw:  # sum over rows of inv * dy * (t - m)
                col_dw.addmv_(prod.t(), inv1)
                if center:
                    col_dw.addmv_(gc.t(), m1 * inv1, alpha=-1)
            if need_db:
                col_db.add_(gc.sum(0))
        else:
            g_rs = gc.sum(2) if ell > 1 else gc  # sums over L per (row, s), (n, S)
            gt_rs = prod.sum(2) if ell > 1 else prod
            if center:
                gt_rs = gt_rs - m.view(n, 1) * g_rs
            if need_dw:
                torch.mul(gt_rs, inv.view(n, 1), out=col_dw[rows])
            if need_db:
                col_db[rows] = g_rs
            if wc is None:
                sum_g, sum_gt = g_rs.sum(1), gt_rs.sum(1)
            else:
                sum_g, sum_gt = (g_rs * wc).sum(1), (gt_rs * wc).sum(1)
        if not need_dx:
            continue
        # dx = inv * (w * dy - sum_g / d - (t - m) * inv**2 * sum_gt / d)
        p = (inv1 * (inv1 * sum_gt)).mul_(-1.0 / d)
        q = -p * m1
        if center:
            q.sub_(sum_g.div_(d))
        p, q = p.view(inv.shape), q.view(inv.shape)
        if per_column:
            if center:
                dxc.mul_(p).add_(q)
            else:
                torch.mul(t, p, out=dxc)
            if wc is None:
                dxc.add_(gc)
            else:
                dxc.addcmul_(gc, w)
            dxc.mul_(inv)
        else:
            scale = (
                inv
                if wc is None
                else inv.view(n, 1, *([1] * (x.dim() - 2))) * (w if w.shape[0] == 1 else w[rows])
            )
            if center:
                dxc.mul_(p * inv)
            else:
                torch.mul(t, p * inv, out=dxc)
            dxc.addcmul_(gc, scale).add_(q * inv)
    dweight = dbias = None
    if need_dw:
        dweight = _to_param_shape(col_dw, input, dims, weight.shape, per_column)
    if need_db:
        dbias = _to_param_shape(col_db, input, dims, bias_shape, per_column)
    return (dx.view(input.shape) if need_dx else None), dweight, dbias


def _to_param_shape(
    sums: Tensor, input: Tensor, dims: tuple[int, ...], shape: torch.Size, per_column: bool
) -> Tensor:
    """Sums per (row, s) or per s, summed over the rows along which the parameter of ``shape``
    is broadcast, reshaped to ``shape``."""
    if per_column:
        return sums.reshape(shape)
    k = _first_trailing(input.shape, dims)
    full = (1,) * (input.dim() - len(shape)) + tuple(shape)
    m = max([i + 1 for i in range(k, input.dim()) if full[i] != 1], default=k)
    per_row = sums.view(*input.shape[:m])
    lead = tuple(i for i in range(k) if full[i] == 1)
    if lead:
        per_row = per_row.sum(lead, keepdim=True)
    return per_row.reshape(shape)
