"""Batch-norm variants for small or unusual batches: ghost batch norm and batch renormalisation.

* :class:`GhostBatchNorm` (Hoffer et al., 2017) normalises each slice of ``virtual_batch_size``
  examples of a batch with that slice's own statistics. It is what ``k`` devices without
  synchronisation compute on a global batch split ``k`` ways, so the book uses it both to
  simulate many devices in one process and as the regulariser Hoffer et al. proposed.
* :class:`BatchRenorm` (Ioffe, 2017) normalises with the batch statistics and then corrects them
  towards the running statistics, ``x_hat = (x - mu_B) / sigma_B * r + d`` with
  ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and ``d = clip((mu_B - mu) / sigma, -d_max,
  d_max)`` treated as constants in the backward. Unclipped, the training output equals the
  evaluation output; with ``r_max = 1, d_max = 0`` it is batch norm.

Both hold the same parameters and buffers as ``torch.nn.BatchNorm*d`` (their ``state_dict``
loads into one and back) and accept inputs of shape (N, C, *) of rank 2 to 5. In evaluation mode
both are plain batch norm with the running statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bncourse.distributed import _move_state, replace_batch_norms

__all__ = ["BatchRenorm", "GhostBatchNorm", "to_batch_variant"]


def _check_rank(module: nn.Module, input: Tensor) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not 2 <= input.dim() <= 5:
        raise ValueError(
            f"{type(module).__name__}: expected 2D to 5D input (N, C, *), got {input.dim()}D input"
        )
    if input.shape[1] != module.num_features:
        raise RuntimeError(
            f"{type(module).__name__}: expected {module.num_features} channels on dimension 1, "
            f"got input of shape {tuple(input.shape)}"
        )


def _batch_statistics(x: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean, biased variance and count of ``x`` (N, C, *)."""
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x, dims, correction=0)
    return mean, var, x.numel() // x.shape[1]


def _channel_view(values: Tensor, x: Tensor) -> Tensor:
    return values.view(1, -1, *([1] * (x.dim() - 2)))


class _VariantBase(_BatchNorm):
    def _momentum_now(self) -> float:
        """Count the batch and return the running-statistics weight (torch's convention)."""
        if not (self.training and self.track_running_stats):
            return 0.0
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _update_running(self, mean: Tensor, unbiased_var: Tensor, momentum: float) -> None:
        with torch.no_grad():
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
            self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), momentum)

    def _evaluate(self, input: Tensor) -> Tensor:
        return F.batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class GhostBatchNorm(_VariantBase):
    """Batch norm over "ghost" batches: consecutive slices of ``virtual_batch_size`` examples.

    In training the batch is split along dimension 0 into slices of ``virtual_batch_size``
    examples (the last slice may be smaller) and each is normalised with its own mean and
    biased variance, as ``k`` unsynchronised devices would. The running statistics are updated
    once per call with the average over the slices of their means and unbiased variances.
    With ``virtual_batch_size >= N`` the layer is batch norm.

    Parameters
    ----------
    num_features : int
        Channels ``C``.
    virtual_batch_size : int, default 32
        Examples per ghost batch. Each ghost batch needs more than one value per channel.
    eps, momentum, affine, track_running_stats, device, dtype
        As in :class:`torch.nn.BatchNorm1d`.
    """

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int = 32,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
            raise ValueError(
                f"virtual_batch_size must be a positive int, got {virtual_batch_size!r}"
            )
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.virtual_batch_size = virtual_batch_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input: Tensor) -> Tensor:
        """Normalise ``input`` (N, C, *) ghost batch by ghost batch; returns the same shape."""
        _check_rank(self, input)
        use_batch = self.training or not self.track_running_stats
        if not use_batch:
            return self._evaluate(input)
        momentum = self._momentum_now()
        size, batch = self.virtual_batch_size, input.shape[0]
        if batch > 0 and batch % size == 0:
            return self._equal_slices(input, momentum)
        outputs, means, variances = [], [], []
        for chunk in torch.split(input, size):
            outputs.append(
                F.batch_norm(chunk, None, None, self.weight, self.bias, True, 0.0, self.eps)
            )
            if self.training and self.track_running_stats:
                with torch.no_grad():
                    mean, var, count = _batch_statistics(chunk.detach())
                    means.append(mean)
                    variances.append(var * count / (count - 1))
        if means:
            self._update_running(
                torch.stack(means).mean(0), torch.stack(variances).mean(0), momentum
            )
        if not outputs:  # an empty batch
            return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return torch.cat(outputs)

    def _equal_slices(self, input: Tensor, momentum: float) -> Tensor:
        """All slices at once when they have equal sizes: a (slices, size, C, rest) view."""
        size, channels = self.virtual_batch_size, input.shape[1]
        x = input.reshape(input.shape[0] // size, size, channels, -1)
        count = size * x.shape[3]
        if count <= 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{(size, *input.shape[1:])} per ghost batch"
            )
        var, mean = torch.var_mean(x, dim=(1, 3), correction=0, keepdim=True)
        output = ((x - mean) * torch.rsqrt(var + self.eps)).reshape(input.shape)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self._update_running(
                    mean.mean(0).flatten(), (var * count / (count - 1)).mean(0).flatten(), momentum
                )
        if self.weight is not None:
            output = output * _channel_view(self.weight, input)
        if self.bias is not None:
            output = output + _channel_view(self.bias, input)
        return output


class BatchRenorm(_VariantBase):
    """Batch renormalisation (Ioffe, 2017).

    In training, with batch mean ``mu_B``, ``sigma_B = sqrt(var_B + eps)`` (biased variance) and
    running ``mu``, ``sigma = sqrt(running_var + eps)``::

        r = clip(sigma_B / sigma, 1 / r_max, r_max)       (no gradient)
        d = clip((mu_B - mu) / sigma, -d_max, d_max)      (no gradient)
        y = weight * ((x - mu_B) / sigma_B * r + d) + bias

    and the running statistics are updated as in batch norm (unbiased variance) after the
    output is computed. Evaluation is batch norm with the running statistics. Ioffe starts
    with ``r_max = 1, d_max = 0`` (batch norm) and relaxes them; here they are attributes a
    training callback may change.

    Parameters
    ----------
    num_features : int
        Channels ``C``.
    r_max : float, default 3.0
        Bound of the scale correction, >= 1.
    d_max : float, default 5.0
        Bound of the shift correction, >= 0.
    eps, momentum, affine, device, dtype
        As in :class:`torch.nn.BatchNorm1d` (running statistics are always tracked: they are
        part of the method).
    virtual_batch_size : int, optional
        If given, renormalise consecutive slices of this many examples separately (against the
        same running statistics), as unsynchronised devices would; the running statistics are
        updated once with the slices' average mean and unbiased variance.
    """

    def __init__(
        self,
        num_features: int,
        r_max: float = 3.0,
        d_max: float = 5.0,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        virtual_batch_size: int | None = None,
    ) -> None:
        if r_max < 1:
            raise ValueError(f"r_max must be >= 1, got {r_max}")
        if d_max < 0:
            raise ValueError(f"d_max must be >= 0, got {d_max}")
        if virtual_batch_size is not None and (
            not isinstance(virtual_batch_size, int) or virtual_batch_size < 1
        ):
            raise ValueError(
                f"virtual_batch_size must be a positive int or None, got {virtual_batch_size!r}"
            )
        super().__init__(num_features, eps, momentum, affine, True, device=device, dtype=dtype)
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.virtual_batch_size = virtual_batch_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}"

    def _renormalise(self, chunk: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x_hat * r + d`` of one slice, and its mean and unbiased variance (detached)."""
        mean, var, count = _batch_statistics(chunk)
        if count <= 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{tuple(chunk.shape)}"
            )
        sigma_batch = torch.sqrt(var + self.eps)
        with torch.no_grad():
            sigma = torch.sqrt(self.running_var + self.eps)
            r = (sigma_batch / sigma).clamp(1.0 / self.r_max, self.r_max)
            d = ((mean - self.running_mean) / sigma).clamp(-self.d_max, self.d_max)
        x_hat = (chunk - _channel_view(mean, chunk)) / _channel_view(sigma_batch, chunk)
        x_hat = x_hat * _channel_view(r, chunk) + _channel_view(d, chunk)
        return x_hat, mean.detach(), var.detach() * count / (count - 1)

    def forward(self, input: Tensor) -> Tensor:
        """Renormalise ``input`` (N, C, *) in training, normalise with running statistics in
        evaluation; returns the same shape."""
        _check_rank(self, input)
        if not self.training:
            return self._evaluate(input)
        size = self.virtual_batch_size or max(1, input.shape[0])
        parts = [self._renormalise(chunk) for chunk in torch.split(input, size)]
        if not parts:
            raise ValueError(f"Expected more than 1 value per channel, got {tuple(input.shape)}")
        momentum = self._momentum_now()
        x_hat = torch.cat([part[0] for part in parts])
        mean = torch.stack([part[1] for part in parts]).mean(0)
        self._update_running(mean, torch.stack([part[2] for part in parts]).mean(0), momentum)
        if self.weight is not None:
            x_hat = x_hat * _channel_view(self.weight, input)
        if self.bias is not None:
            x_hat = x_hat + _channel_view(self.bias, input)
        return x_hat


def to_batch_variant(model: nn.Module, variant: str, **kwargs: float) -> nn.Module:
    """Replace every ``BatchNorm1d/2d/3d`` (torch's or bncourse's) in ``model`` by a variant.

    The new layers share the old ones' Parameters and buffers.

    Parameters
    ----------
    model : nn.Module
        Changed in place; the (possibly new) root is returned.
    variant : {"ghost", "renorm"}
        :class:`GhostBatchNorm` or :class:`BatchRenorm`.
    **kwargs
        Passed to the variant's constructor (``virtual_batch_size``; ``r_max``, ``d_max``).

    Returns
    -------
    nn.Module
    """
    from bncourse.distributed import _batch_norm_classes

    classes = {"ghost": GhostBatchNorm, "renorm": BatchRenorm}
    if variant not in classes:
        raise ValueError(f"variant must be one of {tuple(classes)}, got {variant!r}")
    targets = _batch_norm_classes()

    def build(layer: nn.Module, name: str) -> nn.Module | None:
        if type(layer) not in targets:
            return None
        if variant == "ghost":
            new = GhostBatchNorm(
                layer.num_features,
                eps=layer.eps,
                momentum=layer.momentum,
                affine=layer.affine,
                track_running_stats=layer.track_running_stats,
                **kwargs,
            )
        else:
            new = BatchRenorm(
                layer.num_features,
                eps=layer.eps,
                momentum=layer.momentum,
                affine=layer.affine,
                **kwargs,
            )
        return _move_state(layer, new)

    return replace_batch_norms(model, build)
