"""The normalisation family in PyTorch: one autograd Function, five layers by the choice of axes.

:func:`normalize` normalises its input over the given ``dims`` (subtracting the mean unless
``center=False``), then scales by ``weight`` and shifts by ``bias``; its backward is derived by
hand (the same closed form as :func:`bncourse.numpy_norm.normalize_backward`). The functional
forms below (same signatures as ``torch.nn.functional``'s) only pick the dims:

* :func:`layer_norm`: the trailing ``normalized_shape`` dims;
* :func:`rms_norm`: the same dims, without centring and without a shift;
* :func:`group_norm`: on the view ``(N, G, C // G, *spatial)``, dims ``2, 3, ...``;
* :func:`instance_norm`: the positions ``2, 3, ...`` (running statistics optional).

The modules :class:`LayerNorm`, :class:`GroupNorm`, :class:`InstanceNorm1d`,
:class:`InstanceNorm2d`, :class:`InstanceNorm3d` and :class:`RMSNorm` are drop-in replacements
of ``torch.nn``'s: same constructor arguments, parameters, buffers, ``state_dict`` keys, repr
and errors (the same exception types). Half-precision inputs are computed in float32 and the
result cast back, as PyTorch does.

The kernels: :func:`normalize_forward` and :func:`normalize_backward` here read like the math;
:mod:`bncourse.fast.torch_norm` has the same two tuned for speed, used by default on the inputs
they handle (:func:`use_kernels` or :func:`kernels` picks the reference): on a CPU one fused
loop per row in C, built on first use (:mod:`bncourse.fast.native`), else PyTorch operations
on chunks of rows. Inside ``torch.compile`` the reference runs, fused by the compiler.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from bncourse.utils import KernelChoice, signature_computed_once

__all__ = [
    "normalize",
    "normalize_forward",
    "normalize_backward",
    "use_kernels",
    "kernels",
    "layer_norm",
    "rms_norm",
    "group_norm",
    "instance_norm",
    "LayerNorm",
    "RMSNorm",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs (PyTorch's "opmath" type), else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


_ROW_BLOCK = 16  # rows summed together first by _sum_to_shape


def _sum_to_shape(a: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``a`` over the dims along which a tensor of ``shape`` was broadcast to ``a``.

    The broadcast dims among the last ``len(shape)`` go first (for GroupNorm and InstanceNorm,
    the positions: contiguous, summed while the rows are read), then the leading dims, in blocks
    of 16 rows (torch.compile then reads each block once, in the cache; a plain sum over many rows
    reads memory by columns, 2x slower here).
    """
    lead = a.dim() - len(shape)
    dims = tuple(lead + i for i, n in enumerate(shape) if n == 1 and a.shape[lead + i] != 1)
    if dims:
        a = a.sum(dim=dims, keepdim=True)
    if lead:
        rows = math.prod(a.shape[:lead])
        a = a.reshape(rows, *a.shape[lead:])
        if rows % _ROW_BLOCK == 0 and rows > _ROW_BLOCK:
            a = a.reshape(rows // _ROW_BLOCK, _ROW_BLOCK, *a.shape[1:]).sum(1)
        a = a.sum(0)
    return a.reshape(shape)


def _broadcast_dims(x: Tensor, param: Tensor | None, dims: tuple[int, ...]) -> tuple[int, ...]:
    """The dims among ``dims`` along which ``param`` (broadcast to ``x``) is constant."""
    if param is None:
        return dims
    shape = (1,) * (x.dim() - param.dim()) + tuple(param.shape)
    return tuple(d for d in dims if shape[d] == 1)


def _moments(x: Tensor, dims: tuple[int, ...], center: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(t, shift, variance)`` over ``dims``: ``t = x - pivot``, one sample of each slice (so a
    large mean cancels exactly and a constant slice gives exactly 0), ``shift = mean(t)`` and the
    biased ``variance = mean(t**2) - shift**2`` (both sums in one pass; ``shift`` is small, of the
    order of the spread). Without centring: ``t = x``, ``shift = 0``, the mean square."""
    if not center:
        return x, x.new_zeros(()), (x * x).mean(dim=dims, keepdim=True)
    pivot = x
    for d in dims:
        pivot = pivot.narrow(d, 0, 1)
    t = x - pivot
    shift = t.mean(dim=dims, keepdim=True)
    variance = ((t * t).mean(dim=dims, keepdim=True) - shift * shift).clamp(min=0)
    return t, shift, variance


def normalize_forward(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    dims: tuple[int, ...],
    eps: float,
    center: bool,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The reference forward: ``y = weight * (x - mean) / sqrt(var + eps) + bias`` over ``dims``.

    Returns ``(y, (input,))``: the output, and what the backward needs: the input alone (the
    backward recomputes the statistics while it reads the input; nothing centred is kept).
    """
    x = input.to(_compute_dtype(input.dtype))
    t, shift, variance = _moments(x, dims, center)  # x - mean = t - shift
    x_hat = (t - shift) * torch.rsqrt(variance + eps)
    y = x_hat if weight is None else x_hat * weight
    y = y if bias is None else y + bias
    return y.to(input.dtype), (input,)


def normalize_backward(
    dy: Tensor,
    saved: tuple[Tensor, ...],
    weight: Tensor | None,
    bias_shape: torch.Size | None,
    dims: tuple[int, ...],
    center: bool,
    needs: tuple[bool, bool, bool],
    eps: float,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The reference backward of :func:`normalize_forward`: ``(dx, dweight, dbias)``.

    With ``g = weight * dy``: ``dx = (g - mean(g) - x_hat * mean(g * x_hat)) / sigma`` (no
    ``mean(g)`` without centring); ``dweight`` and ``dbias`` are the sums of ``dy * x_hat`` and
    ``dy`` over the dims along which they were broadcast. None where ``needs`` says no.
    All the means are of ``x`` (through ``t``), ``g`` and ``g * t``: one pass takes them all.
    """
    (input,) = saved
    x = input.to(_compute_dtype(input.dtype))
    t, shift, variance = _moments(x, dims, center)
    inv_std = torch.rsqrt(variance + eps)
    dy_out = dy.to(x.dtype)
    count = math.prod([x.shape[d] for d in dims])
    param = (
        weight if weight is not None else (None if bias_shape is None else x.new_empty(bias_shape))
    )
    inner = _broadcast_dims(x, param, dims)
    w = 1 if weight is None else weight
    if inner:
        # the sums of dy and dy * t over the dims where the parameters are constant (the
        # positions of GroupNorm and InstanceNorm) first: the later sums start from these
        sum_dy = dy_out.sum(dim=inner, keepdim=True)
        sum_dy_x_hat = ((dy_out * t).sum(dim=inner, keepdim=True) - shift * sum_dy) * inv_std
        g_mean = (sum_dy * w).sum(dim=dims, keepdim=True) / count  # with g = weight * dy
        projection = (sum_dy_x_hat * w).sum(dim=dims, keepdim=True) / count  # mean(g * x_hat)
    else:  # LayerNorm, RMSNorm: a parameter per position
        g = dy_out * w
        g_mean = g.mean(dim=dims, keepdim=True)
        projection = ((g * t).mean(dim=dims, keepdim=True) - shift * g_mean) * inv_std
        sum_dy = dy_out
        sum_dy_x_hat = dy_out * ((t - shift) * inv_std)
    dx = dweight = dbias = None
    if needs[0]:
        x_hat = (t - shift) * inv_std
        dx = dy_out * w - x_hat * projection
        if center:
            dx = dx - g_mean
        dx = (dx * inv_std).to(dy.dtype)
    if weight is not None and needs[1]:
        dweight = _sum_to_shape(sum_dy_x_hat, weight.shape).to(weight.dtype)
    if bias_shape is not None and needs[2]:
        dbias = _sum_to_shape(sum_dy, bias_shape)
    return dx, dweight, dbias


# ---------------------------------------------------------------------------------------------
# Which kernels run: a context variable, switched by a function or a context manager
# ---------------------------------------------------------------------------------------------

KERNELS = ("fast", "reference")
_KERNELS = KernelChoice("bncourse_torch_norm_kernels", KERNELS)
_check_kernels_name = _KERNELS.check


def use_kernels(name: str) -> str:
    """Choose the kernels of :func:`normalize` and of the modules.

    Parameters
    ----------
    name : {"fast", "reference"}
        ``"fast"`` (the default): :mod:`bncourse.fast.torch_norm`, the same formulas in one
        fused C loop per row on a CPU (where a C compiler built it), else as PyTorch operations
        over chunks of rows that stay in the cache (inputs it does not handle, such as
        non-contiguous or half-precision ones, use the reference). ``"reference"``:
        :func:`normalize_forward` and :func:`normalize_backward` of this module, which read
        like the book. Inside ``torch.compile`` the reference formulas run, fused by the
        compiler.

    Returns
    -------
    str
        The previous choice, so that ``previous = use_kernels("reference"); ...;
        use_kernels(previous)`` restores it (a :mod:`contextvars` variable, as in
        :func:`bncourse.torch_bn.use_kernels`).
    """
    return _KERNELS.set(name)


@contextlib.contextmanager
def kernels(name: str) -> Iterator[None]:
    """Context manager: :func:`use_kernels` ``(name)`` inside the block, the previous choice
    after it (also when the block raises). ``with torch_norm.kernels("reference"): ...``."""
    with _KERNELS.scoped(name):
        yield


def _use_fast(
    name: str | None, input: Tensor, weight: Tensor | None, bias: Tensor | None, dims: tuple
) -> bool:
    """Whether the fast kernels run: chosen, not compiling, and an input they handle."""
    from bncourse.fast import torch_norm as fast  # the fast layer sits on top of this module

    if torch.compiler.is_compiling():
        return False
    name = _KERNELS.get() if name is None else _check_kernels_name(name)
    return name == "fast" and fast.supports(input, weight, bias, dims)


@signature_computed_once
class _Normalize(torch.autograd.Function):
    """``y = weight * (x - mean) / sqrt(var + eps) + bias`` over ``dims``, hand-derived backward."""

    @staticmethod
    def forward(ctx, input, weight, bias, dims, eps, center, kernels):
        fast = _use_fast(kernels, input, weight, bias, dims)
        if fast:
            from bncourse.fast import torch_norm as fast_kernels

            y, saved = fast_kernels.normalize_forward(input, weight, bias, dims, eps, center)
        else:
            y, saved = normalize_forward(input, weight, bias, dims, eps, center)
        ctx.save_for_backward(*saved, weight)
        ctx.dims, ctx.eps, ctx.center, ctx.fast = dims, eps, center, fast
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        *saved, weight = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        args = (weight, ctx.bias_shape, ctx.dims, ctx.center, needs, ctx.eps)
        if ctx.fast and not torch.is_grad_enabled():
            from bncourse.fast import torch_norm as fast_kernels

            grads = fast_kernels.normalize_backward(dy, tuple(saved), *args)
        else:  # (a recorded backward, for a double backward, recomputes from the input alone)
            grads = normalize_backward(dy, tuple(saved[:1]), *args)
        dx, dweight, dbias = grads
        dbias = None if dbias is None else dbias.to(ctx.bias_dtype)
        return dx, dweight, dbias, None, None, None, None


def normalize(
    input: Tensor,
    dims: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    center: bool = True,
    kernels: str | None = None,
) -> Tensor:
    """Normalise ``input`` over ``dims``, then scale and shift: the whole family in one function.

    Parameters
    ----------
    input : Tensor, any shape
    dims : int or sequence of int
        Dims of the statistics (mean and biased variance, one pair per position of the others).
    weight, bias : Tensor, optional
        Scale and shift, broadcastable to ``input``; ``bias`` needs a ``weight`` of its shape
        or is broadcast on its own.
    eps : float, default 1e-5
    center : bool, default True
        False divides by the root mean square instead (RMSNorm).
    kernels : {"fast", "reference"}, optional
        Which kernels run; None follows :func:`use_kernels` (``"fast"`` unless changed).

    Returns
    -------
    Tensor, shape and dtype of ``input``
    """
    dims = (dims,) if isinstance(dims, int) else tuple(sorted(d % input.dim() for d in dims))
    if input.numel() == 0:  # nothing to normalise: an empty output, still in the graph
        output = input if weight is None else input * weight
        return output if bias is None else output + bias
    if bias is not None and weight is None:
        # a shift alone: normalise, then add (autograd handles the addition)
        return _Normalize.apply(input, None, None, dims, float(eps), center, kernels) + bias
    return _Normalize.apply(input, weight, bias, dims, float(eps), center, kernels)


def _as_shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    return tuple(int(n) for n in normalized_shape)


def _check_trailing(input: Tensor, shape: tuple[int, ...]) -> None:
    if input.dim() < len(shape) or tuple(input.shape[input.dim() - len(shape) :]) != shape:
        raise RuntimeError(
            f"Given normalized_shape={list(shape)}, expected input with shape "
            f"[*, {', '.join(map(str, shape))}], but got input of size {list(input.shape)}"
        )


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Layer norm over the trailing ``normalized_shape`` dims (``torch.nn.functional.layer_norm``).

    ``input`` (*, *normalized_shape); ``weight`` and ``bias`` of shape ``normalized_shape``.
    """
    shape = _as_shape(normalized_shape)
    _check_trailing(input, shape)
    return normalize(input, tuple(range(-len(shape), 0)), weight, bias, eps)


def rms_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """RMS norm over the trailing ``normalized_shape`` dims (``torch.nn.functional.rms_norm``).

    ``eps=None`` uses the machine epsilon of the computation's dtype (float32 for float16 and
    bfloat16 inputs, which are computed in float32, as in PyTorch).
    """
    shape = _as_shape(normalized_shape)
    _check_trailing(input, shape)
    if eps is None:
        eps = torch.finfo(_compute_dtype(input.dtype)).eps
    return normalize(input, tuple(range(-len(shape), 0)), weight, None, eps, center=False)


def _per_channel(tensor: Tensor | None, shape: Sequence[int]) -> Tensor | None:
    return None if tensor is None else tensor.reshape(shape)


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Group norm of ``input`` (N, C, *): per example over each group of ``C // num_groups``
    channels and all positions (``torch.nn.functional.group_norm``)."""
    if input.dim() < 2:
        raise RuntimeError(
            f"Expected at least 2 dimensions for input tensor but received {input.dim()}"
        )
    n, c = input.shape[:2]
    if c % num_groups:
        raise RuntimeError(
            f"Expected number of channels in input to be divisible by num_groups, but got "
            f"input of shape {list(input.shape)} and num_groups={num_groups}"
        )
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.numel() != c:
            raise RuntimeError(
                f"Expected {name} to be a vector of size equal to the number of channels in "
                f"input, but got {name} of shape {list(tensor.shape)} and input of shape "
                f"{list(input.shape)}"
            )
    grouped = (n, num_groups, c // num_groups, *input.shape[2:])
    param = (1, num_groups, c // num_groups) + (1,) * (input.dim() - 2)
    w, b = _per_channel(weight, param), _per_channel(bias, param)
    dims = tuple(range(2, len(grouped)))
    return normalize(input.reshape(grouped), dims, w, b, eps).reshape(input.shape)


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Instance norm of ``input`` (N, C, *spatial) (``torch.nn.functional.instance_norm``).

    With ``use_input_stats`` each example's channel is normalised over its positions; running
    statistics, when given, move towards the batch average of the per-instance mean and
    unbiased variance with weight ``momentum``. Without it the running statistics are used.
    """
    if input.dim() < 3:
        raise ValueError(f"instance norm needs (N, C, *spatial) input, got {input.dim()}D input")
    view = (1, -1) + (1,) * (input.dim() - 2)
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError("Expected running_mean and running_var when use_input_stats=False")
        x = input.to(_compute_dtype(input.dtype))
        y = (x - running_mean.reshape(view)) * torch.rsqrt(running_var.reshape(view) + eps)
        y = y if weight is None else y * weight.reshape(view)
        y = y if bias is None else y + bias.reshape(view)
        return y.to(input.dtype)
    if input.shape[2:].numel() <= 1:
        raise ValueError(
            "Expected more than 1 spatial element when training, got input size "
            f"{list(input.shape)}"
        )
    dims = tuple(range(2, input.dim()))
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            x = input.detach().to(running_mean.dtype)
            mean = x.mean(dim=dims).mean(dim=0)
            var = x.var(dim=dims, correction=1).mean(dim=0)
            running_mean.mul_(1 - momentum).add_(momentum * mean)
            running_var.mul_(1 - momentum).add_(momentum * var)
    return normalize(input, dims, _per_channel(weight, view), _per_channel(bias, view), eps)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


def _register_affine(
    module: nn.Module, shape: tuple[int, ...], affine: bool, bias: bool, factory: dict
) -> None:
    """Register ``weight`` (and ``bias`` when asked) of ``shape``, or None, as torch.nn does."""
    weight = nn.Parameter(torch.empty(shape, **factory)) if affine else None
    module.register_parameter("weight", weight)
    shift = nn.Parameter(torch.empty(shape, **factory)) if affine and bias else None
    module.register_parameter("bias", shift)


def _reset_affine(module: nn.Module) -> None:
    """``weight`` to 1 and ``bias`` to 0 (where they exist)."""
    if module.weight is not None:
        nn.init.ones_(module.weight)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


class LayerNorm(nn.Module):
    """Drop-in :class:`torch.nn.LayerNorm`: normalise each example over ``normalized_shape``.

    Parameters
    ----------
    normalized_shape : int or sequence of int
        The trailing dims to normalise over (one statistic per leading position).
    eps : float, default 1e-5
    elementwise_affine : bool, default True
        Learn ``weight`` (ones) and ``bias`` (zeros) of shape ``normalized_shape``.
    bias : bool, default True
        With ``elementwise_affine``, whether to learn the shift.
    device, dtype
        Where and in which dtype to create the parameters.
    """

    __constants__ = ["normalized_shape", "eps", "elementwise_affine"]

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        factory = {"device": device, "dtype": dtype}
        _register_affine(self, self.normalized_shape, elementwise_affine, bias, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``weight`` to 1 and ``bias`` to 0."""
        _reset_affine(self)

    def forward(self, input: Tensor) -> Tensor:
        """(*, *normalized_shape) -> the same shape."""
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}, bias={self.bias is not None}"
        )


class RMSNorm(nn.Module):
    """Drop-in :class:`torch.nn.RMSNorm`: divide by the root mean square over the trailing dims.

    Parameters
    ----------
    normalized_shape : int or sequence of int
    eps : float or None, default None
        None: the machine epsilon of the computation's dtype (``torch.finfo``).
    elementwise_affine : bool, default True
        Learn ``weight`` (ones) of shape ``normalized_shape``; there is no shift.
    device, dtype
    """

    __constants__ = ["normalized_shape", "eps", "elementwise_affine"]

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(
                torch.empty(self.normalized_shape, device=device, dtype=dtype)
            )
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``weight`` to 1."""
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        """(*, *normalized_shape) -> the same shape."""
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        )


class GroupNorm(nn.Module):
    """Drop-in :class:`torch.nn.GroupNorm`: per example over groups of channels and positions.

    Parameters
    ----------
    num_groups : int
        Number of groups G; ``num_channels`` must be divisible by it (else ValueError).
    num_channels : int
    eps : float, default 1e-5
    affine : bool, default True
        Learn per-channel ``weight`` (ones) and ``bias`` (zeros) of shape (C,).
    device, dtype
    bias : bool, keyword-only, default True
        With ``affine``, whether to learn the shift.
    """

    __constants__ = ["num_groups", "num_channels", "eps", "affine"]

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if num_channels % num_groups != 0:
            raise ValueError(
                f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})"
            )
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        factory = {"device": device, "dtype": dtype}
        _register_affine(self, (num_channels,), affine, bias, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``weight`` to 1 and ``bias`` to 0."""
        _reset_affine(self)

    def forward(self, input: Tensor) -> Tensor:
        """(N, C, *) -> the same shape."""
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
            f"bias={self.bias is not None}"
        )


class _InstanceNorm(nn.Module):
    """Shared logic of the InstanceNorm modules (torch's ``_NormBase`` and ``_InstanceNorm``).

    Parameters
    ----------
    num_features : int
        Number of channels C.
    eps : float, default 1e-5
    momentum : float or None, default 0.1
        Weight of a new batch in the running statistics (None: 0, no update, as in PyTorch).
    affine : bool, default False
        Learn per-channel ``weight`` and ``bias``.
    track_running_stats : bool, default False
        Keep ``running_mean``, ``running_var`` and ``num_batches_tracked`` and use them in
        evaluation mode.
    device, dtype
    bias : bool, keyword-only, default True
    """

    _version = 2
    _no_batch_dim = 0  # rank of an unbatched input, set by the subclasses
    __constants__ = ["track_running_stats", "momentum", "eps", "num_features", "affine"]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        factory = {"device": device, "dtype": dtype}
        _register_affine(self, (num_features,), affine, bias, factory)
        stats = {"running_mean": None, "running_var": None, "num_batches_tracked": None}
        if track_running_stats:
            stats = {
                "running_mean": torch.zeros(num_features, **factory),
                "running_var": torch.ones(num_features, **factory),
                "num_batches_tracked": torch.tensor(0, dtype=torch.long, device=device),
            }
        for name, tensor in stats.items():
            self.register_buffer(name, tensor)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, ``num_batches_tracked`` 0."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics, ``weight`` to 1 and ``bias`` to 0."""
        self.reset_running_stats()
        _reset_affine(self)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # checkpoints from before PyTorch 0.4 hold running statistics that are not tracked now
        if local_metadata.get("version", None) is None and not self.track_running_stats:
            names = (prefix + "running_mean", prefix + "running_var")
            stale = [key for key in names if key in state_dict]
            if stale:
                error_msgs.append(
                    f"Unexpected running stats buffer(s) {' and '.join(stale)} for "
                    f"{type(self).__name__} with track_running_stats=False: remove them from "
                    "state_dict, or set track_running_stats=True to use them."
                )
                for key in stale:
                    state_dict.pop(key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, input: Tensor) -> Tensor:
        """(N, C, *spatial) or unbatched (C, *spatial) -> the same shape."""
        rank = self._no_batch_dim
        if input.dim() not in (rank, rank + 1):
            raise ValueError(f"expected {rank}D or {rank + 1}D input (got {input.dim()}D input)")
        feature_dim = input.dim() - rank
        if input.size(feature_dim) != self.num_features:
            if self.affine:
                raise ValueError(
                    f"expected input's size at dim={feature_dim} to match num_features"
                    f" ({self.num_features}), but got: {input.size(feature_dim)}."
                )
            warnings.warn(
                f"input's size at dim={feature_dim} does not match num_features. You can "
                "silence this warning by not passing in num_features, which is not used "
                "because affine=False",
                stacklevel=2,
            )
        unbatched = input.dim() == rank
        x = input.unsqueeze(0) if unbatched else input
        use_input_stats = self.training or not self.track_running_stats
        y = instance_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            use_input_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )
        return y.squeeze(0) if unbatched else y


class InstanceNorm1d(_InstanceNorm):
    """Drop-in :class:`torch.nn.InstanceNorm1d`: input (N, C, L) or (C, L)."""

    _no_batch_dim = 2


class InstanceNorm2d(_InstanceNorm):
    """Drop-in :class:`torch.nn.InstanceNorm2d`: input (N, C, H, W) or (C, H, W)."""

    _no_batch_dim = 3


class InstanceNorm3d(_InstanceNorm):
    """Drop-in :class:`torch.nn.InstanceNorm3d`: input (N, C, D, H, W) or (C, D, H, W)."""

    _no_batch_dim = 4
