"""Experiments of chapter 9, "Batch norm in practice".

Every function takes keyword arguments with small defaults (a few seconds on one CPU core) and
returns plain data. The digits here are scikit-learn's 8x8 digits with pixels in [0, 1]
(``load_digits(standardize=False)``), so that a shift of brightness or contrast is a change of
pixel values a reader can picture; the networks start with ``Linear -> BatchNorm1d``, which
takes care of the input's scale.

* :func:`pretrain` trains the chapter's model: a ReLU MLP with two hidden layers of 100 units,
  each followed by batch norm.
* :func:`shift_images` makes the shifted test sets (brightness, contrast, noise);
  :func:`shift_and_adapt` measures the accuracy drop and what AdaBN and Tent recover, and
  :func:`adaptation_on_one_class` what they do when the test data come one class at a time.
* :func:`finetune_comparison` fine-tunes the pretrained model on a small shifted task with
  batch norm updating or frozen, at several batch sizes.
* :func:`discriminator_batches` trains a real-vs-fake discriminator on mixed or separate
  batches; :func:`composition_leak` measures how the share of fakes in a batch changes the
  training-mode predictions of the same examples.
* :func:`half_precision_model` converts a model whose first batch norm sees variances above
  float16's range with ``.half()``, with and without the fix.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bncourse import adaptation, frozen, precision
from bncourse.data import Dataset, load_digits
from bncourse.inference import batch_norm_modules
from bncourse.models import make_mlp
from bncourse.training import evaluate, train
from bncourse.utils import accuracy as _accuracy

__all__ = [
    "SHIFTS",
    "shift_images",
    "pretrain",
    "ShiftAdaptation",
    "shift_and_adapt",
    "OneClassAdaptation",
    "adaptation_on_one_class",
    "FinetuneComparison",
    "finetune_comparison",
    "DiscriminatorRun",
    "discriminator_batches",
    "composition_leak",
    "HalfPrecisionModel",
    "half_precision_model",
    "running_var_in_half",
    "momentum_port",
    "accumulation_gap",
]

SHIFTS: dict[str, float] = {"brightness": 0.5, "contrast": 0.3, "noise": 0.4}
"""The chapter's test-time shifts and their default severities (see :func:`shift_images`)."""


def shift_images(x: np.ndarray, kind: str, severity: float, seed: int = 0) -> np.ndarray:
    """Shift digits with pixels in [0, 1], shape (N, 64) or (N, 1, 8, 8), float32.

    * ``"brightness"``: add ``severity`` and clip to [0, 1];
    * ``"contrast"``: ``0.5 + severity * (x - 0.5)`` (``severity < 1`` lowers the contrast);
    * ``"noise"``: add Gaussian noise of standard deviation ``severity``, clip to [0, 1];
    * ``"none"``: a copy.

    Returns
    -------
    np.ndarray, float32, same shape as ``x``
    """
    x = np.asarray(x, dtype=np.float32)
    if kind == "none":
        return x.copy()
    if kind == "brightness":
        return np.clip(x + severity, 0.0, 1.0).astype(np.float32)
    if kind == "contrast":
        return (0.5 + severity * (x - 0.5)).astype(np.float32)
    if kind == "noise":
        noise = np.random.default_rng(seed).normal(0.0, severity, x.shape)
        return np.clip(x + noise, 0.0, 1.0).astype(np.float32)
    raise ValueError(f"kind must be one of none, {', '.join(SHIFTS)}; got {kind!r}")


def pretrain(
    seed: int = 0,
    steps: int = 400,
    batch_size: int = 60,
    lr: float = 0.1,
    bn_impl: str = "bncourse",
    device: torch.device | str | None = None,
) -> tuple[nn.Module, Dataset]:
    """Train the chapter's model on clean digits (pixels in [0, 1]).

    Returns
    -------
    model : MLP
        ``Linear(64, 100) -> BN -> ReLU -> Linear(100, 100) -> BN -> ReLU -> Linear(100, 10)``,
        trained with SGD, left in evaluation mode.
    data : Dataset
        ``load_digits(seed=seed, standardize=False)``.
    """
    data = load_digits(seed=seed, standardize=False)
    model = make_mlp(
        64, 10, depth=2, width=100, activation="relu", norm="bn", bn_impl=bn_impl, seed=seed
    )
    _fit(model, data, steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device)
    return model.eval(), data


def _fit(model: nn.Module, data: Dataset, **options) -> float:
    """Train with :func:`bncourse.training.train`, no evaluations on the way; test accuracy."""
    return train(model, data, eval_every=0, **options).final_test_accuracy


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class ShiftAdaptation:
    """Test accuracy of one model on shifted test sets (rows: shifts, in ``kinds`` order).

    Attributes
    ----------
    kinds : list of str
        ``"none"`` then the shifts.
    accuracy : dict of str to np.ndarray, each shape (len(kinds),)
        ``"no adaptation"`` (training statistics, evaluation mode), ``"AdaBN"`` (statistics
        recomputed on the shifted test set), ``"batch statistics"`` (each test batch
        normalised with its own statistics, no update: Tent with learning rate 0) and
        ``"Tent"``.
    """

    kinds: list[str]
    accuracy: dict[str, np.ndarray] = field(default_factory=dict)


def _shuffled_batches(x: torch.Tensor, batch_size: int, seed: int) -> tuple[list, torch.Tensor]:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return list(x[order.to(x.device)].split(batch_size)), order


def shift_and_adapt(
    model: nn.Module,
    data: Dataset,
    shifts: dict[str, float] | None = None,
    batch_size: int = 50,
    tent_lr: float = 1e-3,
    seed: int = 0,
) -> ShiftAdaptation:
    """Accuracy on shifted test sets without adaptation, with AdaBN and with Tent.

    Every method sees the shifted test set as shuffled batches of ``batch_size`` (unlabelled);
    AdaBN recomputes the statistics over all of them and then evaluates in evaluation mode;
    Tent (one Adam step per batch, :func:`bncourse.adaptation.tent`) predicts each batch before
    updating on it. ``model`` is not modified.
    """
    shifts = SHIFTS if shifts is None else shifts
    device = _device_of(model)
    y = torch.as_tensor(data.y_test, device=device)
    kinds = ["none", *shifts]
    names = ("no adaptation", "AdaBN", "batch statistics", "Tent")
    result = {name: np.zeros(len(kinds)) for name in names}
    for row, kind in enumerate(kinds):
        shifted = shift_images(data.x_test, kind, shifts.get(kind, 0.0), seed=seed + 1)
        x = torch.as_tensor(shifted, device=device)
        batches, order = _shuffled_batches(x, batch_size, seed)
        result["no adaptation"][row] = evaluate(model, x, y)[1]
        adapted = adaptation.adapt_batch_norm(model, batches, inplace=False)
        result["AdaBN"][row] = evaluate(adapted, x, y)[1]
        for name, lr in (("batch statistics", 0.0), ("Tent", tent_lr)):
            logits = adaptation.tent(model, batches, lr=lr).logits
            result[name][row] = _accuracy(logits, y[order.to(device)])
    return ShiftAdaptation(kinds=kinds, accuracy=result)


@dataclass
class OneClassAdaptation:
    """Adaptation from test data that arrive one class at a time.

    Attributes
    ----------
    adabn_mixed, adabn_one_class : float
        Accuracy on the whole shifted test set after AdaBN on one shuffled batch, and on one
        batch holding a single class, of the same size.
    tent_mixed, tent_sorted : float
        Tent's online accuracy on shuffled batches and on batches sorted by class.
    """

    adabn_mixed: float
    adabn_one_class: float
    tent_mixed: float
    tent_sorted: float


def adaptation_on_one_class(
    model: nn.Module,
    data: Dataset,
    kind: str = "contrast",
    severity: float | None = None,
    batch_size: int = 40,
    tent_lr: float = 1e-3,
    seed: int = 0,
) -> OneClassAdaptation:
    """AdaBN and Tent when the unlabelled test data come one class at a time (``kind`` shift)."""
    severity = SHIFTS[kind] if severity is None else severity
    device = _device_of(model)
    x = torch.as_tensor(shift_images(data.x_test, kind, severity, seed=seed + 1), device=device)
    y = torch.as_tensor(data.y_test, device=device)
    batches, order = _shuffled_batches(x, batch_size, seed)
    one_class = x[y == 0][:batch_size]
    mixed = adaptation.adapt_batch_norm(model, batches[:1], inplace=False)
    single = adaptation.adapt_batch_norm(model, [one_class], inplace=False)
    tent_mixed = adaptation.tent(model, batches, lr=tent_lr).logits
    by_class = torch.argsort(y.cpu(), stable=True).to(device)
    tent_sorted = adaptation.tent(model, list(x[by_class].split(batch_size)), lr=tent_lr).logits
    return OneClassAdaptation(
        adabn_mixed=evaluate(mixed, x, y)[1],
        adabn_one_class=evaluate(single, x, y)[1],
        tent_mixed=_accuracy(tent_mixed, y[order.to(device)]),
        tent_sorted=_accuracy(tent_sorted, y[by_class]),
    )


_FINETUNE_NAMES = ("BN updating", "BN frozen")


@dataclass
class FinetuneComparison:
    """Fine-tuning with batch norm updating or frozen, at several batch sizes.

    Attributes
    ----------
    batch_sizes : list of int
    before : float
        Target test accuracy of the pretrained model, before fine-tuning.
    adabn : float
        Target test accuracy after AdaBN on the (unlabelled) fine-tuning inputs alone.
    runs : np.ndarray, shape (2, len(batch_sizes), runs)
        Target test accuracy after each fine-tuning run, with batch norm updating (ordinary
        training mode), then frozen (``freeze_batch_norm`` with trainable gamma and beta).
    accuracy : dict of str to np.ndarray, each shape (len(batch_sizes),)
        ``"BN updating"`` and ``"BN frozen"``: the mean over the runs.
    """

    batch_sizes: list[int]
    before: float
    adabn: float
    runs: np.ndarray

    @property
    def accuracy(self) -> dict[str, np.ndarray]:
        return dict(zip(_FINETUNE_NAMES, self.runs.mean(axis=2), strict=True))


def finetune_comparison(
    model: nn.Module,
    data: Dataset,
    batch_sizes: tuple[int, ...] = (2, 4, 32),
    num_examples: int = 200,
    steps: int = 200,
    lr: float = 0.003,
    kind: str = "contrast",
    severity: float = 0.5,
    seed: int = 0,
    runs: int = 5,
) -> FinetuneComparison:
    """Fine-tune a pretrained model on ``num_examples`` shifted training digits.

    The target task is the digits under a ``kind`` shift of ``severity``: ``num_examples``
    labelled training images (drawn with ``seed``) and the whole shifted test split. Each
    batch size runs ``steps`` SGD steps at learning rate ``lr`` from the same pretrained
    weights, with batch norm updating (training mode) or frozen (:func:`freeze_batch_norm`,
    gamma and beta trainable), ``runs`` times with the batches drawn in other orders (seeds
    ``seed``, ``seed + 1``, ...); the accuracies are averaged over the runs, since one run at
    batch size 2 moves by several points with the order of its batches. ``model`` is not
    modified.
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(data.num_train, num_examples, replace=False)
    target = Dataset(
        x_train=shift_images(data.x_train[chosen], kind, severity, seed=seed),
        y_train=data.y_train[chosen],
        x_test=shift_images(data.x_test, kind, severity, seed=seed + 1),
        y_test=data.y_test,
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        name=f"digits, {kind} {severity}, {num_examples} examples",
    )
    device = _device_of(model)
    before = evaluate(model, target.x_test, target.y_test)[1]
    adapted = adaptation.adapt_batch_norm(
        model, [torch.as_tensor(target.x_train, device=device)], inplace=False
    )
    adabn = evaluate(adapted, target.x_test, target.y_test)[1]
    accuracy = np.zeros((len(_FINETUNE_NAMES), len(batch_sizes), runs))
    for (i, name), (j, batch_size), run in itertools.product(
        enumerate(_FINETUNE_NAMES), enumerate(batch_sizes), range(runs)
    ):
        student = copy.deepcopy(model)
        if name == "BN frozen":
            frozen.freeze_batch_norm(student, affine_trainable=True)
        options = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed + run)
        accuracy[i, j, run] = _fit(student, target, device=device, **options)
    return FinetuneComparison(list(batch_sizes), before, adabn, accuracy)


@dataclass
class DiscriminatorRun:
    """A real-vs-fake discriminator trained on mixed or separate batches.

    Attributes
    ----------
    model : nn.Module
        The trained discriminator (two logits: real, fake), in evaluation mode.
    train_accuracy : float
        Mean accuracy over the last 50 training steps, in training mode, on the batches as they
        were formed.
    test_accuracy : float
        Accuracy in evaluation mode on held-out real and fake digits (half each).
    """

    model: nn.Module
    train_accuracy: float
    test_accuracy: float


def _fakes(x: np.ndarray, brightness: float) -> np.ndarray:
    return shift_images(x, "brightness", brightness)


def discriminator_batches(
    mixed: bool,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 0.05,
    brightness: float = 0.1,
    seed: int = 0,
) -> DiscriminatorRun:
    """Train a discriminator to tell real digits from "fakes" (the digits brightened).

    The fakes stand in for a generator's output: they differ from the real digits by a shift of
    every pixel by ``brightness``. Each step takes ``batch_size`` real and ``batch_size`` fake
    examples and either puts them in one batch (``mixed=True``) or runs the model on the real
    and the fake batch separately (``mixed=False``, as GAN code that calls ``D(real)`` and
    ``D(fake)`` does), averaging the two cross-entropies. The model is a ReLU MLP with two
    hidden layers of 64 units and batch norm. (A loop of its own: the batches are formed from
    two sources, which :func:`bncourse.training.train` does not do.)
    """
    data = load_digits(seed=seed, standardize=False)
    real = torch.as_tensor(data.x_train)
    fake = torch.as_tensor(_fakes(data.x_train, brightness))
    model = make_mlp(64, 2, depth=2, width=64, activation="relu", norm="bn", seed=seed)
    optim = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    zeros = torch.zeros(batch_size, dtype=torch.int64)
    ones = torch.ones(batch_size, dtype=torch.int64)
    accuracies = []
    model.train()
    for _ in range(steps):
        real_index = torch.randint(0, len(real), (batch_size,), generator=generator)
        fake_index = torch.randint(0, len(fake), (batch_size,), generator=generator)
        if mixed:
            logits = model(torch.cat([real[real_index], fake[fake_index]]))
            labels = torch.cat([zeros, ones])
            loss = F.cross_entropy(logits, labels)
            accuracy = _accuracy(logits, labels)
        else:
            real_logits, fake_logits = model(real[real_index]), model(fake[fake_index])
            loss = 0.5 * (F.cross_entropy(real_logits, zeros) + F.cross_entropy(fake_logits, ones))
            accuracy = 0.5 * (_accuracy(real_logits, zeros) + _accuracy(fake_logits, ones))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        accuracies.append(accuracy)
    x_test = torch.cat(
        [torch.as_tensor(data.x_test), torch.as_tensor(_fakes(data.x_test, brightness))]
    )
    y_test = torch.cat([torch.zeros(len(data.x_test)), torch.ones(len(data.x_test))]).long()
    test_accuracy = evaluate(model, x_test, y_test)[1]
    return DiscriminatorRun(model.eval(), float(np.mean(accuracies[-50:])), test_accuracy)


@torch.no_grad()
def composition_leak(
    model: nn.Module,
    fake_fractions: tuple[float, ...] = (0.1, 0.5, 0.9),
    batch_size: int = 40,
    brightness: float = 0.1,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Training-mode predictions of a discriminator as the share of fakes in a batch changes.

    For each fraction ``f``, batches of ``batch_size`` test examples hold ``f * batch_size``
    fakes and the rest real digits; the model runs in training mode (batch statistics, running
    statistics untouched: the model is copied). Returns the accuracy on the real and on the fake
    examples, shape (len(fake_fractions),) each, averaged over the whole test split.
    """
    data = load_digits(seed=seed, standardize=False)
    real = torch.as_tensor(data.x_test)
    fake = torch.as_tensor(_fakes(data.x_test, brightness))
    probe = copy.deepcopy(model).train()
    result = {"real": np.zeros(len(fake_fractions)), "fake": np.zeros(len(fake_fractions))}
    generator = torch.Generator().manual_seed(seed)
    for column, fraction in enumerate(fake_fractions):
        num_fake = int(round(fraction * batch_size))
        if not 0 < num_fake < batch_size:
            raise ValueError(f"fake_fractions must leave both kinds in a batch, got {fraction}")
        correct = {"real": [], "fake": []}
        for _ in range(len(real) // (batch_size - num_fake)):
            real_index = torch.randint(0, len(real), (batch_size - num_fake,), generator=generator)
            fake_index = torch.randint(0, len(fake), (num_fake,), generator=generator)
            predicted = probe(torch.cat([real[real_index], fake[fake_index]])).argmax(dim=1)
            correct["real"].append((predicted[: batch_size - num_fake] == 0).double())
            correct["fake"].append((predicted[batch_size - num_fake :] == 1).double())
        for kind in result:
            result[kind][column] = float(torch.cat(correct[kind]).mean())
    return result


@dataclass
class HalfPrecisionModel:
    """A model on raw pixel values (0-255), evaluated after ``.half()``.

    Attributes
    ----------
    largest_running_var : float
        The largest running variance of the first batch norm (float32), above float16's 65504.
    inf_after_half : int
        How many of its channels' running variances are ``inf`` after ``.half()``.
    accuracy : dict of str to float
        Test accuracy in float32, after ``.half()``, and after ``.half()`` with the fix
        (:func:`bncourse.precision.half_except_batch_norm`).
    """

    largest_running_var: float
    inf_after_half: int
    accuracy: dict[str, float]


def half_precision_model(
    seed: int = 0, steps: int = 300, init_scale: float = 8.0, bn_impl: str = "bncourse"
) -> HalfPrecisionModel:
    """Train on raw pixels (0-255) in float32, then convert the model with ``.half()``.

    The hidden weights start ``init_scale`` times larger than PyTorch's default (batch norm
    makes the network's function independent of that scale, so nothing in training corrects
    it); with inputs up to 255 the first batch norm then sees variances of a few hundred
    thousand, beyond float16's largest value. (CPU float16 matrix products are slow but fine
    for this small model.)
    """
    digits = load_digits(seed=seed, standardize=False)
    data = Dataset(
        x_train=digits.x_train * 255.0,
        y_train=digits.y_train,
        x_test=digits.x_test * 255.0,
        y_test=digits.y_test,
        num_classes=10,
        input_shape=(64,),
        name="digits, raw pixels 0-255",
    )
    model = make_mlp(
        64,
        10,
        depth=2,
        width=100,
        activation="relu",
        norm="bn",
        bn_impl=bn_impl,
        init_scale=init_scale,
        seed=seed,
    )
    _fit(model, data, steps=steps, batch_size=60, lr=0.1, seed=seed, device="cpu")
    model.eval()
    first = model.hidden[0].norm
    x = torch.as_tensor(data.x_test)
    y = torch.as_tensor(data.y_test)
    half = copy.deepcopy(model).half()
    fixed = precision.half_except_batch_norm(copy.deepcopy(model))
    with torch.no_grad():
        accuracy = {
            "float32": _accuracy(model(x), y),
            "half()": _accuracy(half(x.half()).float(), y),
            "half(), batch norm kept in float32": _accuracy(fixed(x.half()).float(), y),
        }
    return HalfPrecisionModel(
        largest_running_var=float(first.running_var.max()),
        inf_after_half=int(torch.isinf(half.hidden[0].norm.running_var).sum()),
        accuracy=accuracy,
    )


def running_var_in_half(
    layer: nn.Module, scale: float, steps: int = 50, batch_size: int = 64, seed: int = 0
) -> torch.Tensor:
    """Run a float16 batch-norm layer in training mode on ``steps`` batches of ``scale * N(0, 1)``.

    Returns the layer's ``running_var`` afterwards (its dtype is the layer's). The true variance
    is ``scale ** 2``. The layer is modified (it is the point).
    """
    generator = torch.Generator().manual_seed(seed)
    layer.train()
    with torch.no_grad():
        for _ in range(steps):
            x = torch.randn(batch_size, layer.num_features, generator=generator) * scale
            layer(x.to(layer.running_var.dtype))
    return layer.running_var.detach().clone()


def momentum_port(
    model: nn.Module,
    data: Dataset,
    momenta: tuple[float, ...] = (0.99, 0.01),
    num_batches: int = 20,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[float, float]:
    """Test accuracy after ``num_batches`` training-mode passes with each PyTorch momentum.

    A stand-in for a short fine-tuning run of a model ported from Keras: each copy of ``model``
    gets the given ``momentum`` in every batch norm, sees ``num_batches`` training batches of
    ``batch_size`` in training mode (no parameter update: only the running statistics move)
    and is evaluated. Keras' default 0.99 copied literally into PyTorch makes the running
    statistics those of the last batch; the converted 0.01 keeps them smooth.
    """
    device = _device_of(model)
    generator = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(data.x_train, device=device)
    result = {}
    for momentum in momenta:
        copy_ = copy.deepcopy(model).train()
        for bn in batch_norm_modules(copy_):
            bn.momentum = momentum
        with torch.no_grad():
            for _ in range(num_batches):
                index = torch.randint(0, len(x), (batch_size,), generator=generator)
                copy_(x[index.to(device)])
        result[momentum] = evaluate(copy_, data.x_test, data.y_test)[1]
    return result


def accumulation_gap(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, micro_batches: int = 4
) -> tuple[float, int]:
    """How far gradient accumulation over micro-batches is from one large batch, with BN.

    Computes the gradient of the mean cross-entropy over ``(x, y)`` in one training-mode pass,
    and accumulated over ``micro_batches`` equal slices (each loss divided by their number), on
    two copies of ``model``. Without batch norm the two are equal up to rounding; with it each
    slice is normalised with its own statistics.

    Returns
    -------
    relative_difference : float
        ``|g_accumulated - g_full| / |g_full|`` over all parameters.
    running_updates : int
        How many times the first batch norm's statistics were updated by the accumulation
        (``micro_batches``, against 1 for the large batch).
    """
    layers = batch_norm_modules(model)
    start = int(layers[0].num_batches_tracked) if layers else 0
    gradients = []
    for slices in (1, micro_batches):
        copy_ = copy.deepcopy(model).train()
        copy_.zero_grad(set_to_none=True)
        for xs, ys in zip(x.chunk(slices), y.chunk(slices), strict=True):
            (F.cross_entropy(copy_(xs), ys) / slices).backward()
        gradients.append(torch.cat([p.grad.flatten() for p in copy_.parameters()]))
        copy_layers = batch_norm_modules(copy_)
        updates = int(copy_layers[0].num_batches_tracked) - start if copy_layers else 0
    full, accumulated = gradients
    return float((accumulated - full).norm() / full.norm()), updates
