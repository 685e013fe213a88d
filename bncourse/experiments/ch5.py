"""Experiments of chapter 5: batch norm in convolutional networks.

* :func:`spatial_batch_norm_forward` / :func:`spatial_batch_norm_backward`: BN for image batches
  (N, C, H, W) obtained from the 1-D transform of :mod:`bncourse.numpy_bn` by moving the channels
  last and stacking every position of every image as a row, (N * H * W, C).
* :func:`per_location_batch_norm_forward`: the alternative that does *not* work for images,
  statistics per channel *and position* over the batch only.
* :func:`compare_with_torch`: parity of the NumPy version with ``torch.nn.BatchNorm2d`` and
  :class:`bncourse.torch_bn.BatchNorm2d`, contiguous and channels-last.
* :func:`translation_experiment`: the same pattern at two positions, normalised both ways.
* :func:`statistics_noise_experiment`: how far a mini-batch's statistics are from the
  population's when each is estimated from m * p * q values or from m.
* :func:`train_cnn` / :func:`learning_rate_sweep`: the small CNN of :func:`bncourse.models.make_cnn`
  on the digits, with and without BN; :func:`initial_signal_scale`: how the signal shrinks
  through the untrained network without BN.
* :func:`folding_experiment`: fold every conv + BN pair of a trained CNN for inference
  (:func:`bncourse.inference.fold_batch_norms`) and compare the logits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bncourse import get_device, numpy_bn, training, utils
from bncourse.data import Dataset, load_digits
from bncourse.inference import batch_norm_modules, fold_batch_norms
from bncourse.models import CNN, make_cnn
from bncourse.torch_bn import BatchNorm2d
from bncourse.training import TrainingHistory, train

__all__ = [
    "images_to_rows",
    "rows_to_images",
    "spatial_batch_norm_forward",
    "spatial_batch_norm_backward",
    "per_location_batch_norm_forward",
    "compare_with_torch",
    "TranslationResult",
    "translation_experiment",
    "NoiseResult",
    "statistics_noise_experiment",
    "train_cnn",
    "learning_rate_sweep",
    "conv_weight_norms",
    "weight_norm_growth",
    "SignalScale",
    "initial_signal_scale",
    "FoldingResult",
    "folding_experiment",
]


# ---------------------------------------------------------------------------------------------
# Spatial batch norm from the 1-D one
# ---------------------------------------------------------------------------------------------


def images_to_rows(x: np.ndarray) -> np.ndarray:
    """Stack every position of every image as a row: (N, C, H, W) -> (N * H * W, C).

    Row ``(n * H + h) * W + w`` holds the C channel values of image n at position (h, w).
    """
    if x.ndim != 4:
        raise ValueError(f"x must have shape (N, C, H, W), got {x.shape}")
    return x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])


def rows_to_images(rows: np.ndarray, shape: tuple[int, int, int, int]) -> np.ndarray:
    """Undo :func:`images_to_rows`: (N * H * W, C) -> (N, C, H, W) of the given ``shape``."""
    n, c, h, w = shape
    return rows.reshape(n, h, w, c).transpose(0, 3, 1, 2)


def spatial_batch_norm_forward(
    x: np.ndarray, gamma: np.ndarray | None, beta: np.ndarray | None, eps: float = 1e-5
) -> tuple[np.ndarray, numpy_bn.BatchNormCache]:
    """Batch norm for images, by reshaping onto the 1-D transform.

    Every channel is normalised with the mean and biased variance of its N * H * W values, and
    scaled and shifted by one ``gamma[c]`` and ``beta[c]``.

    Parameters
    ----------
    x : np.ndarray, shape (N, C, H, W)
    gamma, beta : np.ndarray, shape (C,), or None
    eps : float

    Returns
    -------
    y : np.ndarray, shape (N, C, H, W), dtype of x
    cache : numpy_bn.BatchNormCache
        The cache of the 1-D transform on the (N * H * W, C) rows, for
        :func:`spatial_batch_norm_backward`.
    """
    y_rows, cache = numpy_bn.batch_norm_forward(images_to_rows(x), gamma, beta, eps)
    return rows_to_images(y_rows, x.shape), cache


def spatial_batch_norm_backward(
    dy: np.ndarray, cache: numpy_bn.BatchNormCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`spatial_batch_norm_forward`: the 1-D backward on the same rows.

    Parameters
    ----------
    dy : np.ndarray, shape (N, C, H, W)
    cache : the cache returned by the forward pass

    Returns
    -------
    dx : np.ndarray, shape (N, C, H, W)
    dgamma, dbeta : np.ndarray, shape (C,)
    """
    dx_rows, dgamma, dbeta = numpy_bn.batch_norm_backward(images_to_rows(dy), cache)
    return rows_to_images(dx_rows, dy.shape), dgamma, dbeta


def per_location_batch_norm_forward(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Normalise every (channel, position) pair over the batch only: what BN would do to images
    flattened into (N, C * H * W) vectors. Not what convolutional networks use.

    Parameters
    ----------
    x : np.ndarray, shape (N, C, H, W)

    Returns
    -------
    np.ndarray, shape (N, C, H, W)
        Each of the C * H * W values is standardised with its own mean and variance over N.
    """
    y, _ = numpy_bn.batch_norm_forward(x.reshape(len(x), -1), None, None, eps)
    return y.reshape(x.shape)


def _largest_difference(a, b) -> float:
    as_numpy = [t.detach().cpu().numpy() if torch.is_tensor(t) else np.asarray(t) for t in (a, b)]
    return float(np.max(np.abs(as_numpy[0] - as_numpy[1])))


def compare_with_torch(
    shape: tuple[int, int, int, int] = (8, 4, 6, 5),
    seed: int = 0,
    eps: float = 1e-5,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Largest differences between the NumPy spatial BN and PyTorch's, forward and backward.

    The NumPy version (:func:`spatial_batch_norm_forward`, float64) is compared with
    ``torch.nn.BatchNorm2d`` on a contiguous (NCHW) input and on the same input in the
    channels-last memory format (NHWC in memory), and with
    :class:`bncourse.torch_bn.BatchNorm2d` on the channels-last input. All in float64.

    Returns
    -------
    dict of str to float
        Keys ``"<quantity>, <implementation>"``, quantity in {"y", "dx", "dgamma", "dbeta"},
        implementation in {"torch.nn NCHW", "torch.nn channels-last",
        "torch_bn channels-last"}; values are the largest absolute differences to NumPy.
        Key ``"channels-last kept"`` is 1.0 if both torch modules returned channels-last
        outputs and gradients, else 0.0.
    """
    device = get_device(device)
    rng = np.random.default_rng(seed)
    channels = shape[1]
    offsets = rng.normal(0.0, 5.0, size=(1, channels, 1, 1))
    scales = rng.uniform(0.1, 3.0, size=(1, channels, 1, 1))
    x = offsets + scales * rng.standard_normal(shape)
    gamma = rng.uniform(0.5, 2.0, size=channels)
    beta = rng.normal(size=channels)
    dy = rng.standard_normal(shape)

    y_np, cache = spatial_batch_norm_forward(x, gamma, beta, eps)
    dx_np, dgamma_np, dbeta_np = spatial_batch_norm_backward(dy, cache)

    differences: dict[str, float] = {}
    kept = True
    cases = [
        ("torch.nn NCHW", nn.BatchNorm2d, torch.contiguous_format),
        ("torch.nn channels-last", nn.BatchNorm2d, torch.channels_last),
        ("torch_bn channels-last", BatchNorm2d, torch.channels_last),
    ]
    for name, module_class, memory_format in cases:
        module = module_class(channels, eps=eps, dtype=torch.float64, device=device)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(gamma))
            module.bias.copy_(torch.from_numpy(beta))
        x_t = torch.tensor(x, device=device).contiguous(memory_format=memory_format)
        x_t.requires_grad_(True)
        y_t = module(x_t)
        y_t.backward(torch.tensor(dy, device=device).contiguous(memory_format=memory_format))
        if memory_format is torch.channels_last:
            kept &= y_t.is_contiguous(memory_format=torch.channels_last)
            kept &= x_t.grad.is_contiguous(memory_format=torch.channels_last)
        differences[f"y, {name}"] = _largest_difference(y_np, y_t)
        differences[f"dx, {name}"] = _largest_difference(dx_np, x_t.grad)
        differences[f"dgamma, {name}"] = _largest_difference(dgamma_np, module.weight.grad)
        differences[f"dbeta, {name}"] = _largest_difference(dbeta_np, module.bias.grad)
    differences["channels-last kept"] = float(kept)
    return differences


# ---------------------------------------------------------------------------------------------
# Per-channel vs per-location statistics
# ---------------------------------------------------------------------------------------------

PLUS = np.array([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
"""The 3x3 pattern of :func:`translation_experiment` (a small cross, pixel values 0 and 1)."""


def _digit_feature_maps(batch_size: int, channels: int, seed: int) -> tuple[np.ndarray, nn.Conv2d]:
    """Feature maps (batch_size, channels, 8, 8) of a seeded random 3x3 convolution (float64)
    applied to digits with pixel values in [0, 1], and the convolution itself."""
    data = load_digits(standardize=False, flatten=False, seed=seed)
    rng = np.random.default_rng(seed)
    index = rng.choice(data.num_train, size=batch_size, replace=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        conv = nn.Conv2d(1, channels, 3, padding=1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        maps = conv(torch.from_numpy(data.x_train[index].astype(np.float64))).numpy()
    return maps, conv


@dataclass
class TranslationResult:
    """What :func:`translation_experiment` measured.

    Attributes
    ----------
    images : np.ndarray, shape (2, 8, 8)
        Two images holding the same pattern at ``positions[0]`` and ``positions[1]``.
    positions : list of (row, col)
        Top-left corners of the 3x3 pattern in the two images.
    responses : np.ndarray, shape (2, C, 8, 8)
        The convolution's feature maps of the two images.
    per_channel, per_location : np.ndarray, shape (2, C, 8, 8)
        The responses normalised with statistics of a training batch: one mean and variance per
        channel (over N * H * W values) or one per channel and position (over N values).
    channel_mean, channel_var : np.ndarray, shape (C,)
    location_mean, location_var : np.ndarray, shape (C, 8, 8)
        The statistics of the batch (biased variances).
    response_gap, channel_gap, location_gap : float
        Largest absolute difference between the two 3x3 patches under the pattern: of the raw
        responses, after per-channel and after per-location normalisation.
    location_gap_mean : float
        Mean absolute difference between the two patches after per-location normalisation.
    """

    images: np.ndarray
    positions: list[tuple[int, int]]
    responses: np.ndarray
    per_channel: np.ndarray
    per_location: np.ndarray
    channel_mean: np.ndarray
    channel_var: np.ndarray
    location_mean: np.ndarray
    location_var: np.ndarray
    response_gap: float
    channel_gap: float
    location_gap: float
    location_gap_mean: float


def translation_experiment(
    positions: tuple[tuple[int, int], tuple[int, int]] = ((2, 2), (5, 5)),
    batch_size: int = 256,
    channels: int = 8,
    seed: int = 0,
    eps: float = 1e-5,
) -> TranslationResult:
    """Normalise the responses to one pattern at two positions with per-channel and per-location
    statistics.

    A seeded random 3x3 convolution (``channels`` filters, no bias) is applied to a batch of
    ``batch_size`` training digits (pixels in [0, 1]); its feature maps give the batch
    statistics, per channel and per (channel, position). Two blank images carry :data:`PLUS` at
    the two positions; a convolution is translation-equivariant, so their responses under the
    pattern are identical, and so they stay after per-channel normalisation (the same affine map
    everywhere). Per-location statistics normalise them differently.

    Returns
    -------
    TranslationResult
    """
    maps, conv = _digit_feature_maps(batch_size, channels, seed)
    channel_mean, channel_var = numpy_bn.batch_statistics(maps)
    location_mean = maps.mean(axis=0)
    location_var = maps.var(axis=0)

    images = np.zeros((2, 8, 8))
    for image, (row, col) in zip(images, positions, strict=True):
        image[row : row + 3, col : col + 3] = PLUS
    with torch.no_grad():
        responses = conv(torch.from_numpy(images[:, None])).numpy()
    per_channel = (responses - channel_mean[None, :, None, None]) / np.sqrt(
        channel_var[None, :, None, None] + eps
    )
    per_location = (responses - location_mean[None]) / np.sqrt(location_var[None] + eps)

    def patches(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        (r0, c0), (r1, c1) = positions
        return values[0, :, r0 : r0 + 3, c0 : c0 + 3], values[1, :, r1 : r1 + 3, c1 : c1 + 3]

    def gap(values: np.ndarray) -> np.ndarray:
        first, second = patches(values)
        return np.abs(first - second)

    return TranslationResult(
        images=images,
        positions=[tuple(p) for p in positions],
        responses=responses,
        per_channel=per_channel,
        per_location=per_location,
        channel_mean=channel_mean,
        channel_var=channel_var,
        location_mean=location_mean,
        location_var=location_var,
        response_gap=float(gap(responses).max()),
        channel_gap=float(gap(per_channel).max()),
        location_gap=float(gap(per_location).max()),
        location_gap_mean=float(gap(per_location).mean()),
    )


@dataclass
class NoiseResult:
    """What :func:`statistics_noise_experiment` measured.

    Attributes
    ----------
    batch_size : int
        m, images per mini-batch.
    values_per_channel, values_per_location : int
        m * H * W and m: how many values each statistic is estimated from.
    channel_mean_error, location_mean_error : float
        Root-mean-square error of the mini-batch mean against the population mean, in units of
        the population standard deviation of the same quantity, averaged over channels (and
        positions).
    channel_std_error, location_std_error : float
        The same for the mini-batch standard deviation (relative error).
    """

    batch_size: int
    values_per_channel: int
    values_per_location: int
    channel_mean_error: float
    location_mean_error: float
    channel_std_error: float
    location_std_error: float


def statistics_noise_experiment(
    batch_size: int = 8,
    num_batches: int = 200,
    channels: int = 8,
    seed: int = 0,
    min_std: float = 0.05,
) -> NoiseResult:
    """How noisy mini-batch statistics are when estimated per channel or per location.

    Feature maps of a random 3x3 convolution on all 1347 training digits define the population.
    ``num_batches`` random mini-batches of ``batch_size`` images each give mini-batch means and
    standard deviations per channel (over m * 8 * 8 values) and per (channel, position) (over m
    values). Positions whose population standard deviation is below ``min_std`` (the blank
    border of the digits) are left out of the per-location average, which flatters it.

    Returns
    -------
    NoiseResult
    """
    maps, _ = _digit_feature_maps(1347, channels, seed)
    rng = np.random.default_rng(seed + 1)
    channel_mean = maps.mean(axis=(0, 2, 3))
    channel_std = maps.std(axis=(0, 2, 3))
    location_mean = maps.mean(axis=0)
    location_std = maps.std(axis=0)
    keep = location_std > min_std
    safe_std = np.where(keep, location_std, 1.0)
    errors = {key: [] for key in ("cm", "lm", "cs", "ls")}
    for _ in range(num_batches):
        batch = maps[rng.choice(len(maps), size=batch_size, replace=False)]
        errors["cm"].append((batch.mean(axis=(0, 2, 3)) - channel_mean) / channel_std)
        errors["cs"].append(batch.std(axis=(0, 2, 3)) / channel_std - 1.0)
        errors["lm"].append(((batch.mean(axis=0) - location_mean) / safe_std)[keep])
        errors["ls"].append((batch.std(axis=0) / safe_std - 1.0)[keep])

    def rms(key: str) -> float:
        return float(np.sqrt(np.mean(np.square(errors[key]))))

    return NoiseResult(
        batch_size=batch_size,
        values_per_channel=batch_size * maps.shape[2] * maps.shape[3],
        values_per_location=batch_size,
        channel_mean_error=rms("cm"),
        location_mean_error=rms("lm"),
        channel_std_error=rms("cs"),
        location_std_error=rms("ls"),
    )


# ---------------------------------------------------------------------------------------------
# A small CNN on the digits
# ---------------------------------------------------------------------------------------------


def train_cnn(
    norm: str | None = "bn",
    lr: float = 0.1,
    steps: int = 200,
    batch_size: int = 60,
    seed: int = 0,
    channels: tuple[int, ...] = (16, 32, 64),
    bn_impl: str = "bncourse",
    eval_every: int = 25,
    data: Dataset | None = None,
    device: torch.device | str | None = None,
) -> tuple[CNN, TrainingHistory]:
    """Train :func:`bncourse.models.make_cnn` on the digits with plain SGD.

    Parameters
    ----------
    norm : {None, "bn"}
        Without or with ``BatchNorm2d`` after every convolution.
    lr, steps, batch_size, seed, eval_every :
        Passed to :func:`bncourse.training.train`; ``seed`` also seeds the initial weights.
    channels, bn_impl :
        Passed to :func:`bncourse.models.make_cnn`.
    data : Dataset, optional
        Default ``load_digits(flatten=False)`` (standardised 1 x 8 x 8 images).
    device : optional
        Default :func:`bncourse.get_device`.

    Returns
    -------
    model : CNN
        The trained model (training mode, on ``device``).
    history : TrainingHistory
    """
    data = load_digits(flatten=False) if data is None else data
    model = _make_cnn(data, norm, seed, channels=channels, bn_impl=bn_impl)
    history = train(
        model,
        data,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        eval_every=eval_every,
        device=device,
    )
    return model, history


def _make_cnn(data: Dataset, norm: str | None, seed: int, **kwargs) -> CNN:
    """:func:`bncourse.models.make_cnn` for ``data``'s images and classes."""
    input_shape = tuple(data.x_train.shape[1:])
    return make_cnn(data.num_classes, norm=norm, input_shape=input_shape, seed=seed, **kwargs)


def learning_rate_sweep(
    lrs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0),
    norms: tuple[str | None, ...] = (None, "bn"),
    seeds: tuple[int, ...] = (0,),
    steps: int = 200,
    **train_kwargs,
) -> dict[tuple[str | None, float, int], TrainingHistory]:
    """Train the CNN for every (norm, lr, seed); returns the histories keyed by that triple.

    :func:`bncourse.training.learning_rate_sweep` with the models of :func:`train_cnn`.

    Parameters
    ----------
    lrs : tuple of float
    norms : tuple of {None, "bn"}, default (None, "bn")
    seeds : tuple of int, default (0,)
    steps : int, default 200
    **train_kwargs
        :func:`train_cnn`'s other arguments (``batch_size``, ``channels``, ``bn_impl``,
        ``eval_every``, ``data``, ``device``).

    Returns
    -------
    dict of (norm, lr, seed) to TrainingHistory
    """
    data = train_kwargs.pop("data", None) or load_digits(flatten=False)
    cnn_kwargs = {
        key: train_kwargs.pop(key) for key in ("channels", "bn_impl") if key in train_kwargs
    }

    def make_model(norm: str | None, seed: int) -> CNN:
        return _make_cnn(data, norm, seed, **cnn_kwargs)

    return training.learning_rate_sweep(
        make_model, data, lrs, norms, seeds, steps=steps, **train_kwargs
    )


def conv_weight_norms(model: CNN) -> np.ndarray:
    """Frobenius norm of each block's convolution weight, first block first, shape (blocks,)."""
    return np.array([float(block.conv.weight.detach().norm()) for block in model.blocks])


def weight_norm_growth(
    lrs: tuple[float, ...] = (0.01, 0.1, 1.0),
    norm: str | None = "bn",
    seed: int = 0,
    steps: int = 200,
    **train_kwargs,
) -> dict[float, np.ndarray]:
    """How much each block's convolution weights grow in training, per learning rate.

    Trains :func:`train_cnn` once per learning rate (``train_kwargs`` go to it) and compares the
    weight norms with those of the same seeded initial network. Behind a BN layer the output does
    not depend on the scale of the weights, so a step of size ``lr`` changes it as a step of
    ``lr / ||W||^2`` would at unit norm: a growth factor ``g`` divides the effective learning
    rate by ``g ** 2``.

    Returns
    -------
    dict of lr to np.ndarray, shape (blocks,)
        ``||W_final|| / ||W_initial||`` of each block's convolution, first block first.
    """
    data = train_kwargs.pop("data", None) or load_digits(flatten=False)
    growth = {}
    for lr in lrs:
        model, _ = train_cnn(norm=norm, lr=lr, steps=steps, seed=seed, data=data, **train_kwargs)
        initial = make_cnn(
            data.num_classes,
            channels=train_kwargs.get("channels", (16, 32, 64)),
            norm=norm,
            input_shape=tuple(data.x_train.shape[1:]),
            seed=seed,
        )
        growth[lr] = conv_weight_norms(model) / conv_weight_norms(initial)
    return growth


@dataclass
class SignalScale:
    """Spread of the signal through a freshly initialised CNN (see :func:`initial_signal_scale`).

    Attributes
    ----------
    preactivation_std : list of float
        Standard deviation of each block's pre-activation ``norm(conv(x))`` over the batch, all
        channels and positions, first block first.
    logit_std : float
        Standard deviation of the logits.
    """

    preactivation_std: list[float]
    logit_std: float


@torch.no_grad()
def initial_signal_scale(
    norms: tuple[str | None, ...] = (None, "bn"),
    batch_size: int = 256,
    seed: int = 0,
    channels: tuple[int, ...] = (16, 32, 64),
) -> dict[str | None, SignalScale]:
    """How large the signal is in each block of the untrained CNN, with and without BN.

    One training-mode forward pass of :func:`bncourse.models.make_cnn` (``seed``) on the first
    ``batch_size`` standardised training digits.

    Parameters
    ----------
    norms : tuple of {None, "bn"}
    batch_size : int, default 256
    seed : int, default 0
    channels : tuple of int
        Output channels of the blocks.

    Returns
    -------
    dict of norm to SignalScale
    """
    data = load_digits(flatten=False)
    x = torch.as_tensor(data.x_train[:batch_size])
    result = {}
    for norm in norms:
        model = make_cnn(data.num_classes, channels=channels, norm=norm, seed=seed)
        logits, preactivations = model.forward_with_preactivations(x)
        result[norm] = SignalScale(
            preactivation_std=[float(z.std()) for z in preactivations],
            logit_std=float(logits.std()),
        )
    return result


# ---------------------------------------------------------------------------------------------
# Folding conv + BN for inference
# ---------------------------------------------------------------------------------------------


@dataclass
class FoldingResult:
    """What :func:`folding_experiment` measured.

    Attributes
    ----------
    largest_logit_difference : float
        Largest absolute difference between the logits of the BN model (evaluation mode) and of
        the folded model, on the test split.
    largest_logit : float
        Largest absolute logit, for scale.
    predictions_agree : float
        Fraction of test examples with the same predicted class (1.0 expected).
    accuracy, folded_accuracy : float
        Test accuracy of both models.
    modules_before, modules_after : int
        Number of batch-norm modules in the model and in the folded model.
    """

    largest_logit_difference: float
    largest_logit: float
    predictions_agree: float
    accuracy: float
    folded_accuracy: float
    modules_before: int
    modules_after: int


@contextlib.contextmanager
def _full_float32():
    """Turn off TF32 on CUDA (a 10-bit mantissa in convolutions and matrix products) for a block,
    so that float32 comparisons are made at float32 precision; restores the settings."""
    saved = torch.backends.cuda.matmul.allow_tf32
    # cudnn through its flags() context manager: assigning its attributes raises once PyTorch's
    # test helpers have frozen the global flags (as they do when imported in the same process)
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved


@torch.no_grad()
def folding_experiment(model: CNN, data: Dataset | None = None) -> FoldingResult:
    """Fold a trained BN model (:func:`~bncourse.inference.fold_batch_norms`), compare on test.

    Both models run in float32 with TF32 turned off on CUDA, so that the comparison shows the
    rounding of float32, not the reduced precision of TF32 arithmetic.
    """
    data = load_digits(flatten=False) if data is None else data
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    folded = fold_batch_norms(model)
    x = torch.as_tensor(data.x_test, device=device)
    y = torch.as_tensor(data.y_test, device=device)
    with _full_float32():
        logits, folded_logits = model(x), folded(x)
    model.train(was_training)
    return FoldingResult(
        largest_logit_difference=float((logits - folded_logits).abs().max()),
        largest_logit=float(logits.abs().max()),
        predictions_agree=float((logits.argmax(1) == folded_logits.argmax(1)).float().mean()),
        accuracy=utils.accuracy(logits, y),
        folded_accuracy=utils.accuracy(folded_logits, y),
        modules_before=len(batch_norm_modules(model)),
        modules_after=len(batch_norm_modules(folded)),
    )
