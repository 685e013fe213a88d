"""Experiments of chapter 8, "Small batches and many devices".

Every function takes keyword arguments with small defaults (the book's runs take seconds on two
CPU cores) and returns plain data. ``k`` devices without synchronisation are simulated in one
process by :class:`bncourse.batch_variants.GhostBatchNorm`: BN over each slice of
``per_device`` examples of the global batch is exactly what the devices compute. The real
multi-process runs (:func:`run_sync_demo`) use :func:`bncourse.distributed.launch`.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bncourse.batch_variants import GhostBatchNorm, to_batch_variant
from bncourse.data import Dataset, load_digits
from bncourse.distributed import SyncBatchNorm, collective_numbers, launch, replace_batch_norms
from bncourse.models import make_cnn, make_mlp
from bncourse.training import train

__all__ = [
    "NORMS",
    "RunResult",
    "SyncDemo",
    "accumulation_experiment",
    "batch_size_one_experiment",
    "class_sorted_batches",
    "make_model",
    "per_device_sweep",
    "run_sync_demo",
    "statistics_noise",
    "sync_demo_worker",
    "train_per_device",
]

NORMS = ("bn", "renorm", "gn")
MLP_WIDTH = 64
GN_GROUPS = 8


# ---------------------------------------------------------------------------------------------
# Models with per-device normalisation
# ---------------------------------------------------------------------------------------------


def _group_norms(model: nn.Module, groups: int) -> nn.Module:
    """Replace every BN layer by ``GroupNorm(groups, C)`` (per example: no batch)."""

    def build(layer: nn.Module, name: str) -> nn.Module | None:
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            return nn.GroupNorm(groups, layer.num_features, eps=layer.eps)
        return None

    return replace_batch_norms(model, build)


def make_model(
    norm: str = "bn", per_device: int | None = None, *, kind: str = "mlp", seed: int = 0
) -> nn.Module:
    """The chapter's MLP (64-64-64-10, ReLU) or small CNN (channels 16, 32) with one
    normalisation, each device's statistics over ``per_device`` examples.

    Parameters
    ----------
    norm : {"bn", "renorm", "gn"}
        Batch norm, batch renormalisation (``r_max = 3, d_max = 5``) or GroupNorm with
        :data:`GN_GROUPS` groups (which does not depend on the batch).
    per_device : int, optional
        Examples per simulated device (ghost batch); None: the whole batch (one device, or
        synchronised devices).
    kind : {"mlp", "cnn"}
    seed : int
        Seed of the initial weights (the same for every ``norm``).

    Returns
    -------
    nn.Module
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if kind == "mlp":
        model = make_mlp(
            64,
            10,
            depth=2,
            width=MLP_WIDTH,
            activation="relu",
            norm="bn",
            bn_impl="torch",
            seed=seed,
        )
    elif kind == "cnn":
        model = make_cnn(channels=(16, 32), norm="bn", bn_impl="torch", seed=seed)
    else:
        raise ValueError(f"kind must be 'mlp' or 'cnn', got {kind!r}")
    if norm == "gn":
        return _group_norms(model, GN_GROUPS)
    if norm == "renorm":
        return to_batch_variant(model, "renorm", virtual_batch_size=per_device)
    if per_device is not None:
        return to_batch_variant(model, "ghost", virtual_batch_size=per_device)
    return model


@dataclass
class RunResult:
    """One training run: the setting and its accuracies (fractions in [0, 1])."""

    norm: str
    per_device: int | None
    batch_size: int
    test_accuracy: float
    train_accuracy: float
    steps: int
    extra: dict = field(default_factory=dict)


def class_sorted_batches(
    labels: np.ndarray, batch_size: int, per_device: int, steps: int, seed: int = 0
) -> list[np.ndarray]:
    """Mini-batches whose per-device slices each hold one class (non-i.i.d. devices).

    Each batch is ``batch_size // per_device`` slices of ``per_device`` examples; slice ``d``
    of a batch holds examples of one class drawn at random (different classes for different
    slices while there are enough classes), so the global batch still mixes classes.

    Parameters
    ----------
    labels : np.ndarray, shape (N,)
        Class labels of the training split.
    batch_size, per_device : int
        ``batch_size`` must be a multiple of ``per_device``.
    steps : int
        Number of batches.
    seed : int

    Returns
    -------
    list of np.ndarray
        ``steps`` index arrays of length ``batch_size``.
    """
    if batch_size % per_device:
        raise ValueError(f"batch_size {batch_size} must be a multiple of per_device {per_device}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    devices = batch_size // per_device
    batches = []
    for _ in range(steps):
        classes = rng.choice(len(by_class), size=devices, replace=devices > len(by_class))
        batch = [rng.choice(by_class[c], size=per_device, replace=False) for c in classes]
        batches.append(np.concatenate(batch))
    return batches


def train_per_device(
    norm: str = "bn",
    per_device: int | None = None,
    *,
    kind: str = "mlp",
    batch_size: int = 32,
    steps: int = 300,
    lr: float = 0.05,
    seed: int = 0,
    sorted_by_class: bool = False,
    class_block: int | None = None,
    data: Dataset | None = None,
    device: torch.device | str | None = None,
) -> RunResult:
    """Train :func:`make_model` with SGD (momentum 0.9) on the digits and report accuracies.

    Parameters
    ----------
    norm, per_device, kind
        See :func:`make_model`.
    batch_size : int, default 32
        The global batch (all devices together).
    steps : int, default 300
        Parameter updates.
    lr : float, default 0.05
    seed : int
        Seed of the weights and of the batch order.
    sorted_by_class : bool, default False
        Use :func:`class_sorted_batches`: each block of ``class_block`` consecutive examples
        of a batch holds one class.
    class_block : int, optional
        Default ``per_device`` (each device sees one class per step). With
        ``per_device=None`` and ``class_block=4``: devices of 4 examples, each of one class,
        whose BN is synchronised over the whole batch.
    data : Dataset, optional
        Default ``load_digits(flatten=kind == "mlp")``.
    device : optional
        Default :func:`bncourse.get_device`.

    Returns
    -------
    RunResult
        Test accuracy in evaluation mode (running statistics), training accuracy over the last
        50 steps.
    """
    data = data if data is not None else load_digits(flatten=kind == "mlp")
    model = make_model(norm, per_device, kind=kind, seed=seed)
    batches = None
    if sorted_by_class:
        batches = class_sorted_batches(
            data.y_train, batch_size, class_block or per_device or batch_size, steps, seed=seed
        )
    history = train(
        model,
        data,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        momentum=0.9,
        seed=seed,
        eval_every=0,
        device=device,
        batches=batches,
    )
    return RunResult(
        norm=norm,
        per_device=per_device,
        batch_size=batch_size,
        test_accuracy=history.final_test_accuracy,
        train_accuracy=float(np.mean(history.train_accuracy[-50:])),
        steps=steps,
        extra={"model": model},
    )


def per_device_sweep(
    per_device_sizes: tuple[int, ...] = (2, 4, 8, 32),
    norms: tuple[str, ...] = ("bn",),
    **kwargs,
) -> list[RunResult]:
    """:func:`train_per_device` for every norm and per-device size (GroupNorm, which does not
    depend on the batch, is trained once and reported for every size)."""
    results = []
    data = kwargs.pop("data", None) or load_digits(flatten=kwargs.get("kind", "mlp") == "mlp")
    for norm in norms:
        if norm == "gn":
            run = train_per_device("gn", None, data=data, **kwargs)
            results += [dataclasses.replace(run, per_device=m) for m in per_device_sizes]
            continue
        for m in per_device_sizes:
            results.append(train_per_device(norm, m, data=data, **kwargs))
    return results


# ---------------------------------------------------------------------------------------------
# Noise of per-device statistics
# ---------------------------------------------------------------------------------------------


def statistics_noise(
    per_device_sizes: tuple[int, ...] = (2, 4, 8, 16, 32), *, draws: int = 2000, seed: int = 0
) -> dict[str, np.ndarray]:
    """How far one device's batch mean and standard deviation fall from the whole data's.

    The values are the first hidden layer's pre-activations (64 units) of the chapter's
    untrained MLP on the digits' training split. For each size ``m``, ``draws`` random slices
    of ``m`` examples give per-unit means and (biased) standard deviations; their errors are
    measured in units of the whole split's standard deviation.

    Returns
    -------
    dict
        ``sizes``; ``mean_error`` (RMS of (mean_B - mu) / sigma over draws and units);
        ``std_error`` (RMS of sigma_B / sigma - 1); ``mean_theory`` (``1 / sqrt(m)``, the
        error of an average of ``m`` independent draws).
    """
    data = load_digits()
    model = make_model("bn", seed=seed)
    with torch.no_grad():
        z = model.hidden[0].linear(data.tensors("cpu").x_train).numpy().astype(np.float64)
    mu, sigma = z.mean(0), z.std(0)
    rng = np.random.default_rng(seed)
    mean_error, std_error = [], []
    for m in per_device_sizes:
        index = np.stack([rng.choice(len(z), size=m, replace=False) for _ in range(draws)])
        slices = z[index]  # (draws, m, units)
        mean_error.append(np.sqrt(np.mean(((slices.mean(1) - mu) / sigma) ** 2)))
        std_error.append(np.sqrt(np.mean((slices.std(1) / sigma - 1) ** 2)))
    sizes = np.asarray(per_device_sizes)
    return {
        "sizes": sizes,
        "mean_error": np.asarray(mean_error),
        "std_error": np.asarray(std_error),
        "mean_theory": 1 / np.sqrt(sizes),
    }


# ---------------------------------------------------------------------------------------------
# A conv net with one image per device
# ---------------------------------------------------------------------------------------------


def _per_image_accuracy(model: nn.Module, data: Dataset) -> float:
    """Test accuracy when every test image is normalised with its own statistics (train-mode
    BN on batches of one image; the model's running statistics are left untouched)."""
    probe = to_batch_variant(copy.deepcopy(model), "ghost", virtual_batch_size=1)
    for layer in probe.modules():
        if isinstance(layer, GhostBatchNorm):
            layer.virtual_batch_size, layer.momentum = 1, 0.0
    probe.train()
    tensors = data.tensors(next(model.parameters()).device)
    with torch.no_grad():
        logits = probe(tensors.x_test)
    return float((logits.argmax(1) == tensors.y_test).float().mean())


def batch_size_one_experiment(
    *, steps: int = 300, batch_size: int = 32, seed: int = 0, device=None
) -> dict[str, dict[str, float]]:
    """Train the CNN with one image per device (statistics over H*W of that image) and with
    the whole batch of ``batch_size``, and evaluate each two ways.

    Returns
    -------
    dict
        ``{"1 image per device": {...}, "32 images per device": {...}}`` with
        ``train_accuracy`` (last 50 steps, the model's own training-mode predictions),
        ``test_running`` (evaluation mode, running statistics) and ``test_per_image``
        (each test image normalised by its own statistics, as in training).
    """
    data = load_digits(flatten=False)
    results = {}
    for per_device in (1, batch_size):
        run = train_per_device(
            "bn",
            per_device,
            kind="cnn",
            batch_size=batch_size,
            steps=steps,
            seed=seed,
            data=data,
            device=device,
        )
        model = run.extra["model"]
        results[f"{per_device} image{'s' if per_device > 1 else ''} per device"] = {
            "train_accuracy": run.train_accuracy,
            "test_running": run.test_accuracy,
            "test_per_image": _per_image_accuracy(model, data),
        }
    return results


# ---------------------------------------------------------------------------------------------
# Gradient accumulation
# ---------------------------------------------------------------------------------------------


def _gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, micro: int) -> torch.Tensor:
    """Flattened parameter gradient of the mean cross-entropy, accumulated over micro-batches
    of ``micro`` examples (each micro-batch's loss weighted by its share)."""
    model.zero_grad()
    for xs, ys in zip(torch.split(x, micro), torch.split(y, micro), strict=True):
        loss = F.cross_entropy(model(xs), ys) * len(xs) / len(x)
        loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def accumulation_experiment(
    *, batch_size: int = 32, micro: int = 4, seed: int = 0
) -> dict[str, float]:
    """Gradient accumulation over micro-batches against one large batch, for BN.

    Returns
    -------
    dict
        ``gap_to_large_batch``: relative difference (norm of the difference / norm) between the
        accumulated gradient and the large batch's; ``gap_to_ghost``: the same between the
        accumulated gradient and a large batch with per-device statistics over ``micro``
        examples (:class:`GhostBatchNorm`); ``tracked_accumulated`` and ``tracked_large``:
        ``num_batches_tracked`` of the first BN layer after one optimiser step each way;
        ``running_mean_gap``: relative difference of that layer's running means.
    """
    data = load_digits()
    x, y = data.tensors("cpu").x_train[:batch_size], data.tensors("cpu").y_train[:batch_size]
    x, y = x.double(), y
    large, accumulated, ghost = (make_model("bn", seed=seed).double() for _ in range(3))
    ghost = to_batch_variant(ghost, "ghost", virtual_batch_size=micro)
    g_large = _gradient(large, x, y, batch_size)
    g_accumulated = _gradient(accumulated, x, y, micro)
    g_ghost = _gradient(ghost, x, y, batch_size)

    def gap(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    bn_large, bn_accumulated = large.hidden[0].norm, accumulated.hidden[0].norm
    return {
        "gap_to_large_batch": gap(g_accumulated, g_large),
        "gap_to_ghost": gap(g_accumulated, g_ghost),
        "tracked_accumulated": int(bn_accumulated.num_batches_tracked),
        "tracked_large": int(bn_large.num_batches_tracked),
        "running_mean_gap": gap(bn_accumulated.running_mean, bn_large.running_mean),
    }


# ---------------------------------------------------------------------------------------------
# Synchronised batch norm and DDP on real processes
# ---------------------------------------------------------------------------------------------


def _timed(step, repeats: int) -> float:
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def _ddp_running_means(
    rank: int,
    world_size: int,
    setup: str,
    steps: int,
    seed: int,
    x: torch.Tensor,
    y: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Train the MLP with DDP for ``steps`` on this rank's part of each batch; return the first
    BN layer's running mean and the state the rank would save in a checkpoint."""
    started = time.perf_counter()
    model = make_model("bn", seed=seed)
    if setup == "SyncBatchNorm":
        model = SyncBatchNorm.convert_sync_batchnorm(model)
    # forward_sync_buffers: the name of broadcast_buffers since PyTorch 2.13
    ddp = nn.parallel.DistributedDataParallel(model, forward_sync_buffers=setup != "no broadcast")
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    rng = np.random.default_rng(seed)
    per_rank = 16
    for _ in range(steps):
        index = rng.choice(len(x), size=per_rank * world_size, replace=False)
        mine = torch.from_numpy(index[rank * per_rank : (rank + 1) * per_rank])
        loss = F.cross_entropy(ddp(x[mine]), y[mine])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {
        "seconds": time.perf_counter() - started,
        "running_mean": model.hidden[0].norm.running_mean.clone(),
        "weight": model.hidden[0].linear.weight.detach().clone(),
    }


def sync_demo_worker(
    rank: int,
    world_size: int,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    per_rank: int = 8,
    ddp_steps: int = 10,
    seed: int = 0,
) -> dict:
    """The chapter's multi-process demonstration (run by :func:`run_sync_demo` in each rank).

    1. :class:`SyncBatchNorm` on this rank's slice of a global (N, 8, 4, 4) float64 batch:
       output and input gradient, compared by the parent with BN on the global batch.
    2. Time per forward and backward of SyncBatchNorm and of ``torch.nn.BatchNorm2d`` on a
       (32, 64, 8, 8) float32 batch per rank.
    3. Three DDP trainings of the chapter's MLP on the digits' training split ``x_train``,
       ``y_train`` (passed in: the processes need not import scikit-learn): BN with buffers
       broadcast (DDP's default), BN without, and SyncBatchNorm; the first BN layer's running
       mean and first weight matrix on each rank.
    """
    started = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x = 2.0 + torch.randn(per_rank * world_size, 8, 4, 4, generator=generator, dtype=torch.float64)
    weights = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    mine = x[part].clone().requires_grad_()
    layer = SyncBatchNorm(8).double()
    out = layer(mine)
    (out * weights[part]).sum().backward()
    result = {"output": out.detach(), "grad": mine.grad, "running_var": layer.running_var}

    big = torch.randn(32, 64, 8, 8, generator=generator).requires_grad_()
    timings = {}
    for name, module in (("SyncBatchNorm", SyncBatchNorm(64)), ("BatchNorm2d", nn.BatchNorm2d(64))):

        def step(module=module) -> None:
            module(big).sum().backward()

        timings[name] = _timed(step, repeats=10)
    gathered = [torch.empty(129) for _ in range(world_size)]
    timings["collectives alone"] = _timed(
        lambda: (dist.all_gather(gathered, torch.ones(129)), dist.all_reduce(torch.ones(128))),
        repeats=10,
    )
    result["seconds_per_step"] = timings

    result["worker_seconds"] = time.perf_counter() - started
    result["ddp"] = {
        setup: _ddp_running_means(rank, world_size, setup, ddp_steps, seed, x_train, y_train)
        for setup in ("broadcast", "no broadcast", "SyncBatchNorm")
    }
    return result


@dataclass
class SyncDemo:
    """What :func:`run_sync_demo` measured."""

    world_size: int
    output_gap: float
    grad_gap: float
    running_var_gap: float
    seconds_per_step: dict[str, float]
    numbers_per_layer: dict[str, int]
    running_mean_spread: dict[str, float]
    weight_spread: dict[str, float]
    wall_time: float


def run_sync_demo(
    world_size: int = 2, *, per_rank: int = 8, ddp_steps: int = 10, seed: int = 0, timeout=120.0
) -> SyncDemo:
    """Run :func:`sync_demo_worker` on ``world_size`` gloo processes and compare with one
    process: the largest differences between SyncBatchNorm (per rank) and ``torch.nn``'s BN on
    the global batch, the timings, and how far the ranks' running means are apart (largest
    absolute difference between rank 0 and any other rank) after DDP training."""
    start = time.perf_counter()
    data = load_digits()
    train_split = (data.tensors("cpu").x_train, data.tensors("cpu").y_train)
    arguments = (*train_split, per_rank, ddp_steps, seed)
    results = launch(sync_demo_worker, world_size, arguments, timeout=timeout)
    wall_time = time.perf_counter() - start
    generator = torch.Generator().manual_seed(seed)
    x = 2.0 + torch.randn(per_rank * world_size, 8, 4, 4, generator=generator, dtype=torch.float64)
    weights = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    x.requires_grad_()
    reference = nn.BatchNorm2d(8).double()
    out = reference(x)
    (out * weights).sum().backward()
    output = torch.cat([r["output"] for r in results])
    grad = torch.cat([r["grad"] for r in results])

    def spread(key: str, setup: str) -> float:
        first = results[0]["ddp"][setup][key]
        return max(float((r["ddp"][setup][key] - first).abs().max()) for r in results[1:])

    setups = results[0]["ddp"].keys()
    return SyncDemo(
        world_size=world_size,
        output_gap=float((output - out.detach()).abs().max()),
        grad_gap=float((grad - x.grad).abs().max()),
        running_var_gap=max(
            float((r["running_var"] - reference.running_var).abs().max()) for r in results
        ),
        seconds_per_step=results[0]["seconds_per_step"],
        numbers_per_layer=collective_numbers(64, world_size),
        running_mean_spread={s: spread("running_mean", s) for s in setups},
        weight_spread={s: spread("weight", s) for s in setups},
        wall_time=wall_time,
    )
