"""Speed-tuned NumPy kernels of batch normalization, with the reference's names and signatures.

:mod:`bncourse.numpy_bn` is the reference: code that reads like chapter 2's equations. This module
computes the same :func:`batch_norm_forward` and :func:`batch_norm_backward` (same arguments,
same :class:`~bncourse.numpy_bn.BatchNormCache`, same errors, results equal within rounding) but
arranged for speed; :class:`bncourse.numpy_bn.BatchNorm` uses it by default. The tricks, and what
each buys, are the subject of the book's page "Making batch norm fast":

* **Slabs.** Every pass runs over slabs of whole samples of about 512 KiB of float32
  (``_SLAB_VALUES``), so a slab read from main memory stays in the CPU's cache while several
  operations run on it: each pass reads and writes main memory about once.
* **Constant rows** (``_PerChannel``). Broadcasting a (C, 1) column over short rows runs NumPy's
  inner loop once per row; a per-channel vector repeated into a contiguous row turns the
  broadcast into a plain elementwise operation of two contiguous arrays.
* **BLAS row sums** (``_Float64Sums``). Sums and sums of squares per row of M values are matrix
  products with a vector of ones or row dot products (BLAS), the row results added in float64.
* **Exact centring in the working dtype** (``_centre``). The float64 mean is split into a float32
  part and a remainder, so ``x - mean`` is computed in float32 without cancellation and the
  variance of the centred values is corrected exactly.
* **In place, reused memory.** ``x_hat`` is normalised in place in the centred array, and the
  layer hands back its previous ``x_hat`` as the next forward's workspace (``_forward``).
* **Small inputs take the simple path.** Below ``_SMALL_INPUT`` values the set-up of the
  slabs costs more than it saves, and the reference functions run instead.
* **Closed form as two constants.** The backward pass computes
  ``dx = scale * (g - mean(g) - x_hat * mean(g * x_hat))`` with one fused pass per slab.
* **One loop in C.** For C-contiguous float32 or float64 input of at least 16 positions, the
  forward and backward run one loop per channel in C instead (``bn_forward_xhat`` and
  ``bn_backward_xhat`` of ``norm_rows.c``, built on first use by :mod:`bncourse.fast.native`,
  on PyTorch's thread count, :func:`bncourse.fast.native.threads`): the channel's sums, then
  ``x_hat`` and ``y`` (or ``dx``) while its values are in the cache. Without a C compiler, or
  after ``native.use_native(False)``, the operations above run.

Numerics. Output and ``dx`` keep the input's dtype. Statistics are accumulated in float64 (sums
of squares of centred values over rows of up to 4096 values in the working dtype, the rows then
in float64); the variance is computed from centred values, never as ``E[x^2] - E[x]^2``.
"""

from __future__ import annotations

import numpy as np

from bncourse import numpy_bn as reference
from bncourse.fast import native
from bncourse.numpy_bn import (
    BatchNormCache,
    _check_enough_values,
    _check_input,
    _check_per_channel,
    _check_upstream,
    _working_dtype,
)

__all__ = ["batch_norm_forward", "batch_norm_backward"]


# Inputs of fewer values run the reference functions (their set-up is cheaper; measured on
# (2, 64, 8, 8) and (64, 128): the reference is about 1.5x faster there, slower from ~2**16 up).
# (N, C) input, one value per row, breaks even later, at about 2**19 values ((4096, 64): the
# reference is 1.1x faster, (1024, 1024): 0.88x).
_SMALL_INPUT = 1 << 16


def _small(a: np.ndarray) -> bool:
    """Whether ``a`` (N, C, *) is small enough for the reference functions to be faster."""
    one_value_per_row = a.size == a.shape[0] * a.shape[1]
    return a.size < _SMALL_INPUT * (8 if one_value_per_row else 1)


# The passes over the data run slab by slab, a slab being whole samples (axis 0) of about this
# many values: a slab's float32 arrays and its float64 scratch (1 MiB) stay in the CPU's cache
# while several operations run on them, so each pass reads and writes main memory about once.
_SLAB_VALUES = 1 << 17

# Rows (the M values of one sample and channel) this long and longer count as long: NumPy
# broadcasts a per-channel column over them efficiently, and the backward pass sums them in
# float64 throughout (shorter rows are summed in the working dtype, the row sums in float64).
_LONG_ROW = 4096


def _as_rows(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``a`` as (N, C, M), M the spatial size: a view, or a copy if non-contiguous or converted."""
    return np.ascontiguousarray(a, dtype=dtype).reshape(a.shape[0], a.shape[1], -1)


class _PerChannel:
    """Slabs of an (N, C, M) array, and per-channel constants that NumPy applies fast.

    Broadcasting a (C, 1) column over rows of M values runs NumPy's loops once per row, two to
    three times slower than an elementwise operation of two contiguous arrays when rows are
    short (M = 1024 and less). So for M < _LONG_ROW a per-channel vector becomes a contiguous
    "constant" row: each channel's value repeated M times, the pattern repeated for ``repeat``
    samples (about _LONG_ROW values in all), and a slab of k samples is viewed as a (k /
    repeat, repeat * C * M) array against it. Long rows, and samples larger than a slab, keep
    the (C, 1) column.

    ``slabs`` are slices of whole samples of about _SLAB_VALUES values, multiples of
    ``repeat`` (except the last).
    """

    def __init__(self, shape3: tuple[int, int, int]) -> None:
        n, channels, m = shape3
        self.m, self.width = m, channels * m
        if m >= _LONG_ROW or self.width > _SLAB_VALUES:
            self.repeat = 0  # columns (a constant row would be as large as a slab)
            per_slab = max(1, _SLAB_VALUES // self.width)
        else:
            self.repeat = max(1, min(n, -(-_LONG_ROW // self.width)))
            per_slab = self.repeat * max(1, _SLAB_VALUES // (self.width * self.repeat))
        self.slabs = [slice(start, min(start + per_slab, n)) for start in range(0, n, per_slab)]

    def constant(self, vector: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """The per-channel ``vector`` (C,) as a constant to use with :meth:`pieces`."""
        values = np.asarray(vector).astype(dtype)
        if not self.repeat:
            return values[:, None]
        return np.tile(np.repeat(values, self.m), self.repeat)

    def pieces(self, slab: slice, constants: list, *arrays: np.ndarray):
        """Yield ``(views, constants)``: the arrays' samples in ``slab`` (one or two pieces),
        reshaped to broadcast against the constants, which are trimmed to match."""
        if not self.repeat:
            yield [a[slab] for a in arrays], constants
            return
        start, stop = slab.start, slab.stop
        whole = stop - start - (stop - start) % self.repeat
        if whole:
            rows = slice(start, start + whole)
            shape = (whole // self.repeat, self.repeat * self.width)
            yield [a[rows].reshape(shape) for a in arrays], constants
        if start + whole < stop:
            rows = slice(start + whole, stop)
            shape = (stop - start - whole, self.width)
            yield [a[rows].reshape(shape) for a in arrays], [c[: self.width] for c in constants]


def _slabs(a3: np.ndarray) -> list[slice]:
    """The slabs of :class:`_PerChannel` for ``a3`` (N, C, M)."""
    return _PerChannel(a3.shape).slabs


class _Float64Sums:
    """Per-channel sums and sums of squares of (N, C, M) slabs, accumulated in float64.

    Sums: a float32 slab is first copied into a float64 scratch slab (in cache); the sums over
    each row of M values are then a BLAS product with a vector of ones, in float64 (the values
    may have a large mean, so every addition is in float64). Sums of squares, taken of centred
    values only: BLAS dot products of each row with itself, in the working dtype for rows of up
    to _LONG_ROW values (the squares are all positive, so a float32 row sum is accurate to about
    1e-7 relative) and in float64 for longer rows and (N, C) input; the row results are always
    added up in float64.
    """

    def __init__(self, a3: np.ndarray, slab: slice) -> None:
        rows = slab.stop - slab.start
        self.float64 = a3.dtype == np.float64
        self.scratch = None if self.float64 else np.empty((rows,) + a3.shape[1:])
        self.ones = np.ones(a3.shape[2])
        self.total = np.zeros(a3.shape[1])
        self.total_squares = np.zeros(a3.shape[1])

    def add(self, part: np.ndarray) -> None:
        """Add the sums of ``part``, a slab (k, C, M)."""
        if part.shape[2] == 1:  # (N, C) input: add up rows of C values
            self.total += part[:, :, 0].sum(axis=0, dtype=np.float64)
        else:
            self.total += (self._float64(part) @ self.ones).sum(axis=0)

    def add_squares(self, part: np.ndarray) -> None:
        """Add the sums of squares of ``part``, a slab (k, C, M)."""
        if part.shape[2] == 1 or part.shape[2] > _LONG_ROW:
            part = self._float64(part)
        if part.shape[2] == 1:
            self.total_squares += np.einsum("nc,nc->c", part[:, :, 0], part[:, :, 0])
        else:  # one BLAS dot product per row (faster than einsum here), the row sums in float64
            rows = part[:, :, None, :] @ part[:, :, :, None]
            self.total_squares += rows.sum(axis=(0, 2, 3), dtype=np.float64)

    def _float64(self, part: np.ndarray) -> np.ndarray:
        if self.float64:
            return part
        work = self.scratch[: part.shape[0]]
        np.copyto(work, part)
        return work


def _centre(
    x: np.ndarray, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centred input ``x - mean`` (N, C, M) in the working dtype, float64 ``mean`` and ``var``.

    Two passes over ``x``, accumulating in float64 (see :class:`_Float64Sums`):

    1. ``mean`` = the float64 sum of every channel over its ``count`` values, over ``count``.
    2. The mean is split into a working-dtype part and a small remainder, ``mean = high +
       low``, and ``d = x - high`` is computed in the working dtype: no cancellation however
       large the mean is (for values close to ``high`` the subtraction is exact). ``sum(d**2)``
       is accumulated in float64 from row sums (see :class:`_Float64Sums`); as ``sum(d) =
       count * low`` (up to the rounding of ``d``), the sum of squared deviations from the
       exact mean is ``sum((d - low)**2) = sum(d**2) - count * low**2``, where ``low**2`` is
       below the square of float32's resolution of the mean. Then ``d -= low`` (skipped when
       ``|low|`` is below ``2**-30`` standard deviations, where it changes no float32 result).

    A constant channel has ``mean`` exactly its value, so ``d`` is exactly 0. ``out``, if given,
    is a C-contiguous (N, C, M) array of the working dtype to hold ``d``.
    """
    dtype = _working_dtype(x.dtype)
    x3 = _as_rows(x, dtype)
    n, channels, m = x3.shape
    count = n * m
    layout = _PerChannel(x3.shape)
    slabs = layout.slabs

    sums = _Float64Sums(x3, slabs[0])
    for slab in slabs:
        sums.add(x3[slab])
    mean = sums.total / count
    high = mean.astype(dtype)
    low = mean - high
    high_constant = layout.constant(high, dtype)

    centred = np.empty_like(x3) if out is None else out
    sums = _Float64Sums(x3, slabs[0])
    for slab in slabs:
        for (x_part, centred_part), (high_part,) in layout.pieces(
            slab, [high_constant], x3, centred
        ):
            np.subtract(x_part, high_part, out=centred_part)
        sums.add_squares(centred[slab])
    var = np.maximum(sums.total_squares / count - low * low, 0.0)
    if np.any(np.abs(low) > 2.0**-30 * np.sqrt(var)):
        centred -= low.astype(dtype)[:, None]
    return centred, mean, var


def batch_norm_forward(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, BatchNormCache]:
    """Training-mode batch norm, as :func:`bncourse.numpy_bn.batch_norm_forward`, tuned.

    Parameters
    ----------
    x : np.ndarray, shape (N, C) or (N, C, *spatial)
        Input, any floating dtype.
    gamma, beta : np.ndarray, shape (C,), or None
        Scale and shift (``None``: no scale, no shift).
    eps : float, default 1e-5
        Added to the variance.

    Returns
    -------
    out : np.ndarray, shape and dtype of ``x``
    cache : BatchNormCache
        What :func:`batch_norm_backward` (of either module) needs.
    """
    return _forward(x, gamma, beta, eps)


def _c_layout(a: np.ndarray) -> tuple[int, int, int] | None:
    """``(N, C, L)`` when the C kernels take ``a``: float32 or float64, C-contiguous, with at
    least 16 positions per channel and sample; else None."""
    if a.dtype not in (np.float32, np.float64) or a.ndim < 3 or not a.flags.c_contiguous:
        return None
    positions = a.size // max(1, a.shape[0] * a.shape[1])
    return (a.shape[0], a.shape[1], positions) if positions >= 16 else None


def _c_forward(lib, x, gamma64, beta64, eps, out):
    """The C kernel's forward: ``(y, cache)``, ``x_hat`` written into ``out`` (N, C, L) when
    given (per channel: the sums of ``x - pivot``, then ``x_hat`` and ``y`` while it is in the
    cache)."""
    n, channels, positions = _c_layout(x)
    x_hat = out if out is not None else np.empty((n, channels, positions), x.dtype)
    y = np.empty_like(x)
    mean, var = np.empty(channels), np.empty(channels)
    gamma64, beta64 = (None if v is None else np.ascontiguousarray(v) for v in (gamma64, beta64))
    arrays = (x, gamma64, beta64, y, x_hat, mean, var)
    native.call(
        lib, "bn_forward_xhat", *arrays, n, channels, positions, eps, native.threads(channels)
    )
    gamma = gamma64 if gamma64 is not None else np.ones(channels)
    inv_std = 1.0 / np.sqrt(var + eps)
    cache = BatchNormCache(
        x=x, x_hat=x_hat.reshape(x.shape), mean=mean, var=var, inv_std=inv_std, gamma=gamma, eps=eps
    )
    return y, cache


def _c_backward(lib, dy, cache):
    """The C kernel's backward from ``cache.x_hat``: ``(dx, dgamma, dbeta)``."""
    n, channels, positions = _c_layout(cache.x_hat)
    g = np.ascontiguousarray(dy, dtype=cache.x_hat.dtype)
    dx = np.empty_like(g)
    dgamma, dbeta = np.empty(channels), np.empty(channels)
    gamma = np.ascontiguousarray(cache.gamma, dtype=np.float64)
    inv_std = np.ascontiguousarray(cache.inv_std, dtype=np.float64)
    arrays = (g, cache.x_hat, gamma, inv_std, dx, dgamma, dbeta)
    native.call(lib, "bn_backward_xhat", *arrays, n, channels, positions, native.threads(channels))
    return dx.astype(cache.x.dtype, copy=False), dgamma, dbeta


def _forward(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    eps: float,
    workspace: np.ndarray | None = None,
) -> tuple[np.ndarray, BatchNormCache]:
    """:func:`batch_norm_forward`, writing ``cache.x_hat`` into ``workspace`` when it fits.

    ``workspace`` is the (N, C, M) array behind an earlier cache's ``x_hat`` that nobody else
    holds (the layer passes its previous one): reusing it saves a fresh allocation.
    """
    x = _check_input(x)
    channels = x.shape[1]
    gamma64 = _check_per_channel("gamma", gamma, channels)
    beta64 = _check_per_channel("beta", beta, channels)
    _check_enough_values(x)
    if _small(x):
        return reference.batch_norm_forward(x, gamma, beta, eps)
    shape3 = (x.shape[0], channels, x.size // (x.shape[0] * channels))
    fits = (
        workspace is not None
        and workspace.shape == shape3
        and workspace.dtype == _working_dtype(x.dtype)
        and workspace.flags.c_contiguous
    )
    out = workspace if fits else None
    if _c_layout(x) is not None and (lib := native.library()) is not None:
        return _c_forward(lib, x, gamma64, beta64, eps, out)
    d, mean, var = _centre(x, out=out)
    inv_std = 1.0 / np.sqrt(var + eps)
    dtype = d.dtype
    layout = _PerChannel(d.shape)
    constants = [layout.constant(inv_std, dtype)]
    for vector in (gamma64, beta64):
        if vector is not None:
            constants.append(layout.constant(vector, dtype))
    x_hat = d  # normalised in place, slab by slab
    y = np.empty_like(d)
    for slab in layout.slabs:
        for (x_hat_part, y_part), (inv_part, *affine) in layout.pieces(slab, constants, x_hat, y):
            x_hat_part *= inv_part
            if gamma64 is not None:
                np.multiply(x_hat_part, affine[0], out=y_part)
                if beta64 is not None:
                    y_part += affine[1]
            elif beta64 is not None:
                np.add(x_hat_part, affine[0], out=y_part)
            else:
                y_part[...] = x_hat_part
    y = y.reshape(x.shape).astype(x.dtype, copy=False)
    x_hat = x_hat.reshape(x.shape).astype(x.dtype, copy=False)
    scale = gamma64 if gamma64 is not None else np.ones(channels)
    cache = BatchNormCache(
        x=x, x_hat=x_hat, mean=mean, var=var, inv_std=inv_std, gamma=scale, eps=eps
    )
    return y, cache


def batch_norm_backward(
    dy: np.ndarray, cache: BatchNormCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of the training-mode transform, as :func:`bncourse.numpy_bn.batch_norm_backward`.

    Parameters
    ----------
    dy : np.ndarray, shape of the forward input
        Upstream gradient.
    cache : BatchNormCache
        From :func:`batch_norm_forward`.

    Returns
    -------
    dx : np.ndarray, shape and dtype of the forward input
    dgamma, dbeta : np.ndarray, float64, shape (C,)
        The row sums run in the working dtype (float32 for float32 input) over rows of M
        values and are added up in float64; ``dx`` is computed in the working dtype as
        ``scale * (g - mean(g) - x_hat * mean(g * x_hat))``, slab by slab.
    """
    dy = _check_upstream(dy, cache)
    if _small(dy):
        return reference.batch_norm_backward(dy, cache)
    if _c_layout(cache.x_hat) is not None and (lib := native.library()) is not None:
        return _c_backward(lib, dy, cache)
    dtype = _working_dtype(cache.x.dtype)
    g = _as_rows(dy, dtype)
    x_hat = _as_rows(cache.x_hat, dtype)
    count = g.shape[0] * g.shape[2]
    slabs = _slabs(g)

    # sums over each row of M values in the working dtype, added up in float64 (rows longer
    # than _LONG_ROW values are summed in float64 throughout)
    ones = np.ones(g.shape[2], dtype=dtype)
    dbeta, dgamma = np.zeros(g.shape[1]), np.zeros(g.shape[1])
    long_rows = g.shape[2] > _LONG_ROW
    for slab in slabs:
        g_part, x_hat_part = g[slab], x_hat[slab]
        if g.shape[2] == 1:  # (N, C) input: float32 products, float64 sums over the batch
            dbeta += g_part[:, :, 0].sum(axis=0, dtype=np.float64)
            products = np.multiply(g_part[:, :, 0], x_hat_part[:, :, 0])
            dgamma += products.sum(axis=0, dtype=np.float64)
        elif long_rows:
            dbeta += g_part.sum(axis=(0, 2), dtype=np.float64)
            dgamma += np.einsum("ncm,ncm->c", g_part, x_hat_part, dtype=np.float64)
        else:
            dbeta += (g_part @ ones).sum(axis=0, dtype=np.float64)
            rows = g_part[:, :, None, :] @ x_hat_part[:, :, :, None]  # BLAS row dot products
            dgamma += rows.sum(axis=(0, 2, 3), dtype=np.float64)

    scale = cache.gamma * cache.inv_std
    layout = _PerChannel(g.shape)
    constants = [
        layout.constant(dgamma / count, dtype),
        layout.constant(dbeta / count, dtype),
        layout.constant(scale, dtype),
    ]
    dx = np.empty_like(g)
    for slab in slabs:  # dx = scale * (g - mean(g) - x_hat * mean(g * x_hat))
        for (x_hat_part, g_part, dx_part), (a, b, scale_part) in layout.pieces(
            slab, constants, x_hat, g, dx
        ):
            np.multiply(x_hat_part, a, out=dx_part)
            dx_part += b
            np.subtract(g_part, dx_part, out=dx_part)
            dx_part *= scale_part
    return dx.reshape(dy.shape).astype(cache.x.dtype, copy=False), dgamma, dbeta
