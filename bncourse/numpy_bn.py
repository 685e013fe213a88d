"""Batch normalization in NumPy, written to read like chapter 2's equations.

This is the reference implementation: the code the book shows. For a mini-batch ``x`` of
shape (N, C) or (N, C, *spatial), every statistic is per channel (axis 1), over the
``m = N * H * W ...`` values of that channel, with the symbols of chapter 2:

.. math::

    \\mu = \\frac{1}{m}\\sum_i x_i, \\qquad
    \\sigma^2 = \\frac{1}{m}\\sum_i (x_i - \\mu)^2, \\qquad
    \\hat x_i = \\frac{x_i - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}}, \\qquad
    y_i = \\gamma \\hat x_i + \\beta.

Functions, in the style of CS231n's layers (a forward pass returns ``(out, cache)``, a backward
pass takes the upstream gradient and the cache):

* :func:`batch_norm_forward` / :func:`batch_norm_backward`: the training-mode transform with
  batch statistics and its compact closed-form gradient.
* :func:`batch_norm_backward_graph`: the same gradient by walking the computational graph
  backwards one node at a time, as chapter 2 derives it.
* :func:`batch_norm_inference`: the evaluation-mode transform with fixed statistics.
* :func:`batch_statistics`: the per-channel mean and biased variance.
* :class:`BatchNorm`: a layer with ``torch.nn.BatchNorm*d`` semantics (running statistics,
  momentum convention, ``num_batches_tracked``, ``train()``/``eval()``). It runs the
  speed-tuned kernels of :mod:`bncourse.fast.numpy_bn` by default (same results within
  rounding); ``BatchNorm(C, kernels="reference")`` runs the functions of this module.

Numerics. The output keeps the input's dtype; float32 and float16 input are computed in
float32, float64 in float64. The sums behind the statistics are accumulated in float64 (each
row of M values of one sample and channel is summed in the working dtype, the rows in
float64), and the variance is the mean of squared deviations from the mean (two passes),
never ``E[x^2] - E[x]^2``, which cancels catastrophically when the mean is large compared with
the spread. ``x - mu`` is subtracted in float64, so a float32 input with mean 1e4 and standard
deviation 1 keeps every digit.
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
    "KERNELS",
]

KERNELS: tuple[str, ...] = ("fast", "reference")
"""The kernels :class:`BatchNorm` can run: :mod:`bncourse.fast.numpy_bn` or this module's."""


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


def _check_forward(
    x: object, gamma: object, beta: object
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x, gamma, beta)`` checked; a missing ``gamma`` becomes ones, ``beta`` zeros."""
    x = _check_input(x)
    channels = x.shape[1]
    gamma = _check_per_channel("gamma", gamma, channels)
    beta = _check_per_channel("beta", beta, channels)
    _check_enough_values(x)
    gamma = np.ones(channels) if gamma is None else gamma
    beta = np.zeros(channels) if beta is None else beta
    return x, gamma, beta


def _check_upstream(dy: object, cache: BatchNormCache) -> np.ndarray:
    dy = _check_input(dy, "dy")
    if dy.shape != cache.x.shape:
        raise ValueError(
            f"dy must have the shape of the forward input {cache.x.shape}, got {dy.shape}"
        )
    return dy


def _working_dtype(dtype: np.dtype) -> np.dtype:
    """float64 stays float64; float32, float16 (and other floats) are computed in float32."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _channel_sum(a: np.ndarray, b: np.ndarray | None = None, dtype=None) -> np.ndarray:
    """``sum(a)`` or ``sum(a * b)`` over every axis but the channel axis, float64, shape (C,).

    Each row of M values (one sample, one channel) is summed in ``dtype`` (default the arrays'
    dtype), the N row sums then in float64.
    """
    a3 = a.reshape(a.shape[0], a.shape[1], -1)
    if a3.shape[2] == 1:  # (N, C): one value per row, sum the columns in float64 directly
        a2 = a3[:, :, 0]
        if b is None:
            return a2.sum(axis=0, dtype=np.float64)
        return np.einsum("nc,nc->c", a2, b.reshape(a2.shape), dtype=np.float64)
    if b is None:
        rows = np.einsum("ncm->nc", a3, dtype=dtype)
    else:
        rows = np.einsum("ncm,ncm->nc", a3, b.reshape(a3.shape), dtype=dtype)
    return rows.sum(axis=0, dtype=np.float64)


def _minus(x: np.ndarray, mu: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``x - mu`` for a per-channel float64 ``mu`` (C,), computed in ``dtype``, as x's shape.

    ``mu`` is split into a ``dtype`` number and a small remainder, ``mu = high + low``:
    ``x - high`` loses nothing to cancellation however large the mean is, then ``- low``.
    """
    mu = _per_channel(mu, x.ndim)
    high = mu.astype(dtype)
    centred = np.subtract(x, high, dtype=dtype)
    if dtype != np.float64:
        centred -= (mu - high).astype(dtype)
    return centred


# ---------------------------------------------------------------------------------------------
# Training-mode transform
# ---------------------------------------------------------------------------------------------


@dataclass
class BatchNormCache:
    """What the backward passes need from a forward pass.

    Attributes
    ----------
    x : np.ndarray, shape (N, C, *)
        The forward input (kept for the graph-based backward).
    x_hat : np.ndarray, shape (N, C, *), dtype of ``x``
        The normalised input.
    mean, var, inv_std : np.ndarray, float64, shape (C,)
        Batch mean, biased batch variance and ``1 / sqrt(var + eps)``.
    gamma : np.ndarray, float64, shape (C,)
        The scale (ones when the layer has no affine step).
    eps : float
        The ``eps`` of the forward pass.
    """

    x: np.ndarray
    x_hat: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    inv_std: np.ndarray
    gamma: np.ndarray
    eps: float


def batch_statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance of ``x`` (two passes, float64 sums).

    Parameters
    ----------
    x : np.ndarray, shape (N, C) or (N, C, *spatial)

    Returns
    -------
    mean, var : np.ndarray, float64, shape (C,)
        ``var`` divides by the number of values per channel (the biased estimate that batch
        norm normalises with); it is the mean of squared deviations from the mean, never
        ``E[x^2] - E[x]^2``.
    """
    x = _check_input(x)
    m = _values_per_channel(x)
    mu = _channel_sum(x, dtype=np.float64) / m
    x_mu = _minus(x, mu, np.dtype(np.float64))
    return mu, _channel_sum(x_mu, x_mu) / m


def batch_norm_forward(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, BatchNormCache]:
    """Batch-normalise ``x`` with its own batch statistics (training mode).

    .. math::  y = \\gamma\\,\\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}} + \\beta

    Parameters
    ----------
    x : np.ndarray, shape (N, C) or (N, C, *spatial)
        Input, any floating dtype.
    gamma : np.ndarray, shape (C,), or None
        Scale; ``None`` for no scaling (a layer with ``affine=False``).
    beta : np.ndarray, shape (C,), or None
        Shift; ``None`` for no shift.
    eps : float, default 1e-5
        Added to the variance for numerical stability.

    Returns
    -------
    out : np.ndarray, shape and dtype of ``x``
        The normalised, scaled and shifted input.
    cache : BatchNormCache
        What :func:`batch_norm_backward` needs.

    Raises
    ------
    ValueError
        Wrong rank, a parameter of the wrong size, or a single value per channel.
    TypeError
        A non-floating input or parameter.
    """
    x, gamma, beta = _check_forward(x, gamma, beta)
    m = _values_per_channel(x)  # values per channel: N * H * W ...
    dtype = _working_dtype(x.dtype)  # float32, or float64 for float64 input

    def col(v: np.ndarray) -> np.ndarray:  # (C,) -> (1, C, 1, ...), to broadcast against x
        return _per_channel(v, x.ndim).astype(dtype)

    mu = _channel_sum(x, dtype=np.float64) / m  # mean of each channel
    x_hat = _minus(x, mu, dtype)  # x - mu, normalised in place below
    var = _channel_sum(x_hat, x_hat) / m  # biased variance
    inv_std = 1.0 / np.sqrt(var + eps)
    x_hat *= col(inv_std)  # (x - mu) / sqrt(var + eps)
    out = x_hat * col(gamma)
    out += col(beta)

    x_hat = x_hat.astype(x.dtype, copy=False)
    cache = BatchNormCache(x, x_hat, mean=mu, var=var, inv_std=inv_std, gamma=gamma, eps=eps)
    return out.astype(x.dtype, copy=False), cache


def batch_norm_backward(
    dy: np.ndarray, cache: BatchNormCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of the training-mode transform, in the compact closed form.

    With :math:`g = \\partial L/\\partial y`, :math:`m` values per channel and sums over them,

    .. math::

        \\frac{\\partial L}{\\partial \\beta} = \\sum g, \\qquad
        \\frac{\\partial L}{\\partial \\gamma} = \\sum g\\,\\hat x, \\qquad
        \\frac{\\partial L}{\\partial x} = \\frac{\\gamma}{m\\sqrt{\\sigma^2+\\epsilon}}
        \\Big(m\\,g - \\sum g - \\hat x \\sum g\\,\\hat x\\Big)
        = \\frac{\\gamma}{\\sqrt{\\sigma^2+\\epsilon}}
        \\Big(g - \\overline{g} - \\hat x\\, \\overline{g\\hat x}\\Big),

    where a bar is the mean over the m values (the form the code computes).

    Parameters
    ----------
    dy : np.ndarray, shape of the forward input
        Upstream gradient :math:`g`.
    cache : BatchNormCache
        From :func:`batch_norm_forward`.

    Returns
    -------
    dx : np.ndarray, shape and dtype of the forward input
    dgamma, dbeta : np.ndarray, float64, shape (C,)
    """
    g = _check_upstream(dy, cache)
    dtype = _working_dtype(g.dtype)
    g = g.astype(dtype, copy=False)
    x_hat = cache.x_hat.astype(dtype, copy=False)
    m = _values_per_channel(g)

    def col(v: np.ndarray) -> np.ndarray:  # (C,) -> (1, C, 1, ...)
        return _per_channel(v, g.ndim).astype(dtype)

    dbeta = _channel_sum(g)  # sum of g
    dgamma = _channel_sum(g, x_hat)  # sum of g * x_hat
    scale = cache.gamma * cache.inv_std  # gamma / sqrt(var + eps)
    dx = x_hat * col(-dgamma / m)  # - x_hat * mean(g * x_hat) ...
    dx += g  # ... + g ...
    dx -= col(dbeta / m)  # ... - mean(g)
    dx *= col(scale)
    return dx.astype(cache.x.dtype, copy=False), dgamma, dbeta


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
    """Normalise ``x`` with fixed statistics: a per-channel affine map.

    .. math::  y = \\gamma\\,\\frac{x - \\mu_{run}}{\\sqrt{\\sigma^2_{run} + \\epsilon}} + \\beta

    Parameters
    ----------
    x : np.ndarray, shape (N, C) or (N, C, *spatial)
    running_mean, running_var : np.ndarray, shape (C,)
        The statistics to normalise with; ``running_var`` is used as given (PyTorch stores the
        unbiased estimate there).
    gamma, beta : np.ndarray, shape (C,), optional
        Scale and shift (default none).
    eps : float, default 1e-5

    Returns
    -------
    np.ndarray, shape and dtype of ``x``
        Centred first, ``(x - mean) * scale + beta``, so that it stays accurate for inputs with
        a large mean.
    """
    x = _check_input(x)
    channels = x.shape[1]
    mean = _check_per_channel("running_mean", running_mean, channels)
    var = _check_per_channel("running_var", running_var, channels)
    if mean is None or var is None:
        raise ValueError("running_mean and running_var are required in evaluation mode")
    gamma = _check_per_channel("gamma", gamma, channels)
    beta = _check_per_channel("beta", beta, channels)
    scale = 1.0 / np.sqrt(var + eps) if gamma is None else gamma / np.sqrt(var + eps)
    shift = np.zeros(channels) if beta is None else beta
    dtype = _working_dtype(x.dtype)
    y = _minus(x, mean, dtype) * _per_channel(scale, x.ndim).astype(dtype)
    y += _per_channel(shift, x.ndim).astype(dtype)
    return y.astype(x.dtype, copy=False)


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------


class BatchNorm:
    """A batch-norm layer with the semantics of ``torch.nn.BatchNorm1d/2d/3d``.

    Calling the layer runs the forward pass (training or evaluation mode, see :meth:`train`
    and :meth:`eval`); :meth:`backward` returns dL/dx and stores ``grad_weight`` and
    ``grad_bias``.

    Parameters
    ----------
    num_features : int
        C, the number of channels (axis 1 of the input).
    eps : float, default 1e-5
        Added to the variance before the square root.
    momentum : float or None, default 0.1
        Weight of the new batch in the running averages,
        ``running = (1 - momentum) * running + momentum * batch`` (PyTorch's convention;
        Keras calls ``1 - momentum`` its momentum). ``None`` gives a cumulative average over
        all batches seen, weighting batch k by ``1 / k``.
    affine : bool, default True
        Learn a scale ``weight`` (gamma, starts at 1) and a shift ``bias`` (beta, starts at
        0); if False both are ``None``.
    track_running_stats : bool, default True
        Keep ``running_mean`` (starts at 0), ``running_var`` (starts at 1; it stores the
        *unbiased* batch variance while training normalises with the biased one) and
        ``num_batches_tracked``. If False, batch statistics are used in evaluation mode too
        and the three buffers are ``None``.
    kernels : {"fast", "reference"}, default "fast"
        ``"fast"`` runs the training-mode forward and backward of
        :mod:`bncourse.fast.numpy_bn`; ``"reference"`` runs :func:`batch_norm_forward` and
        :func:`batch_norm_backward` of this module. Both give the same results within
        rounding; the fast ones take about 0.6 times the time on large inputs (see
        ``benchmarks/bench_numpy_bn.py``).

    Attributes
    ----------
    weight, bias : np.ndarray, float64, shape (C,), or None
        gamma and beta.
    running_mean, running_var : np.ndarray, float64, shape (C,), or None
    num_batches_tracked : int or None
    grad_weight, grad_bias : np.ndarray, float64, shape (C,), or None
        Set by :meth:`backward`.
    training : bool

    Notes
    -----
    Input and output have shape (N, C) or (N, C, *spatial) and the input's floating dtype.

    Examples
    --------
    >>> layer = BatchNorm(3)
    >>> y = layer(np.random.default_rng(0).standard_normal((8, 3)))
    >>> dx = layer.backward(np.ones((8, 3)))
    >>> bool(np.allclose(y.mean(axis=0), 0.0))
    True
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        kernels: str = "fast",
    ) -> None:
        if not isinstance(num_features, (int, np.integer)) or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        self.kernels = kernels
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
        """Normalise ``x`` of shape (N, C) or (N, C, *spatial) with C = ``num_features``.

        In training mode (or without running statistics) with the batch's statistics, updating
        the running ones; in evaluation mode with the running statistics. Returns an array of
        the shape and dtype of ``x``.
        """
        x = _check_input(x)
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"x must have {self.num_features} channels on axis 1 (num_features), got "
                f"shape {x.shape}"
            )
        use_batch_stats = self.training or not self.track_running_stats
        if use_batch_stats:
            previous, self._cache = self._cache, None  # free its memory before the next
            if self.kernels == "fast":
                # the previous forward's x_hat is private to this layer: reuse its memory
                workspace = None if previous is None else previous.x_hat
                del previous
                if workspace is not None:
                    workspace = workspace.reshape(workspace.shape[0], workspace.shape[1], -1)
                y, cache = _fast()._forward(x, self.weight, self.bias, self.eps, workspace)
            else:
                del previous
                y, cache = batch_norm_forward(x, self.weight, self.bias, self.eps)
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

        ``dy`` has the shape of the last forward input; the result has its shape and dtype.

        After a forward pass with batch statistics this is the closed form of
        :func:`batch_norm_backward`; after one with running statistics the transform is a fixed
        affine map and dx is simply ``gamma / sqrt(running_var + eps) * dy``.
        """
        if self._cache is not None:
            fast = self.kernels == "fast"
            backward = _fast().batch_norm_backward if fast else batch_norm_backward
            dx, dgamma, dbeta = backward(dy, self._cache)
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
        kernels = "" if self.kernels == "fast" else f", kernels={self.kernels!r}"
        return (
            f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}{kernels})"
        )


def _fast():
    """The module :mod:`bncourse.fast.numpy_bn` (imported here: it imports this one)."""
    from bncourse.fast import numpy_bn as fast

    return fast
