"""Frozen batch norm: a batch-norm layer whose statistics and (by default) affine map never change.

A fine-tuned network often should *not* update its batch-norm statistics: fine-tuning batches
are small (detection and segmentation fine-tune with a few images per device), and the
statistics of a small batch are noisy estimates of the population's. Setting
``requires_grad=False`` on gamma and beta does not help: the running statistics are buffers,
updated by every forward pass in training mode, not by the optimizer. Calling ``bn.eval()``
works until the training loop calls ``model.train()`` again.

:class:`FrozenBatchNorm1d`, :class:`FrozenBatchNorm2d` and :class:`FrozenBatchNorm3d` remove the
problem: they hold ``running_mean``, ``running_var`` and (unless ``affine_trainable``) ``weight``
and ``bias`` as buffers, and compute the evaluation-mode map of batch norm,

.. math::

    y = s \\, x + t, \\qquad s = \\frac{\\gamma}{\\sqrt{\\sigma^2 + \\epsilon}}, \\quad
    t = \\beta - s \\, \\mu ,

in training and evaluation mode alike. :func:`freeze_batch_norm` converts every batch norm of a
model (``torch.nn`` or :mod:`bncourse.torch_bn`), :func:`unfreeze_batch_norm` converts back.
torchvision's ``FrozenBatchNorm2d`` (used for detection backbones) is the same idea.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from bncourse import torch_bn
from bncourse.inference import is_batch_norm

__all__ = [
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "freeze_batch_norm",
    "unfreeze_batch_norm",
    "is_frozen_batch_norm",
]


class _FrozenBatchNorm(nn.Module):
    """Shared logic of :class:`FrozenBatchNorm1d`, :class:`FrozenBatchNorm2d`, ``...3d``.

    Parameters
    ----------
    num_features : int
        Number of channels ``C``.
    eps : float, default 1e-5
        Added to the variance before the square root.
    affine_trainable : bool, default False
        If True, ``weight`` (gamma) and ``bias`` (beta) are parameters that an optimizer can
        train (the statistics stay fixed); if False they are buffers too.
    device, dtype
        Where and in which dtype to create the tensors (default: CPU, float32).

    Attributes
    ----------
    weight, bias : Tensor, shape (C,)
        gamma (initialised to 1) and beta (initialised to 0); buffers or parameters.
    running_mean, running_var : Tensor, shape (C,)
        The fixed statistics (buffers), initialised to 0 and 1.
    """

    _expected_dims: tuple[int, ...] = ()
    _batch_norm_classes: tuple[type[nn.Module], type[nn.Module]] = (nn.Module, nn.Module)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine_trainable: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be non-negative, got {eps!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = float(eps)
        self.affine_trainable = bool(affine_trainable)
        weight, bias = torch.ones(num_features, **factory), torch.zeros(num_features, **factory)
        if self.affine_trainable:
            self.weight = nn.Parameter(weight)
            self.bias = nn.Parameter(bias)
        else:
            self.register_buffer("weight", weight)
            self.register_buffer("bias", bias)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        # what unfreeze_batch_norm needs to rebuild the original layer (not in the state dict)
        self.momentum: float | None = 0.1
        self.num_batches_tracked = 0
        self.source_class: type[nn.Module] | None = None

    @classmethod
    def from_batch_norm(cls, bn: nn.Module, affine_trainable: bool = False) -> _FrozenBatchNorm:
        """The frozen copy of a batch-norm layer (``torch.nn`` or :mod:`bncourse.torch_bn`).

        Parameters
        ----------
        bn : BatchNorm1d/2d/3d
            With running statistics (``track_running_stats=True``); a layer without affine
            parameters gets gamma = 1 and beta = 0.
        affine_trainable : bool, default False
            Keep gamma and beta trainable (as parameters).

        Returns
        -------
        FrozenBatchNorm1d/2d/3d
            In the dtype and on the device of ``bn``'s running statistics; ``frozen(x)`` equals
            ``bn.eval()(x)``.
        """
        if not is_batch_norm(bn):
            raise TypeError(
                f"from_batch_norm: expected a batch-norm layer, got {type(bn).__name__}"
            )
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"from_batch_norm: {type(bn).__name__} has no running statistics "
                "(track_running_stats=False), so there is nothing to freeze: it normalises with "
                "batch statistics in evaluation mode too"
            )
        frozen = cls(
            bn.num_features,
            eps=bn.eps,
            affine_trainable=affine_trainable,
            device=bn.running_mean.device,
            dtype=bn.running_mean.dtype,
        )
        with torch.no_grad():
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
            if bn.weight is not None:
                frozen.weight.copy_(bn.weight)
            if bn.bias is not None:
                frozen.bias.copy_(bn.bias)
        frozen.momentum = bn.momentum
        tracked = getattr(bn, "num_batches_tracked", None)
        frozen.num_batches_tracked = 0 if tracked is None else int(tracked)
        frozen.source_class = type(bn)
        return frozen

    def scale_and_shift(self) -> tuple[Tensor, Tensor]:
        """The folded per-channel map ``y = scale * x + shift``, each of shape (C,)."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return scale, shift

    def _check_input(self, input: Tensor) -> None:
        if input.dim() not in self._expected_dims:
            dims = " or ".join(f"{d}D" for d in self._expected_dims)
            raise ValueError(f"expected {dims} input (got {input.dim()}D input)")
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}: expected input with {self.num_features} channels "
                f"(num_features) on dimension 1, got input of shape {tuple(input.shape)}"
            )

    def forward(self, input: Tensor) -> Tensor:
        """``scale * input + shift`` per channel; input (N, C, *), output the same shape.

        The same in training and evaluation mode. float16/bfloat16 input with float32
        statistics is computed in float32 and returned in the input's dtype.
        """
        self._check_input(input)
        scale, shift = self.scale_and_shift()
        shape = [1, -1] + [1] * (input.dim() - 2)
        work = torch.promote_types(input.dtype, scale.dtype)
        output = input.to(work) * scale.to(work).view(shape) + shift.to(work).view(shape)
        return output.to(input.dtype)

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
        # A BatchNorm*d state dict loads directly: its counter is dropped (kept as an attribute)
        # and a layer saved without affine parameters means gamma = 1, beta = 0.
        key = prefix + "num_batches_tracked"
        if key in state_dict:
            self.num_batches_tracked = int(state_dict.pop(key))
        for name, default in (("weight", 1.0), ("bias", 0.0)):
            if prefix + name not in state_dict and prefix + "running_mean" in state_dict:
                state_dict[prefix + name] = torch.full_like(
                    state_dict[prefix + "running_mean"], default
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine_trainable={self.affine_trainable}"


class FrozenBatchNorm1d(_FrozenBatchNorm):
    """Frozen batch norm for input (N, C) or (N, C, L); see :class:`_FrozenBatchNorm`."""

    _expected_dims = (2, 3)


class FrozenBatchNorm2d(_FrozenBatchNorm):
    """Frozen batch norm for input (N, C, H, W); see :class:`_FrozenBatchNorm`."""

    _expected_dims = (4,)


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """Frozen batch norm for input (N, C, D, H, W); see :class:`_FrozenBatchNorm`."""

    _expected_dims = (5,)


_FROZEN_BY_DIM: dict[int, type[_FrozenBatchNorm]] = {
    1: FrozenBatchNorm1d,
    2: FrozenBatchNorm2d,
    3: FrozenBatchNorm3d,
}
_BATCH_NORM_BY_DIM: dict[int, type[nn.Module]] = {
    1: torch_bn.BatchNorm1d,
    2: torch_bn.BatchNorm2d,
    3: torch_bn.BatchNorm3d,
}


def _spatial_dims(bn: nn.Module) -> int:
    """1, 2 or 3 for a BatchNorm1d/2d/3d of ``torch.nn`` or ``torch_bn`` (by class name)."""
    for dims in (1, 2, 3):
        if type(bn).__name__.endswith(f"{dims}d"):
            return dims
    raise TypeError(
        f"cannot tell whether {type(bn).__name__} is a 1d, 2d or 3d batch norm "
        "(its class name should end in 1d, 2d or 3d)"
    )


def is_frozen_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a :class:`FrozenBatchNorm1d`, ``2d`` or ``3d``."""
    return isinstance(module, _FrozenBatchNorm)


def _replace_children(module: nn.Module, convert) -> None:
    for name, child in module.named_children():
        replacement = convert(child)
        if replacement is not None:
            setattr(module, name, replacement)
        else:
            _replace_children(child, convert)


def _convert_model(model: nn.Module, convert, inplace: bool) -> nn.Module:
    """Apply ``convert`` (module -> replacement or None) to ``model`` or to its descendants."""
    if not inplace:
        model = copy.deepcopy(model)
    replacement = convert(model)
    if replacement is not None:
        return replacement
    _replace_children(model, convert)
    return model


def freeze_batch_norm(
    model: nn.Module, affine_trainable: bool = False, inplace: bool = True
) -> nn.Module:
    """Replace every batch norm of ``model`` by its frozen copy.

    Each ``torch.nn.BatchNorm1d/2d/3d`` or ``bncourse.torch_bn.BatchNorm1d/2d/3d`` becomes a
    :class:`FrozenBatchNorm1d/2d/3d` with the same statistics, gamma, beta and eps. The model's
    output in evaluation mode does not change; in training mode the layers no longer use batch
    statistics or update running ones. A model that is itself a batch norm is converted too.

    Parameters
    ----------
    model : nn.Module
        The model; its batch norms need running statistics.
    affine_trainable : bool, default False
        Keep gamma and beta as trainable parameters (only the statistics are frozen).
    inplace : bool, default True
        Convert ``model`` itself; if False, convert and return a deep copy.

    Returns
    -------
    nn.Module
        The converted model (``model`` itself when ``inplace``, unless ``model`` is a batch
        norm: then the frozen layer).
    """

    def convert(child: nn.Module) -> nn.Module | None:
        if not is_batch_norm(child):
            return None
        frozen_class = _FROZEN_BY_DIM[_spatial_dims(child)]
        frozen = frozen_class.from_batch_norm(child, affine_trainable=affine_trainable)
        frozen.train(child.training)
        return frozen

    return _convert_model(model, convert, inplace)


def unfreeze_batch_norm(
    model: nn.Module, batch_norm_class: type[nn.Module] | None = None, inplace: bool = True
) -> nn.Module:
    """Replace every frozen batch norm of ``model`` by an ordinary batch norm again.

    The new layer has the frozen statistics as its running statistics, gamma and beta as
    trainable parameters, and the eps, momentum and ``num_batches_tracked`` of the layer that
    was frozen.

    Parameters
    ----------
    model : nn.Module
        A model with :class:`FrozenBatchNorm1d/2d/3d` layers.
    batch_norm_class : type, optional
        The class to build, e.g. ``torch.nn.BatchNorm2d``; it must take ``(num_features, eps,
        momentum)``. By default the class the layer was frozen from, or
        ``bncourse.torch_bn.BatchNorm1d/2d/3d`` for a layer built directly.
    inplace : bool, default True
        Convert ``model`` itself; if False, convert and return a deep copy.

    Returns
    -------
    nn.Module
        The converted model.
    """

    def convert(child: nn.Module) -> nn.Module | None:
        if not is_frozen_batch_norm(child):
            return None
        dims = next(d for d, cls in _FROZEN_BY_DIM.items() if isinstance(child, cls))
        target = batch_norm_class or child.source_class or _BATCH_NORM_BY_DIM[dims]
        bn = target(child.num_features, eps=child.eps, momentum=child.momentum)
        bn = bn.to(device=child.running_mean.device, dtype=child.running_mean.dtype)
        with torch.no_grad():
            bn.running_mean.copy_(child.running_mean)
            bn.running_var.copy_(child.running_var)
            bn.weight.copy_(child.weight)
            bn.bias.copy_(child.bias)
            bn.num_batches_tracked.fill_(child.num_batches_tracked)
        bn.train(child.training)
        return bn

    return _convert_model(model, convert, inplace)
