"""Batch norm synchronised across processes with ``torch.distributed``: CPU (gloo), GPU (NCCL).

PyTorch's :class:`torch.nn.SyncBatchNorm` computes its statistics with CUDA kernels only: with a
CPU process group it raises in training, and ``DistributedDataParallel`` refuses it in a CPU
model. :class:`SyncBatchNorm` here is built on ``torch.distributed`` collectives alone, so it runs
with any backend and any process group:

* forward in training: every rank computes its count ``n``, mean and centred sum of squares
  ``M2`` per channel; **one** ``all_gather`` of these ``2C + 1`` numbers gives every rank all of
  them, and each rank merges them with Chan et al.'s parallel formula

  .. math:: n = \\sum_r n_r, \\quad \\mu = \\frac{1}{n}\\sum_r n_r \\mu_r, \\quad
            M_2 = \\sum_r M_{2,r} + \\sum_r n_r (\\mu_r - \\mu)^2,

  which never subtracts two large sums (no loss of precision when the mean is large). The
  output is batch norm over the union of the ranks' batches; ranks may hold different batch
  sizes, and a rank may hold none (it still takes part in the collective).
* backward: **one** ``all_reduce`` of the per-channel sums of ``dy`` and ``dy * x_hat`` (``2C``
  numbers) gives the input gradient of batch norm over the global batch. The gradients of
  ``weight`` and ``bias`` stay local, as in PyTorch: ``DistributedDataParallel`` sums them.
* evaluation uses the running statistics and communicates nothing; without an initialised
  process group, or with a group of one process, the layer is plain batch norm.

Also here: :func:`launch`, which runs a function in ``k`` local processes joined in a gloo
process group on 127.0.0.1 (a free port, and a time limit), for tests and the book.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNormBase

__all__ = [
    "SyncBatchNorm",
    "collective_numbers",
    "find_free_port",
    "launch",
    "replace_batch_norms",
]


# ---------------------------------------------------------------------------------------------
# Module surgery shared with bncourse.batch_variants
# ---------------------------------------------------------------------------------------------


def replace_batch_norms(
    module: nn.Module,
    build: Callable[[nn.Module, str], nn.Module | None],
    prefix: str = "",
) -> nn.Module:
    """Replace layers of ``module`` (recursively) by what ``build`` returns for them.

    ``build(layer, qualified_name)`` is called on ``module`` and then on every descendant; it
    returns the replacement, or None to keep the layer and look inside it. The replaced layer's
    children are not visited. The model is changed in place where a child is replaced; the
    (possibly new) root is returned.

    Parameters
    ----------
    module : nn.Module
        The model.
    build : callable
        ``build(layer, name) -> nn.Module | None``.
    prefix : str, default ""
        Qualified name of ``module`` (used in the names passed to ``build``).

    Returns
    -------
    nn.Module
        ``module`` itself, or its replacement when ``build`` replaced the root.
    """
    replacement = build(module, prefix)
    if replacement is not None:
        return replacement
    for name, child in list(module.named_children()):
        new_child = replace_batch_norms(child, build, f"{prefix}.{name}" if prefix else name)
        if new_child is not child:
            module.add_module(name, new_child)
    return module


def _batch_norm_classes() -> tuple[type[nn.Module], ...]:
    """Torch's and bncourse's ``BatchNorm1d/2d/3d`` (and torch's own ``SyncBatchNorm``)."""
    from bncourse import torch_bn

    ours = tuple(getattr(torch_bn, name) for name in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d"))
    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm) + ours


def _move_state(source: nn.Module, target: nn.Module) -> nn.Module:
    """Give ``target`` the very Parameter objects and buffers of ``source`` (not copies)."""
    for name in ("weight", "bias"):
        value = getattr(source, name, None)
        if value is None:
            target.register_parameter(name, None)
        else:
            setattr(target, name, value)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        target.register_buffer(name, getattr(source, name, None))
    target.train(source.training)
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig
    return target


# ---------------------------------------------------------------------------------------------
# Collectives with a time limit and an error that names the layer
# ---------------------------------------------------------------------------------------------


def _wait(work: Any, what: str, layer: str, timeout: float | None, group: Any) -> None:
    rank = dist.get_rank(group)
    world = dist.get_world_size(group)
    try:
        if timeout is None:
            completed = work.wait()
        else:
            completed = work.wait(datetime.timedelta(seconds=timeout))
    except RuntimeError as error:  # includes torch.distributed.DistBackendError
        raise RuntimeError(
            f"{layer}: the {what} did not complete on rank {rank} of {world} ({error}). Every "
            "rank of the process group must run this layer in training mode the same number of "
            "times (forward and backward), even with an empty batch."
        ) from error
    if completed is False:
        raise RuntimeError(f"{layer}: the {what} timed out on rank {rank} of {world}")


def _start(collective: Callable[[], Any], what: str, layer: str, group: Any) -> Any:
    try:
        return collective()
    except RuntimeError as error:
        raise RuntimeError(
            f"{layer}: the {what} could not start on rank {dist.get_rank(group)} ({error})"
        ) from error


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics of half-precision inputs are computed in float32, as in PyTorch."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _reduction_dims(input: Tensor) -> list[int]:
    return [0, *range(2, input.dim())]


def _per_channel(values: Tensor, input: Tensor) -> Tensor:
    return values.view(1, -1, *([1] * (input.dim() - 2)))


def collective_numbers(num_features: int, world_size: int) -> dict[str, int]:
    """How many numbers :class:`SyncBatchNorm` exchanges per training step and layer.

    Parameters
    ----------
    num_features : int
        Channels ``C``.
    world_size : int
        Processes in the group.

    Returns
    -------
    dict
        ``forward_sent`` (``2C + 1``: count, means, M2 of one rank), ``forward_received``
        (``(world_size - 1) (2C + 1)``), ``backward`` (``2C``, the all-reduced vector) and the
        minimum a synchronised layer needs, ``minimum_forward`` (``2C + 1``) and
        ``minimum_backward`` (``2C``).
    """
    per_rank = 2 * num_features + 1
    return {
        "forward_sent": per_rank,
        "forward_received": (world_size - 1) * per_rank,
        "backward": 2 * num_features,
        "minimum_forward": per_rank,
        "minimum_backward": 2 * num_features,
    }


# ---------------------------------------------------------------------------------------------
# The synchronised forward and backward
# ---------------------------------------------------------------------------------------------


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm over the union of the ranks' batches: one all_gather forward, one all_reduce
    backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        eps: float,
        momentum: float,
        group: Any,
        world_size: int,
        layer: str,
        timeout: float | None,
    ) -> Tensor:
        dtype = _compute_dtype(input.dtype)
        x = input.to(dtype)
        channels = x.shape[1]
        dims = _reduction_dims(x)
        count = x.numel() // channels
        if count > 0:  # two passes (torch.var_mean over dims (0, 2, ...) is slower on CPU)
            mean = x.mean(dims)
            m2 = (x - _per_channel(mean, x)).square().sum(dims)
        else:
            mean = x.new_zeros(channels)
            m2 = x.new_zeros(channels)
        local = torch.cat([x.new_full((1,), float(count)), mean, m2])
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        what = f"all_gather of batch statistics ({local.numel()} numbers per rank)"
        work = _start(
            lambda: dist.all_gather(gathered, local, group=group, async_op=True), what, layer, group
        )
        _wait(work, what, layer, timeout, group)
        table = torch.stack(gathered)  # (world_size, 2C + 1)
        counts = table[:, :1]
        means = table[:, 1 : channels + 1]
        m2s = table[:, channels + 1 :]
        total = float(counts.sum())
        ctx.total = total
        ctx.layer = (group, world_size, layer, timeout)
        if total == 0:  # every rank is empty: like torch.nn.BatchNorm, no statistics to update
            ctx.save_for_backward(x, weight, x.new_zeros(channels))
            return input.clone()
        if total == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{tuple(input.shape)} here and 1 value per channel over the {world_size} ranks"
            )
        global_mean = (counts * means).sum(0) / total
        global_m2 = m2s.sum(0) + (counts * (means - global_mean).square()).sum(0)
        var = global_m2 / total
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None and running_var is not None:
            unbiased = global_m2 / (total - 1)
            running_mean.mul_(1 - momentum).add_(global_mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        x_hat = (x - _per_channel(global_mean, x)) * _per_channel(invstd, x)
        ctx.save_for_backward(x_hat, weight, invstd)
        scale = x_hat.new_ones(channels) if weight is None else weight.to(dtype)
        shift = x_hat.new_zeros(channels) if bias is None else bias.to(dtype)
        output = torch.addcmul(_per_channel(shift, x), x_hat, _per_channel(scale, x))
        return output.to(input.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x_hat, weight, invstd = ctx.saved_tensors
        group, world_size, layer, timeout = ctx.layer
        nones = (None,) * 8
        if ctx.total == 0:
            channels = invstd.numel()
            grad_weight = grad_output.new_zeros(channels) if ctx.needs_input_grad[1] else None
            grad_bias = grad_output.new_zeros(channels) if ctx.needs_input_grad[2] else None
            return (torch.zeros_like(grad_output), grad_weight, grad_bias, *nones)
        g = grad_output.to(x_hat.dtype)
        dims = _reduction_dims(g)
        sum_dy = g.sum(dims)
        sum_dy_xhat = (g * x_hat).sum(dims)
        grad_input = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xhat])
            what = f"all_reduce of gradient sums ({sums.numel()} numbers)"
            work = _start(
                lambda: dist.all_reduce(sums, group=group, async_op=True), what, layer, group
            )
            _wait(work, what, layer, timeout, group)
            channels = sum_dy.numel()
            mean_dy = sums[:channels] / ctx.total
            mean_dy_xhat = sums[channels:] / ctx.total
            scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
            # scale * (g - mean_dy - x_hat * mean_dy_xhat) in two fused passes
            grad_input = torch.addcmul(_per_channel(-scale * mean_dy, g), g, _per_channel(scale, g))
            grad_input.addcmul_(x_hat, _per_channel(-scale * mean_dy_xhat, g))
            grad_input = grad_input.to(grad_output.dtype)
        grad_weight = sum_dy_xhat.to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(grad_output.dtype) if ctx.needs_input_grad[2] else None
        return (grad_input, grad_weight, grad_bias, *nones)


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------


class SyncBatchNorm(_TorchBatchNormBase):
    """Batch norm whose statistics are those of the batches of all processes of a group.

    A drop-in for :class:`torch.nn.SyncBatchNorm` (same constructor, parameters, buffers and
    ``state_dict`` keys) that runs on the CPU with the gloo backend as well as on CUDA with
    NCCL. It derives from ``torch.nn.modules.batchnorm._BatchNorm``, not from
    ``torch.nn.SyncBatchNorm``, so that ``DistributedDataParallel`` accepts it in a CPU model.

    In training, with an initialised process group of more than one process, the output equals
    batch norm over the concatenation of all ranks' batches (which may differ in size, or be
    empty), and ``running_var`` receives the unbiased variance of that global batch. Every rank
    of the group must call the layer in training mode the same number of times, and run the
    backward if any rank does. In evaluation mode, without a process group, or with a group of
    one, the layer is :class:`torch.nn.BatchNorm1d` / ``2d`` / ``3d`` and communicates nothing.

    Parameters
    ----------
    num_features : int
        Channels ``C`` of an input of shape (N, C, *) (2-D to 5-D).
    eps : float, default 1e-5
        Added to the variance.
    momentum : float or None, default 0.1
        Weight of a new batch in the running statistics (None: cumulative average).
    affine : bool, default True
        Learn ``weight`` (gamma) and ``bias`` (beta).
    track_running_stats : bool, default True
        Keep ``running_mean``, ``running_var`` and ``num_batches_tracked``.
    process_group : ProcessGroup, optional
        The group whose batches are merged; default the whole world.
    device, dtype
        Where and in which dtype to create parameters and buffers.

    Attributes
    ----------
    layer_name : str or None
        Name used in error messages (:meth:`convert_sync_batchnorm` sets it to the layer's
        qualified name in the model).
    collective_timeout : float or None
        Seconds a collective may take before it fails with an error naming the layer; None uses
        the process group's timeout.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(num_features, int) or isinstance(num_features, bool):
            raise TypeError(f"num_features must be an int, got {type(num_features).__name__}")
        if num_features < 1:
            raise ValueError(f"num_features must be positive, got {num_features}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.process_group = process_group
        self.layer_name: str | None = None
        self.collective_timeout: float | None = None
        self._converted_from: type[nn.Module] | None = None
        self._last_input_dim: int | None = None

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _describe(self) -> str:
        name = f" {self.layer_name!r}" if self.layer_name else ""
        return f"SyncBatchNorm layer{name} ({self.num_features} channels)"

    def _group_and_size(self) -> tuple[Any, int]:
        """The process group to synchronise over and its size (1: no synchronisation)."""
        if not (dist.is_available() and dist.is_initialized()):
            return None, 1
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if dist.get_rank(group) < 0:
            raise RuntimeError(
                f"{self._describe()}: this process (global rank {dist.get_rank()}) is not a "
                "member of the layer's process_group"
            )
        return group, dist.get_world_size(group)

    def forward(self, input: Tensor) -> Tensor:
        """Normalise ``input`` of shape (N, C, *); returns the same shape and dtype."""
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        self._check_input_dim(input)
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")
        if input.size(1) != self.num_features:
            raise RuntimeError(
                f"{self._describe()}: expected {self.num_features} channels on dimension 1, "
                f"got input of shape {tuple(input.shape)}"
            )
        if not (input.is_floating_point()):
            raise TypeError(f"input must be a floating-point tensor, got {input.dtype}")
        self._last_input_dim = input.dim()
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else factor
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        updating = not self.training or self.track_running_stats
        running_mean = self.running_mean if updating else None
        running_var = self.running_var if updating else None
        group, world_size = self._group_and_size() if bn_training and self.training else (None, 1)
        if world_size <= 1:
            return F.batch_norm(
                input,
                running_mean,
                running_var,
                self.weight,
                self.bias,
                bn_training,
                factor,
                self.eps,
            )
        return _SyncBatchNormFunction.apply(
            input,
            self.weight,
            self.bias,
            running_mean,
            running_var,
            self.eps,
            factor,
            group,
            world_size,
            self._describe(),
            self.collective_timeout,
        )

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Replace every ``BatchNorm1d/2d/3d`` (torch's or bncourse's) in ``module`` by a
        :class:`SyncBatchNorm`.

        The new layers hold the very same ``Parameter`` objects (so ``requires_grad`` and any
        optimizer that holds them carry over), the same buffers and the training flag; their
        ``layer_name`` is the qualified name in the model. Layers that already are
        :class:`SyncBatchNorm` are kept. Torch's ``nn.SyncBatchNorm`` is converted too.

        Parameters
        ----------
        module : nn.Module
            The model (changed in place; the root is returned, replaced if it was a BN layer).
        process_group : ProcessGroup, optional
            Group of the new layers (default the whole world).

        Returns
        -------
        nn.Module
        """
        classes = _batch_norm_classes()

        def build(layer: nn.Module, name: str) -> nn.Module | None:
            if isinstance(layer, cls) or type(layer) not in classes:
                return None
            sync = cls(
                layer.num_features,
                layer.eps,
                layer.momentum,
                layer.affine,
                layer.track_running_stats,
                process_group,
            )
            _move_state(layer, sync)
            sync.layer_name = name or type(layer).__name__
            sync._converted_from = (
                layer._converted_from if isinstance(layer, SyncBatchNorm) else type(layer)
            )
            return sync

        return replace_batch_norms(module, build)

    @classmethod
    def revert_sync_batchnorm(
        cls, module: nn.Module, batch_norm_class: type[nn.Module] | None = None
    ) -> nn.Module:
        """Replace every :class:`SyncBatchNorm` in ``module`` by a ``BatchNorm*d`` layer (for
        inference or training on one device), sharing its Parameters and buffers.

        Parameters
        ----------
        module : nn.Module
            The model (changed in place; the root is returned).
        batch_norm_class : type, optional
            The class to convert to. By default the class the layer was converted from, else
            ``torch.nn.BatchNorm1d/2d/3d`` by the rank of the last input the layer saw.

        Returns
        -------
        nn.Module

        Raises
        ------
        ValueError
            When the class cannot be told (a layer built directly and never run) and
            ``batch_norm_class`` is not given.
        """
        by_rank = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}

        def build(layer: nn.Module, name: str) -> nn.Module | None:
            if not isinstance(layer, cls):
                return None
            target = batch_norm_class or layer._converted_from
            if target is None or target is nn.SyncBatchNorm:
                target = by_rank.get(layer._last_input_dim or 0)
            if target is None:
                raise ValueError(
                    f"cannot tell which BatchNorm*d to make of layer {name or layer!r}: it was not "
                    "converted from one and has not seen an input; pass batch_norm_class"
                )
            plain = target(
                layer.num_features,
                layer.eps,
                layer.momentum,
                layer.affine,
                layer.track_running_stats,
            )
            return _move_state(layer, plain)

        return replace_batch_norms(module, build)


# ---------------------------------------------------------------------------------------------
# Running a function in k local processes
# ---------------------------------------------------------------------------------------------


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    group_timeout: float,
    threads: int,
    fn: Callable[..., Any],
    args: tuple,
    queue: Any,
) -> None:
    status, payload = "ok", None
    try:
        torch.set_num_threads(threads)
        if os.path.isdir("/sys/class/net/lo"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=group_timeout),
        )
        try:
            payload = pickle.dumps(fn(rank, world_size, *args))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report everything, the parent raises it
        status, payload = "error", traceback.format_exc()
    queue.put((rank, status, payload))


def launch(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: Sequence[Any] = (),
    *,
    timeout: float = 60.0,
    group_timeout: float = 20.0,
    backend: str = "gloo",
    threads: int = 1,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` new local processes joined in a
    process group, and return what each rank returned.

    The processes are started with the ``spawn`` method, so ``fn`` must be importable (defined
    at the top level of a module, not in a notebook), and a script that calls ``launch`` must
    do so under ``if __name__ == "__main__":``. The group rendezvous on a free TCP port of
    127.0.0.1 (gloo binds to the loopback interface); if another program takes that port
    before rank 0 binds it, ``launch`` tries again with another (three tries).

    Parameters
    ----------
    fn : callable
        ``fn(rank, world_size, *args)``; its return value must be picklable.
    world_size : int, default 2
        Number of processes.
    args : sequence
        Further (picklable) arguments.
    timeout : float, default 60
        Seconds to wait for all ranks; then the processes are killed and ``TimeoutError`` is
        raised, so a hang becomes a failure.
    group_timeout : float, default 20
        Timeout of the process group's collectives (a collective that cannot complete fails
        after this long).
    backend : {"gloo", "nccl"}, default "gloo"
    threads : int, default 1
        ``torch.set_num_threads`` in each process.

    Returns
    -------
    list
        ``results[r]`` is rank ``r``'s return value.

    Raises
    ------
    RuntimeError
        If a rank raised (the message holds its traceback).
    TimeoutError
        If the ranks did not all finish within ``timeout`` seconds.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if timeout <= 0 or group_timeout <= 0:
        raise ValueError(f"timeouts must be positive, got {timeout} and {group_timeout}")
    for attempt in range(3):
        try:
            return _launch_once(
                fn, world_size, tuple(args), timeout, group_timeout, backend, threads
            )
        except _PortTaken:  # another program took the free port before rank 0 bound it
            if attempt == 2:
                raise RuntimeError(
                    "launch: no free port for the rendezvous after 3 tries"
                ) from None
    raise AssertionError("unreachable")


class _PortTaken(RuntimeError):
    pass


def _launch_once(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple,
    timeout: float,
    group_timeout: float,
    backend: str,
    threads: int,
) -> list[Any]:
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.Queue()
    port = find_free_port()
    processes = [
        context.Process(
            target=_worker,
            args=(rank, world_size, port, backend, group_timeout, threads, fn, args, queue),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    results: dict[int, tuple[str, Any]] = {}
    try:
        while len(results) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(results))
                raise TimeoutError(
                    f"launch: ranks {missing} of {world_size} did not finish within {timeout} s"
                )
            try:
                rank, status, payload = queue.get(timeout=min(left, 0.5))
            except Exception:  # queue.Empty: check whether a process died without reporting
                dead = [r for r, p in enumerate(processes) if p.exitcode not in (None, 0)]
                dead = [r for r in dead if r not in results]
                if dead:
                    raise RuntimeError(
                        f"launch: ranks {dead} exited with codes "
                        f"{[processes[r].exitcode for r in dead]} without a result"
                    ) from None
                continue
            results[rank] = (status, payload)
            if status == "error":  # the others may wait on it: give them a moment, no more
                deadline = min(deadline, time.monotonic() + 3.0)
    finally:
        for process in processes:
            process.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
            if process.is_alive():
                process.kill()
                process.join()
    errors = {r: payload for r, (status, payload) in results.items() if status == "error"}
    if errors:
        if any("address already in use" in e.lower() for e in errors.values()):
            raise _PortTaken()
        first = min(errors)
        raise RuntimeError(f"launch: rank {first} of {world_size} failed:\n{errors[first]}")
    return [pickle.loads(results[r][1]) for r in range(world_size)]
