"""Batch normalization in NumPy: the forward pass, two backward passes and a stateful layer.

Shapes follow PyTorch: the input is ``(N, C)`` or ``(N, C, *spatial)`` and every statistic is
computed per channel (axis 1) over all the other axes, so a channel of an image batch is
normalised over its ``N * H * W`` values.

Numerics. The output keeps the input's dtype, but the statistics are accumulated in float64 (the
sums of squares of the centred values over rows of up to 4096 values in the working dtype, the
rows then in float64; see ``_Float64Sums``) and
the variance is computed from centred values (two passes), never as ``E[x^2] - E[x]^2``: that
difference cancels catastrophically when the mean is large compared with the spread (an input
with mean 1e4 and standard deviation 1 in float32 would lose every digit of its variance).

Functions:

* :func:`batch_norm_forward` / :func:`batch_norm_backward`: training-mode transform with batch
  statistics and its compact closed-form gradient.
* :func:`batch_norm_backward_graph`: the same gradient obtained by walking the computational
  graph backwards one node at a time, as chapter 2 derives it.
* :func:`batch_norm_inference`: the evaluation-mode transform with fixed statistics.
* :class:`BatchNorm`: a layer with ``torch.nn.BatchNorm*d`` semantics (running statistics,
  momentum convention, ``num_batches_tracked``, ``train()``/``eval()``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "BatchNormCache",
    "batch_statistics",
    "batch_norm_forward",
    "batch_norm_backward",
    "batch_norm_backward_graph",
    "batch_norm_inference",
    "BatchNorm",
]


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _check_input(x: object, name: str = "x") -> np.ndarray:
    """Return ``x`` as a floating-point array of shape (N, C, *), or raise a clear error."""
    if isinstance(x, np.generic):  # a NumPy scalar: a 0-D array, refused below for its rank
        x = np.asarray(x)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array of shape (N, C, *), got {type(x).__name__}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(
            f"{name} must be a floating-point array (float16, float32 or float64), "
            f"got dtype {x.dtype}"
        )
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have shape (N, C) or (N, C, *spatial), got a {x.ndim}-D array of "
            f"shape {x.shape}"
        )
    return x


def _check_per_channel(name: str, value: object, channels: int) -> np.ndarray | None:
    """Return ``value`` as a float64 vector of length ``channels`` (``None`` stays ``None``)."""
    if value is None:
        return None
    array = np.asarray(value)
    if array.shape != (channels,):
        raise ValueError(
            f"{name} must have shape ({channels},), one value per channel, got shape {array.shape}"
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"{name} must be floating point, got dtype {array.dtype}")
    return array.astype(np.float64, copy=False)


def _values_per_channel(x: np.ndarray) -> int:
    """How many values each channel's statistics are computed over: N times the spatial size."""
    return x.size // x.shape[1]


def _check_enough_values(x: np.ndarray) -> None:
    if _values_per_channel(x) <= 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input of shape "
            f"{x.shape}: batch statistics of a single value are undefined"
        )


def _reduction_axes(x: np.ndarray) -> tuple[int, ...]:
    """Every axis but the channel axis (1)."""
    return (0, *range(2, x.ndim))


def _per_channel(vector: np.ndarray, ndim: int) -> np.ndarray:
    """Reshape a per-channel vector to ``(1, C, 1, ...)`` so that it broadcasts against x."""
    return vector.reshape((1, -1) + (1,) * (ndim - 2))


# ---------------------------------------------------------------------------------------------
# Training-mode transform
# ---------------------------------------------------------------------------------------------


@dataclass
class BatchNormCache:
    """What the backward passes need from a forward pass.

    ``x_hat`` is the normalised input (in the input's dtype); ``mean``, ``var`` (biased) and
    ``inv_std`` are float64 vectors with one value per channel; ``gamma`` is float64 (ones when
    the layer has no affine step); ``x`` is the input, kept for the graph-based backward.
    """

    x: np.ndarray
    x_hat: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    inv_std: np.ndarray
    gamma: np.ndarray
    eps: float


# The passes over the data run slab by slab, a slab being whole samples (axis 0) of about this
# many values: a slab's float32 arrays and its float64 scratch (1 MiB) stay in the CPU's cache
# while several operations run on them, so each pass reads and writes main memory about once.
_SLAB_VALUES = 1 << 17

# Rows (the M values of one sample and channel) this long and longer count as long: NumPy
# broadcasts a per-channel column over them efficiently, and the backward pass sums them in
# float64 throughout (shorter rows are summed in the working dtype, the row sums in float64).
_LONG_ROW = 4096


def _working_dtype(dtype: np.dtype) -> np.dtype:
    """float64 stays float64; float32, float16 (and other floats) are computed in float32."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


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


def batch_statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance of ``x``, accumulated in float64 (two passes).

    Args:
        x: array of shape (N, C) or (N, C, *spatial).

    Returns:
        ``(mean, var)``, float64 vectors of length C; ``var`` divides by the number of values
        per channel (the biased estimate that batch norm normalises with). The variance is the
        mean of squared deviations from the mean, never ``E[x^2] - E[x]^2``.
    """
    x = _check_input(x)
    _, mean, var = _centre(x)
    return mean, var


def batch_norm_forward(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, BatchNormCache]:
    """Batch-normalise ``x`` with its own batch statistics (training mode).

    .. math::  y = \\gamma\\,\\frac{x - \\mu_B}{\\sqrt{\\sigma_B^2 + \\epsilon}} + \\beta

    Args:
        x: input of shape (N, C) or (N, C, *spatial), any floating dtype.
        gamma: scale, shape (C,), or ``None`` for no scaling (a layer with ``affine=False``).
        beta: shift, shape (C,), or ``None`` for no shift.
        eps: added to the variance for numerical stability.

    Returns:
        ``(y, cache)``: ``y`` has the shape and dtype of ``x``; ``cache`` is what
        :func:`batch_norm_backward` needs.

    Raises:
        ValueError: wrong rank, a parameter of the wrong size, or a single value per channel.
        TypeError: a non-floating input.

    Notes:
        The statistics are exact float64 two-pass ones (see :func:`batch_statistics`); the
        normalisation runs in the working dtype (float32 for float32 and float16 input), in
        place on the centred array that becomes ``cache.x_hat``.
    """
    return _forward(x, gamma, beta, eps)


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

    shape3 = (x.shape[0], channels, x.size // (x.shape[0] * channels))
    fits = (
        workspace is not None
        and workspace.shape == shape3
        and workspace.dtype == _working_dtype(x.dtype)
        and workspace.flags.c_contiguous
    )
    d, mean, var = _centre(x, out=workspace if fits else None)
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


def _check_upstream(dy: object, cache: BatchNormCache) -> np.ndarray:
    dy = _check_input(dy, "dy")
    if dy.shape != cache.x.shape:
        raise ValueError(
            f"dy must have the shape of the forward input {cache.x.shape}, got {dy.shape}"
        )
    return dy


def batch_norm_backward(
    dy: np.ndarray, cache: BatchNormCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of the training-mode transform, in the compact closed form.

    With :math:`g = \\partial L/\\partial y`, :math:`m` values per channel and sums over them,

    .. math::

        \\frac{\\partial L}{\\partial \\beta} = \\sum g, \\qquad
        \\frac{\\partial L}{\\partial \\gamma} = \\sum g\\,\\hat x, \\qquad
        \\frac{\\partial L}{\\partial x} = \\frac{\\gamma}{m\\sqrt{\\sigma_B^2+\\epsilon}}
        \\Big(m\\,g - \\sum g - \\hat x \\sum g\\,\\hat x\\Big).

    Args:
        dy: upstream gradient, the shape of the forward input.
        cache: the cache returned by :func:`batch_norm_forward`.

    Returns:
        ``(dx, dgamma, dbeta)``: ``dx`` in the input's dtype, the others float64 of shape (C,).
        The sums run over each row of M values in the working dtype (float32 for float32
        input) and are added up in float64; ``dx`` is computed in the working dtype as
        ``scale * (g - mean(g) - x_hat * mean(g * x_hat))``, slab by slab.
    """
    dy = _check_upstream(dy, cache)
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


def batch_norm_backward_graph(
    dy: np.ndarray, cache: BatchNormCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same gradients as :func:`batch_norm_backward`, one graph node at a time.

    The forward pass as a computational graph (per channel, sums over the m values)::

        mu = sum(x) / m            xc = x - mu             var = sum(xc**2) / m
        std = sqrt(var + eps)      inv = 1 / std           x_hat = xc * inv
        y = gamma * x_hat + beta

    The backward pass visits the nodes in reverse order and applies the chain rule to each;
    a node used twice (``xc`` feeds both ``var`` and ``x_hat``) sums the gradients from both.
    Everything runs in float64; slower than the closed form, but each line is one derivative.
    """
    dy = _check_upstream(dy, cache)
    axes = _reduction_axes(dy)
    ndim = dy.ndim
    m = _values_per_channel(dy)
    g = dy.astype(np.float64)

    # Recompute the forward nodes in float64.
    x = cache.x.astype(np.float64)
    mu = x.mean(axis=axes)
    xc = x - _per_channel(mu, ndim)
    var = np.mean(xc**2, axis=axes)
    std = np.sqrt(var + cache.eps)
    inv = 1.0 / std
    x_hat = xc * _per_channel(inv, ndim)
    gamma = _per_channel(cache.gamma, ndim)

    # y = gamma * x_hat + beta
    dbeta = g.sum(axis=axes)
    dgamma = (g * x_hat).sum(axis=axes)
    dx_hat = g * gamma
    # x_hat = xc * inv
    dxc = dx_hat * _per_channel(inv, ndim)
    dinv = (dx_hat * xc).sum(axis=axes)
    # inv = 1 / std
    dstd = -dinv / std**2
    # std = sqrt(var + eps)
    dvar = dstd / (2.0 * std)
    # var = sum(xc**2) / m: the second path into xc
    dxc = dxc + 2.0 * xc * _per_channel(dvar, ndim) / m
    # xc = x - mu
    dx = dxc.copy()
    dmu = -dxc.sum(axis=axes)
    # mu = sum(x) / m
    dx += _per_channel(dmu, ndim) / m
    return dx.astype(cache.x.dtype), dgamma, dbeta


# ---------------------------------------------------------------------------------------------
# Evaluation-mode transform
# ---------------------------------------------------------------------------------------------


def batch_norm_inference(
    x: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    eps: float = 1e-5,
) -> np.ndarray:
    """Normalise ``x`` with fixed statistics: a per-channel affine map ``y = a * x + b``.

    ``running_var`` is used as given (PyTorch stores the unbiased estimate there). The map is
    applied as ``(x - mean) * a + beta``, centring first, so that it stays accurate for inputs
    with a large mean; the output has the dtype of ``x``.
    """
    x = _check_input(x)
    channels = x.shape[1]
    mean = _check_per_channel("running_mean", running_mean, channels)
    var = _check_per_channel("running_var", running_var, channels)
    if mean is None or var is None:
        raise ValueError("running_mean and running_var are required in evaluation mode")
    gamma64 = _check_per_channel("gamma", gamma, channels)
    beta64 = _check_per_channel("beta", beta, channels)
    inv_std = 1.0 / np.sqrt(var + eps)
    scale = inv_std if gamma64 is None else gamma64 * inv_std
    # mean = high + low with high in the working dtype: x - high loses nothing to cancellation
    # however large the mean, and the remainder goes into the shift,
    # y = (x - high) * scale + (beta - low * scale)
    dtype = _working_dtype(x.dtype)
    high = mean.astype(dtype)
    low = mean - high
    shift = -low * scale if beta64 is None else beta64 - low * scale
    y = np.subtract(_as_rows(x, dtype), high[:, None])
    y *= scale.astype(dtype)[:, None]
    y += shift.astype(dtype)[:, None]
    return y.reshape(x.shape).astype(x.dtype, copy=False)


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------


class BatchNorm:
    """A batch-norm layer with the semantics of ``torch.nn.BatchNorm1d/2d/3d``.

    Args:
        num_features: C, the number of channels (axis 1 of the input).
        eps: added to the variance before the square root.
        momentum: weight of the new batch in the running averages,
            ``running = (1 - momentum) * running + momentum * batch`` (PyTorch's convention;
            Keras calls ``1 - momentum`` its momentum). ``None`` gives a cumulative average
            over all batches seen, weighting batch k by ``1 / k``.
        affine: learn a scale ``weight`` (gamma, starts at 1) and shift ``bias`` (beta, starts
            at 0); if False both are ``None``.
        track_running_stats: keep ``running_mean`` (starts at 0), ``running_var`` (starts at
            1; it stores the *unbiased* batch variance while training normalises with the biased
            one) and ``num_batches_tracked``. If False, batch statistics are used in evaluation
            mode too and the three buffers are ``None``.

    Calling the layer runs the forward pass (training or evaluation mode, see :meth:`train`
    and :meth:`eval`); :meth:`backward` returns dL/dx and stores ``grad_weight`` and
    ``grad_bias``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        if not isinstance(num_features, (int, np.integer)) or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.training = True
        self.weight: np.ndarray | None = np.ones(num_features) if affine else None
        self.bias: np.ndarray | None = np.zeros(num_features) if affine else None
        self.grad_weight: np.ndarray | None = None
        self.grad_bias: np.ndarray | None = None
        self.running_mean: np.ndarray | None = None
        self.running_var: np.ndarray | None = None
        self.num_batches_tracked: int | None = None
        if track_running_stats:
            self.reset_running_stats()
        self._cache: BatchNormCache | None = None
        self._eval_scale: np.ndarray | None = None

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batches tracked."""
        self.running_mean = np.zeros(self.num_features)
        self.running_var = np.ones(self.num_features)
        self.num_batches_tracked = 0

    def train(self, mode: bool = True) -> BatchNorm:
        """Training mode (batch statistics, running averages updated); returns the layer."""
        self.training = mode
        return self

    def eval(self) -> BatchNorm:
        """Evaluation mode (running statistics, if tracked); returns the layer."""
        return self.train(False)

    def _update_running_stats(self, cache: BatchNormCache, count: int) -> None:
        assert self.running_mean is not None and self.running_var is not None
        self.num_batches_tracked += 1
        momentum = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
        unbiased_var = cache.var * count / (count - 1)
        self.running_mean = (1.0 - momentum) * self.running_mean + momentum * cache.mean
        self.running_var = (1.0 - momentum) * self.running_var + momentum * unbiased_var

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Normalise ``x`` of shape (N, C) or (N, C, *spatial) with C = ``num_features``."""
        x = _check_input(x)
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"x must have {self.num_features} channels on axis 1 (num_features), got "
                f"shape {x.shape}"
            )
        use_batch_stats = self.training or not self.track_running_stats
        if use_batch_stats:
            # the previous forward's x_hat is private to this layer: reuse its memory
            workspace = None if self._cache is None else self._cache.x_hat
            self._cache = None
            if workspace is not None:
                workspace = workspace.reshape(workspace.shape[0], workspace.shape[1], -1)
            y, cache = _forward(x, self.weight, self.bias, self.eps, workspace)
            if self.training and self.track_running_stats:
                self._update_running_stats(cache, _values_per_channel(x))
            self._cache, self._eval_scale = cache, None
            return y
        self._cache = None
        self._eval_scale = 1.0 / np.sqrt(self.running_var + self.eps)
        self._eval_input = x
        return batch_norm_inference(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.eps
        )

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Gradient with respect to the last forward input; stores ``grad_weight``/``grad_bias``.

        After a forward pass with batch statistics this is the closed form of
        :func:`batch_norm_backward`; after one with running statistics the transform is a fixed
        affine map and dx is simply ``gamma / sqrt(running_var + eps) * dy``.
        """
        if self._cache is not None:
            dx, dgamma, dbeta = batch_norm_backward(dy, self._cache)
        elif self._eval_scale is not None:
            x = self._eval_input
            dy = _check_input(dy, "dy")
            if dy.shape != x.shape:
                raise ValueError(f"dy must have the shape of the forward input {x.shape}")
            axes = _reduction_axes(x)
            ndim = x.ndim
            x_hat = (x - _per_channel(self.running_mean, ndim)) * _per_channel(
                self._eval_scale, ndim
            )
            dbeta = dy.sum(axis=axes, dtype=np.float64)
            dgamma = np.multiply(dy, x_hat, dtype=np.float64).sum(axis=axes)
            gamma = self.weight if self.weight is not None else np.ones(self.num_features)
            dx = (dy * _per_channel(gamma * self._eval_scale, ndim)).astype(x.dtype)
        else:
            raise RuntimeError("backward called before forward")
        if self.affine:
            self.grad_weight, self.grad_bias = dgamma, dbeta
        return dx

    def parameters(self) -> list[np.ndarray]:
        """The learnable arrays, ``[weight, bias]`` (empty without the affine step)."""
        return [self.weight, self.bias] if self.affine else []

    def state_dict(self) -> dict[str, np.ndarray | int]:
        """The layer's state under PyTorch's keys (``weight``, ``bias``, ``running_mean``, ...)."""
        state: dict[str, np.ndarray | int] = {}
        if self.affine:
            state["weight"], state["bias"] = self.weight.copy(), self.bias.copy()
        if self.track_running_stats:
            state["running_mean"] = self.running_mean.copy()
            state["running_var"] = self.running_var.copy()
            state["num_batches_tracked"] = self.num_batches_tracked
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load a state dict with PyTorch's keys; values may be arrays or CPU tensors."""
        expected = set(self.state_dict())
        if set(state) != expected:
            raise KeyError(
                f"state must have exactly the keys {sorted(expected)}, got {sorted(state)}"
            )
        for key in ("weight", "bias", "running_mean", "running_var"):
            if key in state:
                value = np.asarray(state[key], dtype=np.float64).copy()
                _check_per_channel(key, value, self.num_features)
                setattr(self, key, value)
        if "num_batches_tracked" in state:
            self.num_batches_tracked = int(np.asarray(state["num_batches_tracked"]))

    def __repr__(self) -> str:
        return (
            f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats})"
        )
