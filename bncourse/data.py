"""Offline data for the book: scikit-learn's digits, an MNIST IDX reader, and mini-batch sampling.

Everything here works without a network connection:

* :func:`load_digits` splits scikit-learn's bundled 8x8 digits (1797 images, 10 classes) into a
  stratified, seeded train/test :class:`Dataset`, standardised with training-split statistics.
* :func:`read_idx` / :func:`write_idx` read and write the IDX format of MNIST, and
  :func:`load_mnist` builds the same :class:`Dataset` from the four MNIST files for readers who
  have them on disk (nothing is downloaded).
* :class:`BatchSampler` and :func:`iterate_minibatches` yield shuffled index arrays, epoch after
  epoch, deterministically from a seed; the training loop of :mod:`bncourse.training` uses them.
* :func:`make_shift_data` generates a two-feature population and a shifted one (a change of
  location and scale, or a change of shape) for the covariate-shift examples of chapter 1.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "Dataset",
    "DatasetTensors",
    "load_digits",
    "load_mnist",
    "read_idx",
    "write_idx",
    "MNIST_FILES",
    "BatchSampler",
    "iterate_minibatches",
    "SHIFTS",
    "ShiftData",
    "make_shift_data",
    "shift_labels",
]

# Smallest per-pixel standard deviation used when standardising: constant pixels (the digits'
# blank borders) have std 0 and are divided by 1 instead, so they stay at exactly 0.
_MIN_STD = 1e-6


class DatasetTensors(NamedTuple):
    """The four splits of a :class:`Dataset` as torch tensors on one device."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification data set split into a training and a test part (NumPy arrays).

    The fields cannot be reassigned (use :func:`dataclasses.replace` to derive a modified copy);
    the arrays are the dataset's own copies, so changing an array passed in does not change it.

    Attributes
    ----------
    x_train : np.ndarray, float32, shape (N_train, *input_shape)
        Training features.
    y_train : np.ndarray, int64, shape (N_train,)
        Training labels in ``0 .. num_classes - 1``.
    x_test : np.ndarray, float32, shape (N_test, *input_shape)
        Test features, standardised with the *training* statistics.
    y_test : np.ndarray, int64, shape (N_test,)
        Test labels.
    num_classes : int
        Number of classes.
    input_shape : tuple of int
        Shape of one example: ``(64,)`` for flattened digits, ``(1, 8, 8)`` for images.
    mean : np.ndarray or None, float32, shape input_shape
        Per-pixel mean of the training split that was subtracted (``None`` if not standardised).
    std : np.ndarray or None, float32, shape input_shape
        Per-pixel standard deviation of the training split that was divided by, with constant
        pixels given std 1 (``None`` if not standardised).
    name : str
        A short name (``"digits"``, ``"mnist"``).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    name: str = ""

    def __post_init__(self) -> None:
        for field in ("x_train", "y_train", "x_test", "y_test", "mean", "std"):
            value = getattr(self, field)
            if value is not None:
                object.__setattr__(self, field, np.array(value, copy=True))
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"x_{split} has {x.shape[0]} examples but y_{split} has {y.shape[0]}"
                )
            if x.shape[1:] != self.input_shape:
                raise ValueError(
                    f"x_{split} has example shape {x.shape[1:]}, expected input_shape "
                    f"{self.input_shape}"
                )

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test examples."""
        return int(self.x_test.shape[0])

    @property
    def num_features(self) -> int:
        """Number of input features of one example (the product of ``input_shape``)."""
        return int(np.prod(self.input_shape))

    def tensors(self, device: torch.device | str | None = None) -> DatasetTensors:
        """Return the four splits as torch tensors (float32 features, int64 labels) on ``device``.

        Parameters
        ----------
        device : torch.device or str, optional
            Where to put the tensors; default the CPU.

        Returns
        -------
        DatasetTensors
            A named tuple ``(x_train, y_train, x_test, y_test)``; unpack it like a tuple.
        """
        import torch

        def as_tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(array, dtype=dtype, device=device)

        return DatasetTensors(
            as_tensor(self.x_train, torch.float32),
            as_tensor(self.y_train, torch.int64),
            as_tensor(self.x_test, torch.float32),
            as_tensor(self.y_test, torch.int64),
        )

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, x_train={self.x_train.shape}, "
            f"x_test={self.x_test.shape}, num_classes={self.num_classes}, "
            f"standardized={self.mean is not None})"
        )


def _standardize(
    x_train: np.ndarray, x_test: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Standardise each pixel with the training split's mean and std (constant pixels: std 1)."""
    mean = x_train.mean(axis=0, dtype=np.float64)
    std = x_train.std(axis=0, dtype=np.float64)
    std = np.where(std < _MIN_STD, 1.0, std)
    x_train = ((x_train - mean) / std).astype(np.float32)
    x_test = ((x_test - mean) / std).astype(np.float32)
    return x_train, x_test, mean.astype(np.float32), std.astype(np.float32)


def _finish(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    image_shape: tuple[int, int],
    num_classes: int,
    standardize: bool,
    flatten: bool,
) -> Dataset:
    """Reshape, standardise and wrap features in ``[0, 1]`` into a :class:`Dataset`."""
    input_shape = (int(np.prod(image_shape)),) if flatten else (1, *image_shape)
    x_train = x_train.reshape(len(x_train), *input_shape).astype(np.float32)
    x_test = x_test.reshape(len(x_test), *input_shape).astype(np.float32)
    mean = std = None
    if standardize:
        x_train, x_test, mean, std = _standardize(x_train, x_test)
    return Dataset(
        x_train=x_train,
        y_train=y_train.astype(np.int64),
        x_test=x_test,
        y_test=y_test.astype(np.int64),
        num_classes=num_classes,
        input_shape=input_shape,
        mean=mean,
        std=std,
        name=name,
    )


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def load_digits(
    test_fraction: float = 0.25,
    seed: int = 0,
    standardize: bool = True,
    flatten: bool = True,
) -> Dataset:
    """Load scikit-learn's bundled handwritten digits (offline) as a train/test :class:`Dataset`.

    The data are 1797 grey-scale 8x8 images of the digits 0-9 with pixel values 0-16; they ship
    with scikit-learn, so nothing is downloaded. The split is stratified (every class keeps its
    proportion in both parts) and fixed by ``seed``.

    Parameters
    ----------
    test_fraction : float, default 0.25
        Fraction of the examples held out for testing, in (0, 1). The default gives 1347
        training and 450 test examples.
    seed : int, default 0
        Seed of the split.
    standardize : bool, default True
        Subtract the per-pixel mean and divide by the per-pixel std, both computed on the
        training split only (pixels that are constant on the training split are divided by 1).
        If False, pixel values are scaled to [0, 1] (divided by 16).
    flatten : bool, default True
        Return examples of shape (64,) for MLPs; if False, images of shape (1, 8, 8) for CNNs.

    Returns
    -------
    Dataset
        ``x_train`` (N_train, 64) or (N_train, 1, 8, 8) float32, ``y_train`` (N_train,) int64,
        likewise for the test split; ``num_classes=10``.
    """
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    images, labels = _raw_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        images / 16.0,
        labels,
        test_size=test_fraction,
        random_state=seed,
        stratify=labels,
    )
    return _finish("digits", x_train, y_train, x_test, y_test, (8, 8), 10, standardize, flatten)


# ---------------------------------------------------------------------------------------------
# The IDX format (MNIST): magic number 0x00 0x00 <dtype code> <ndim>, then ndim big-endian
# uint32 sizes, then the data in row-major (C) order, big-endian.

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES: dict[tuple[str, int], int] = {
    (dtype.kind, dtype.itemsize): code for code, dtype in _IDX_DTYPES.items()
}


def _open(path: str | os.PathLike, mode: str):
    """Open ``path`` in binary mode, through gzip when its name ends with ``.gz``."""
    if os.fspath(path).endswith(".gz"):
        return gzip.open(path, mode)
    return open(path, mode)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the format of MNIST) into a NumPy array.

    Parameters
    ----------
    path : str or path-like
        The file; a name ending in ``.gz`` is decompressed with gzip.

    Returns
    -------
    np.ndarray
        Array of the shape stored in the header, in native byte order, with dtype uint8, int8,
        int16, int32, float32 or float64 (type codes 0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E).

    Raises
    ------
    ValueError
        If the magic number is wrong or the file is shorter or longer than its header says.
    """
    with _open(path, "rb") as file:
        content = file.read()
    if len(content) < 4:
        raise ValueError(f"{os.fspath(path)!r} is not an IDX file: only {len(content)} bytes")
    zero0, zero1, code, ndim = content[:4]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise ValueError(
            f"{os.fspath(path)!r} is not an IDX file: bad magic number 0x{content[:4].hex()} "
            f"(expected 0x0000, a type code in {{{known}}}, then the number of dimensions)"
        )
    header_size = 4 + 4 * ndim
    if len(content) < header_size:
        raise ValueError(
            f"{os.fspath(path)!r} is truncated: the header announces {ndim} dimensions "
            f"({header_size} header bytes) but the file has only {len(content)} bytes"
        )
    shape = tuple(int(d) for d in np.frombuffer(content, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(content) - header_size
    if actual != expected:
        what = "truncated" if actual < expected else "too long"
        raise ValueError(
            f"{os.fspath(path)!r} is {what}: its header announces shape {shape} of "
            f"{dtype.newbyteorder('=').name} ({expected} data bytes) but it holds {actual}"
        )
    data = np.frombuffer(content, dtype=dtype, offset=header_size).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` in the IDX format (gzip-compressed if the name ends in ``.gz``).

    Parameters
    ----------
    path : str or path-like
        Destination file.
    array : np.ndarray, shape (d1, ..., dk) with 1 <= k <= 255
        Data of dtype uint8, int8, int16, int32, float32 or float64.

    Raises
    ------
    ValueError
        If the dtype or the number of dimensions cannot be stored in IDX.
    """
    array = np.asarray(array)
    key = (array.dtype.kind, array.dtype.itemsize)
    if key not in _IDX_CODES:
        raise ValueError(
            f"write_idx: dtype {array.dtype} cannot be stored in IDX; use one of uint8, int8, "
            f"int16, int32, float32, float64"
        )
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"write_idx: array must have 1 to 255 dimensions, got {array.ndim}")
    code = _IDX_CODES[key]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    with _open(path, "wb") as file:
        file.write(header + data)


MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
"""The standard names of the four MNIST files (each may also carry a ``.gz`` suffix)."""


def load_mnist(
    directory: str | os.PathLike,
    standardize: bool = True,
    flatten: bool = True,
    max_train: int | None = None,
    max_test: int | None = None,
) -> Dataset:
    """Load MNIST from the four standard IDX files in ``directory`` (nothing is downloaded).

    Parameters
    ----------
    directory : str or path-like
        Folder holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
        ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each optionally gzipped
        (``.gz``).
    standardize : bool, default True
        Standardise each pixel with the training split's mean and std (constant pixels are
        divided by 1); if False, scale pixel values to [0, 1] (divide by 255).
    flatten : bool, default True
        Examples of shape (784,) if True, images of shape (1, 28, 28) if False.
    max_train, max_test : int, optional
        Keep only the first ``max_train`` training / ``max_test`` test examples (for quick runs);
        the statistics are computed on the kept training examples.

    Returns
    -------
    Dataset
        The standard split: 60000 training and 10000 test examples, ``num_classes=10``.

    Raises
    ------
    FileNotFoundError
        If a file is missing; the message lists the expected names.
    ValueError
        If the files are not valid IDX files or their shapes do not fit together.
    """
    directory = os.fspath(directory)
    paths: dict[str, str] = {}
    missing = []
    for key, name in MNIST_FILES.items():
        for candidate in (name, name + ".gz"):
            if os.path.isfile(os.path.join(directory, candidate)):
                paths[key] = os.path.join(directory, candidate)
                break
        else:
            missing.append(name)
    if missing:
        expected = ", ".join(MNIST_FILES.values())
        raise FileNotFoundError(
            f"MNIST files missing in {directory!r}: {', '.join(missing)} (with or without .gz). "
            f"Expected the four files {expected}, each optionally gzipped."
        )
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"MNIST {split} files do not fit together: images {images.shape} (expected "
                f"(N, rows, cols)), labels {labels.shape} (expected (N,))"
            )
    image_shape = arrays["train_images"].shape[1:]
    if arrays["test_images"].shape[1:] != image_shape:
        raise ValueError(
            f"MNIST train images are {image_shape} but test images are "
            f"{arrays['test_images'].shape[1:]}"
        )
    x_train = arrays["train_images"][:max_train] / 255.0
    y_train = arrays["train_labels"][:max_train]
    x_test = arrays["test_images"][:max_test] / 255.0
    y_test = arrays["test_labels"][:max_test]
    num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    return _finish(
        "mnist",
        x_train,
        y_train,
        x_test,
        y_test,
        (int(image_shape[0]), int(image_shape[1])),
        max(num_classes, 10),
        standardize,
        flatten,
    )


# ---------------------------------------------------------------------------------------------
# Mini-batches.


def iterate_minibatches(
    n: int, batch_size: int, rng: np.random.Generator, drop_last: bool = True
) -> Iterator[np.ndarray]:
    """Yield the index arrays of one epoch: a random permutation of ``range(n)`` cut into batches.

    Parameters
    ----------
    n : int
        Number of examples.
    batch_size : int
        Examples per batch.
    rng : np.random.Generator
        Source of the permutation (advanced by one call to ``rng.permutation``).
    drop_last : bool, default True
        Drop the last ``n % batch_size`` indices so that every batch has ``batch_size`` examples
        (batch-norm statistics then always come from equally large batches).

    Yields
    ------
    np.ndarray, int64, shape (batch_size,)
        Indices of one mini-batch (the last one may be shorter if ``drop_last`` is False).
    """
    _check_batching(n, batch_size, drop_last)
    permutation = rng.permutation(n).astype(np.int64)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield permutation[start : start + batch_size]


def _check_batching(n: int, batch_size: int, drop_last: bool) -> None:
    if n < 1:
        raise ValueError(f"n must be a positive number of examples, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if drop_last and batch_size > n:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {n} examples and drop_last=True "
            f"would leave no batch"
        )


@dataclasses.dataclass
class BatchSampler:
    """Shuffled mini-batches of indices, epoch after epoch, determined by ``seed``.

    Iterating never ends: each epoch is a fresh permutation drawn from
    ``np.random.default_rng(seed)``; two samplers with the same arguments yield the same batches.

    Parameters
    ----------
    n : int
        Number of examples.
    batch_size : int
        Examples per batch.
    seed : int, default 0
        Seed of the permutations.
    drop_last : bool, default True
        Drop each epoch's last incomplete batch (see :func:`iterate_minibatches`).

    Examples
    --------
    >>> sampler = BatchSampler(10, 4, seed=0)
    >>> batches = sampler.take(3)   # 2 batches of epoch 0, then the first of epoch 1
    >>> [b.shape for b in batches]
    [(4,), (4,), (4,)]
    """

    n: int
    batch_size: int
    seed: int = 0
    drop_last: bool = True

    def __post_init__(self) -> None:
        _check_batching(self.n, self.batch_size, self.drop_last)

    @property
    def batches_per_epoch(self) -> int:
        """Number of batches in one epoch."""
        if self.drop_last:
            return self.n // self.batch_size
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[np.ndarray]:
        """Yield index arrays (int64, shape (batch_size,)) forever, epoch after epoch."""
        rng = np.random.default_rng(self.seed)
        while True:
            yield from iterate_minibatches(self.n, self.batch_size, rng, self.drop_last)

    def take(self, num_batches: int) -> list[np.ndarray]:
        """Return the first ``num_batches`` batches that iterating would yield."""
        iterator = iter(self)
        return [next(iterator) for _ in range(num_batches)]


# ---------------------------------------------------------------------------------------------
# Generated populations for the covariate-shift examples (chapter 1).

SHIFTS: tuple[str, ...] = ("none", "location_scale", "shape")
"""The kinds of shift :func:`make_shift_data` generates."""

SHIFT_SCALE = np.array([2.0, 0.5])
"""Per-feature scale ``a`` of the shifted populations (``x = a * ... + b``)."""
SHIFT_LOCATION = np.array([1.5, -1.0])
"""Per-feature location ``b`` of the shifted populations."""
SHAPE_JUMP = 2.0
"""Size ``c`` of the jump that splits each feature into two modes in the ``"shape"`` shift."""
SHAPE_KNEE = 0.5
"""Latent value ``k`` at which the ``"shape"`` shift jumps."""


class ShiftData(NamedTuple):
    """A source population and a shifted one, drawn by :func:`make_shift_data`.

    Attributes
    ----------
    x_source : np.ndarray, float64, shape (n_source, 2)
        Features of the source population.
    y_source : np.ndarray, int64, shape (n_source,)
        Labels (0 or 1) of the source population.
    x_shifted : np.ndarray, float64, shape (n_shifted, 2)
        Features of the shifted population.
    y_shifted : np.ndarray, int64, shape (n_shifted,)
        Labels of the shifted population.
    z_shifted : np.ndarray, float64, shape (n_shifted, 2)
        The latent values behind ``x_shifted`` (for plots and checks).
    """

    x_source: np.ndarray
    y_source: np.ndarray
    x_shifted: np.ndarray
    y_shifted: np.ndarray
    z_shifted: np.ndarray


def shift_labels(z: np.ndarray) -> np.ndarray:
    """The labelling rule of :func:`make_shift_data`: ``1`` where ``z[:, 0] + z[:, 1] > 0``.

    Parameters
    ----------
    z : np.ndarray, shape (N, 2)
        Latent values.

    Returns
    -------
    np.ndarray, int64, shape (N,)
    """
    z = np.asarray(z)
    return (z[:, 0] + z[:, 1] > 0).astype(np.int64)


def make_shift_data(
    shift: str = "location_scale",
    n_source: int = 2000,
    n_shifted: int = 2000,
    seed: int = 0,
) -> ShiftData:
    """Draw a source population and a shifted population of two-feature, two-class examples.

    Every example has a latent ``z ~ N(0, I_2)`` and the label ``y = [z_1 + z_2 > 0]``
    (:func:`shift_labels`); the classes are balanced. What a model sees are the features ``x``:

    * source population: ``x = z``;
    * ``shift="none"``: the shifted population is a fresh draw of the source, ``x = z``;
    * ``shift="location_scale"``: ``x = a * z + b`` per feature, with ``a = SHIFT_SCALE =
      (2, 0.5)`` and ``b = SHIFT_LOCATION = (1.5, -1)``, so the features move and stretch but
      keep their shape (standardising each population with its own mean and standard deviation
      gives back exactly the source distribution);
    * ``shift="shape"``: ``x = a * (z + c * sign(z - k)) + b`` per feature, with ``c =
      SHAPE_JUMP = 2`` and ``k = SHAPE_KNEE = 0.5``: a monotone map (no information is lost)
      that splits each unimodal feature into two unequal modes, then the same location and
      scale change. Standardising fixes the mean and the variance, not the two modes.

    It is the situation of a layer whose inputs are produced by a layer below that has
    changed: the same kind of example arrives, transformed.

    Parameters
    ----------
    shift : {"none", "location_scale", "shape"}, default "location_scale"
        The kind of shift.
    n_source, n_shifted : int, default 2000
        Sizes of the two populations.
    seed : int, default 0
        Seed of both draws (the source draw is the same for every ``shift``).

    Returns
    -------
    ShiftData
        ``(x_source, y_source, x_shifted, y_shifted, z_shifted)``, features float64 of shape
        (n, 2), labels int64 of shape (n,).

    Examples
    --------
    >>> data = make_shift_data("shape", n_source=5, n_shifted=3, seed=0)
    >>> data.x_source.shape, data.x_shifted.shape, data.y_shifted.dtype
    ((5, 2), (3, 2), dtype('int64'))
    """
    if shift not in SHIFTS:
        raise ValueError(f"shift must be one of {SHIFTS}, got {shift!r}")
    for name, value in (("n_source", n_source), ("n_shifted", n_shifted)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    source_rng, shifted_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2)
    )
    z_source = source_rng.standard_normal((n_source, 2))
    z_shifted = shifted_rng.standard_normal((n_shifted, 2))
    if shift == "none":
        x_shifted = z_shifted.copy()
    elif shift == "location_scale":
        x_shifted = SHIFT_SCALE * z_shifted + SHIFT_LOCATION
    else:
        bent = z_shifted + SHAPE_JUMP * np.sign(z_shifted - SHAPE_KNEE)
        x_shifted = SHIFT_SCALE * bent + SHIFT_LOCATION
    return ShiftData(
        x_source=z_source.copy(),
        y_source=shift_labels(z_source),
        x_shifted=x_shifted,
        y_shifted=shift_labels(z_shifted),
        z_shifted=z_shifted,
    )
