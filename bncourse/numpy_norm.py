"""One normalisation in NumPy, from which the whole family follows by the choice of axes.

Every layer of chapter 7 computes, for some set of ``axes`` of its input,

.. math::

    \\hat x = \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}}, \\qquad y = \\gamma \\hat x + \\beta,

with :math:`\\mu` and :math:`\\sigma^2` the mean and the biased variance over ``axes`` (one
statistic per position of the other axes). RMSNorm skips the centring: :math:`\\mu = 0` and
:math:`\\sigma^2` is the mean square. The layers differ only in the axes, for an input of shape
``(N, C, *spatial)``:

==============  =====================================================================
layer           axes of the statistics
==============  =====================================================================
BatchNorm       the batch and the positions ``(0, 2, 3, ...)``: one statistic per channel
LayerNorm       the trailing ``len(normalized_shape)`` axes: one statistic per example
InstanceNorm    the positions ``(2, 3, ...)``: one per example and channel
GroupNorm       the channels of one group and the positions, on the view
                ``(N, G, C // G, *spatial)``: one per example and group
RMSNorm         as LayerNorm, without centring
==============  =====================================================================

:func:`normalize_forward` and :func:`normalize_backward` are the general pair; the named
functions below only choose the axes and the shape of ``gamma`` and ``beta``.
:func:`shared_statistics` answers, by perturbing the input, which elements share statistics
with a given one (chapter 7 draws its axes figure from it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "NormCache",
    "normalize_forward",
    "normalize_backward",
    "batch_norm",
    "layer_norm",
    "instance_norm",
    "group_norm",
    "rms_norm",
    "NORM_LAYERS",
    "shared_statistics",
]


@dataclass
class NormCache:
    """What :func:`normalize_backward` needs from the forward pass.

    Attributes
    ----------
    x_hat : np.ndarray, shape of the input
        The normalised input.
    inv_std : np.ndarray, shape of the input with ``axes`` of size 1
        ``1 / sqrt(var + eps)`` (``1 / sqrt(mean square + eps)`` without centring).
    axes : tuple of int
        The axes the statistics were taken over (non-negative).
    center : bool
        Whether the mean was subtracted.
    gamma : np.ndarray or None
        The scale, broadcastable to the input.
    has_beta : bool
        Whether a shift was added.
    """

    x_hat: np.ndarray
    inv_std: np.ndarray
    axes: tuple[int, ...]
    center: bool
    gamma: np.ndarray | None
    has_beta: bool


def _normalize_axes(axes: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
    if not axes:
        raise ValueError("axes must name at least one axis of x")
    result = []
    for axis in axes:
        if not -ndim <= axis < ndim:
            raise ValueError(f"axis {axis} is out of range for x with {ndim} dimensions")
        result.append(int(axis) % ndim)
    if len(set(result)) != len(result):
        raise ValueError(f"axes must be distinct, got {axes}")
    return tuple(sorted(result))


def _check_broadcast(name: str, value: np.ndarray | None, shape: tuple[int, ...]) -> None:
    if value is None:
        return
    try:
        fits = value.ndim <= len(shape) and np.broadcast_shapes(value.shape, shape) == shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"{name} of shape {value.shape} does not broadcast to x's shape {shape}")


def normalize_forward(
    x: np.ndarray,
    axes: int | Sequence[int],
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    eps: float = 1e-5,
    center: bool = True,
) -> tuple[np.ndarray, NormCache]:
    """Normalise ``x`` over ``axes``, then scale by ``gamma`` and shift by ``beta``.

    Parameters
    ----------
    x : np.ndarray, any shape
        The input; at least one value along ``axes``.
    axes : int or sequence of int
        The axes the mean and variance are taken over.
    gamma, beta : np.ndarray, optional
        Scale and shift, broadcastable to ``x`` (e.g. ``(1, C, 1, 1)`` per channel, or
        ``normalized_shape`` for the trailing axes); None leaves them out.
    eps : float, default 1e-5
        Added to the variance.
    center : bool, default True
        Subtract the mean; False gives RMS normalisation (divide by the root mean square).

    Returns
    -------
    y : np.ndarray, shape of ``x``
    cache : NormCache
    """
    x = np.asarray(x)
    axes = _normalize_axes(axes, x.ndim)
    if any(x.shape[a] == 0 for a in axes):
        raise ValueError(f"x of shape {x.shape} has no values along axes {axes}")
    _check_broadcast("gamma", gamma, x.shape)
    _check_broadcast("beta", beta, x.shape)
    if center:
        x = x - x.mean(axis=axes, keepdims=True)
    variance = np.mean(x * x, axis=axes, keepdims=True)  # biased, or the mean square
    inv_std = 1.0 / np.sqrt(variance + eps)
    x_hat = x * inv_std
    y = x_hat if gamma is None else gamma * x_hat
    if beta is not None:
        y = y + beta
    cache = NormCache(x_hat, inv_std, axes, center, gamma, beta is not None)
    return y.astype(x.dtype, copy=False), cache


def _sum_to_shape(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum ``a`` over the axes along which an array of ``shape`` was broadcast to ``a``."""
    lead = a.ndim - len(shape)
    summed = a.sum(axis=tuple(range(lead))) if lead else a
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and summed.shape[i] != 1)
    return summed.sum(axis=axes, keepdims=True).reshape(shape)


def normalize_backward(
    dy: np.ndarray, cache: NormCache
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Gradients of :func:`normalize_forward`, in closed form.

    With :math:`g = \\gamma\\,\\partial L/\\partial y` and means over the ``axes``,

    .. math::

        \\frac{\\partial L}{\\partial x} = \\frac{1}{\\sigma}
        \\Big(g - \\overline{g} - \\hat x\\,\\overline{g\\,\\hat x}\\Big),

    where the term :math:`\\overline{g}` (from the mean) is absent without centring.
    :math:`\\partial L/\\partial\\gamma` and :math:`\\partial L/\\partial\\beta` are the sums of
    :math:`\\partial L/\\partial y\\,\\hat x` and :math:`\\partial L/\\partial y` over the axes
    along which ``gamma`` and ``beta`` were broadcast.

    Parameters
    ----------
    dy : np.ndarray, shape of the input
        Upstream gradient.
    cache : NormCache
        From :func:`normalize_forward`.

    Returns
    -------
    dx : np.ndarray, shape of the input
    dgamma : np.ndarray of gamma's shape, or None
    dbeta : np.ndarray of beta's shape (gamma's), or None
    """
    dy = np.asarray(dy)
    if dy.shape != cache.x_hat.shape:
        raise ValueError(f"dy has shape {dy.shape}, expected {cache.x_hat.shape}")
    gamma = cache.gamma
    g = dy if gamma is None else dy * gamma
    axes = cache.axes
    projection = np.mean(g * cache.x_hat, axis=axes, keepdims=True)
    dx = g - cache.x_hat * projection
    if cache.center:
        dx = dx - np.mean(g, axis=axes, keepdims=True)
    dx = dx * cache.inv_std
    dgamma = None if gamma is None else _sum_to_shape(dy * cache.x_hat, gamma.shape)
    param_shape = () if gamma is None else gamma.shape
    dbeta = _sum_to_shape(dy, param_shape) if cache.has_beta else None
    return dx.astype(cache.x_hat.dtype, copy=False), dgamma, dbeta


# ---------------------------------------------------------------------------------------------
# The family: each function chooses the axes and the shape of gamma and beta
# ---------------------------------------------------------------------------------------------


def _per_channel(value: np.ndarray | None, ndim: int) -> np.ndarray | None:
    """Reshape a (C,) vector to (1, C, 1, ...) for an input of ``ndim`` dimensions."""
    return None if value is None else np.reshape(value, (1, -1) + (1,) * (ndim - 2))


def batch_norm(x, gamma=None, beta=None, eps=1e-5):
    """Batch norm (training mode) of ``x`` (N, C, *spatial): per channel over batch and positions.

    Returns ``(y, cache)``; ``gamma`` and ``beta`` have shape (C,).
    """
    x = np.asarray(x)
    axes = (0,) + tuple(range(2, x.ndim))
    g, b = _per_channel(gamma, x.ndim), _per_channel(beta, x.ndim)
    return normalize_forward(x, axes, g, b, eps)


def layer_norm(x, normalized_shape, gamma=None, beta=None, eps=1e-5):
    """Layer norm of ``x`` (*, *normalized_shape) over its trailing ``normalized_shape`` axes.

    Returns ``(y, cache)``; ``gamma`` and ``beta`` have shape ``normalized_shape``.
    """
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    x = np.asarray(x)
    if x.shape[x.ndim - len(shape) :] != shape:
        raise ValueError(f"x of shape {x.shape} does not end in normalized_shape {shape}")
    return normalize_forward(x, tuple(range(-len(shape), 0)), gamma, beta, eps)


def rms_norm(x, normalized_shape, gamma=None, eps=1e-6):
    """RMS norm of ``x`` (*, *normalized_shape): layer norm's axes without centring or shift.

    Returns ``(y, cache)``; ``gamma`` has shape ``normalized_shape``.
    """
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    x = np.asarray(x)
    if x.shape[x.ndim - len(shape) :] != shape:
        raise ValueError(f"x of shape {x.shape} does not end in normalized_shape {shape}")
    return normalize_forward(x, tuple(range(-len(shape), 0)), gamma, None, eps, center=False)


def instance_norm(x, gamma=None, beta=None, eps=1e-5):
    """Instance norm of ``x`` (N, C, *spatial): per example and channel over the positions.

    Returns ``(y, cache)``; ``gamma`` and ``beta`` have shape (C,).
    """
    x = np.asarray(x)
    if x.ndim < 3:
        raise ValueError(f"instance norm needs x of shape (N, C, *spatial), got {x.shape}")
    g, b = _per_channel(gamma, x.ndim), _per_channel(beta, x.ndim)
    return normalize_forward(x, tuple(range(2, x.ndim)), g, b, eps)


def group_norm(x, num_groups, gamma=None, beta=None, eps=1e-5):
    """Group norm of ``x`` (N, C, *spatial): per example over each group of C // G channels.

    Computed on the view ``(N, G, C // G, *spatial)`` normalised over its axes 2, 3, ...;
    ``gamma`` and ``beta`` of shape (C,) are viewed as ``(1, G, C // G, 1, ...)`` to match.

    Returns
    -------
    y : np.ndarray, shape of ``x``
    cache : NormCache
        For the grouped view: reshape ``dy`` to ``(N, G, C // G, *spatial)`` before
        :func:`normalize_backward` and its results back (``dgamma.reshape(C)``).
    """
    x = np.asarray(x)
    n, c = x.shape[:2]
    if c % num_groups:
        raise ValueError(f"num_channels ({c}) must be divisible by num_groups ({num_groups})")
    grouped = (n, num_groups, c // num_groups) + x.shape[2:]
    param = (1, num_groups, c // num_groups) + (1,) * (x.ndim - 2)
    g = None if gamma is None else np.reshape(gamma, param)
    b = None if beta is None else np.reshape(beta, param)
    y, cache = normalize_forward(x.reshape(grouped), tuple(range(2, len(grouped))), g, b, eps)
    return y.reshape(x.shape), cache


NORM_LAYERS: dict[str, dict] = {
    "BatchNorm": dict(function=batch_norm),
    "LayerNorm": dict(function=layer_norm, takes_shape=True),
    "InstanceNorm": dict(function=instance_norm),
    "GroupNorm": dict(function=group_norm, takes_groups=True),
    "RMSNorm": dict(function=rms_norm, takes_shape=True),
}
"""The named layers of this module, for :func:`shared_statistics`."""


def shared_statistics(
    layer: str, shape: Sequence[int], index: Sequence[int], num_groups: int = 2
) -> np.ndarray:
    """Which elements of an input of ``shape`` share statistics with element ``index``.

    Found by experiment, not from a table: the layer's output at ``index`` is recomputed after
    adding 1 to each element in turn (one forward per element, so keep ``shape`` small). An
    element enters the statistics of ``index`` exactly when that output changes.

    Parameters
    ----------
    layer : {"BatchNorm", "LayerNorm", "InstanceNorm", "GroupNorm", "RMSNorm"}
    shape : sequence of int
        The input shape (N, C, *spatial); keep it small (one forward per element).
    index : sequence of int
        The element whose statistics are asked for.
    num_groups : int, default 2
        For GroupNorm.

    Returns
    -------
    np.ndarray of bool, shape ``shape``
    """
    if layer not in NORM_LAYERS:
        raise ValueError(f"layer must be one of {tuple(NORM_LAYERS)}, got {layer!r}")
    spec = NORM_LAYERS[layer]
    shape, index = tuple(shape), tuple(index)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape)

    def output_at(inputs: np.ndarray) -> float:
        if spec.get("takes_shape"):
            y, _ = spec["function"](inputs, shape[1:])
        elif spec.get("takes_groups"):
            y, _ = spec["function"](inputs, num_groups)
        else:
            y, _ = spec["function"](inputs)
        return float(y[index])

    base = output_at(x)
    shared = np.zeros(shape, dtype=bool)
    for position in np.ndindex(*shape):
        bumped = x.copy()
        bumped[position] += 1.0
        shared[position] = abs(output_at(bumped) - base) > 1e-9
    return shared
