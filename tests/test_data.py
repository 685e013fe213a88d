"""Tests of bncourse.data: digits loading, the IDX reader/writer, MNIST loading, batch sampling."""

from __future__ import annotations

import dataclasses
import gzip

import numpy as np
import pytest
import torch

from bncourse.data import (
    MNIST_FILES,
    BatchSampler,
    Dataset,
    iterate_minibatches,
    load_digits,
    load_mnist,
    read_idx,
    write_idx,
)

# ------------------------------------------------------------------------------------ digits


def test_digits_shapes_and_dtypes():
    data = load_digits()
    assert isinstance(data, Dataset)
    assert data.x_train.shape == (1347, 64) and data.x_test.shape == (450, 64)
    assert data.y_train.shape == (1347,) and data.y_test.shape == (450,)
    assert data.x_train.dtype == np.float32 and data.x_test.dtype == np.float32
    assert data.y_train.dtype == np.int64 and data.y_test.dtype == np.int64
    assert data.num_classes == 10 and data.input_shape == (64,)
    assert data.num_features == 64 and data.num_train == 1347 and data.num_test == 450
    assert set(np.unique(data.y_train)) == set(range(10))


def test_digits_standardized_on_training_split_only():
    data = load_digits()
    assert data.mean.shape == (64,) and data.std.shape == (64,)
    assert np.all(data.std > 0)  # constant border pixels get std 1, not 0
    np.testing.assert_allclose(data.x_train.mean(axis=0), 0.0, atol=1e-5)
    varying = data.x_train.std(axis=0) > 0
    np.testing.assert_allclose(data.x_train.std(axis=0)[varying], 1.0, rtol=1e-4)
    assert varying.sum() < 64  # some pixels are constant on the training split, and stay 0
    # The test split uses the training statistics, so it is not exactly standardised itself.
    raw = load_digits(standardize=False)
    np.testing.assert_allclose(raw.x_test, data.x_test * data.std + data.mean, atol=1e-5)
    np.testing.assert_allclose(raw.x_train.mean(axis=0), data.mean, atol=1e-6)
    assert not np.allclose(data.x_test.mean(axis=0), 0.0, atol=1e-3)


def test_digits_unstandardized_in_unit_interval():
    data = load_digits(standardize=False)
    assert data.mean is None and data.std is None
    assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0


def test_digits_split_is_seeded_and_stratified():
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.y_train, c.y_train)
    train_share = np.bincount(a.y_train, minlength=10) / a.num_train
    test_share = np.bincount(a.y_test, minlength=10) / a.num_test
    np.testing.assert_allclose(train_share, test_share, atol=0.01)
    small = load_digits(test_fraction=0.1)
    assert small.num_test == 180 and small.num_train == 1617


def test_digits_images_for_cnns():
    flat, images = load_digits(), load_digits(flatten=False)
    assert images.x_train.shape == (1347, 1, 8, 8) and images.input_shape == (1, 8, 8)
    assert images.mean.shape == (1, 8, 8)
    np.testing.assert_allclose(images.x_train.reshape(-1, 64), flat.x_train, atol=1e-6)


def test_dataset_is_frozen_and_owns_its_arrays():
    data = load_digits()
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.x_train = data.x_test
    x, y = np.zeros((4, 3), np.float32), np.zeros(4, np.int64)
    copied = Dataset(x, y, x, y, num_classes=2, input_shape=(3,))
    x[0, 0] = 5.0
    assert copied.x_train[0, 0] == 0.0
    shifted = dataclasses.replace(data, x_test=data.x_test + 1)
    np.testing.assert_allclose(shifted.x_test, data.x_test + 1)


def test_dataset_checks_shapes():
    x, y = np.zeros((4, 3), np.float32), np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="y_train has 3"):
        Dataset(x, y[:3], x, y, num_classes=2, input_shape=(3,))
    with pytest.raises(ValueError, match="input_shape"):
        Dataset(x, y, x, y, num_classes=2, input_shape=(4,))


def test_tensors():
    data = load_digits()
    x_train, y_train, x_test, y_test = data.tensors()
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert x_train.shape == (1347, 64) and y_test.shape == (450,)
    assert x_train.device.type == "cpu"
    np.testing.assert_array_equal(x_test.numpy(), data.x_test)
    assert data.tensors("cpu").y_train.device == torch.device("cpu")


def test_bad_test_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.5)


# ------------------------------------------------------------------------------------ IDX


@pytest.mark.parametrize(
    ("dtype", "code"),
    [
        (np.uint8, 0x08),
        (np.int8, 0x09),
        (np.int16, 0x0B),
        (np.int32, 0x0C),
        (np.float32, 0x0D),
        (np.float64, 0x0E),
    ],
)
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, dtype, code, suffix):
    rng = np.random.default_rng(0)
    array = (rng.normal(size=(3, 4, 5)) * 50).astype(dtype)
    path = tmp_path / f"array.idx{suffix}"
    write_idx(path, array)
    opener = gzip.open if suffix else open
    with opener(path, "rb") as file:
        header = file.read(16)
    assert header[:4] == bytes([0, 0, code, 3])
    assert header[4:16] == bytes([0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0, 5])  # big-endian dims
    back = read_idx(str(path))
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    np.testing.assert_array_equal(back, array)


def test_idx_big_endian_data(tmp_path):
    path = tmp_path / "be.idx"
    path.write_bytes(bytes([0, 0, 0x0B, 1, 0, 0, 0, 2, 0x01, 0x02, 0xFF, 0xFE]))
    np.testing.assert_array_equal(read_idx(path), np.array([0x0102, -2], dtype=np.int16))


def test_idx_bad_magic(tmp_path):
    path = tmp_path / "bad.idx"
    path.write_bytes(bytes([0, 1, 0x08, 1, 0, 0, 0, 1, 7]))
    with pytest.raises(ValueError, match=r"bad\.idx.*bad magic number"):
        read_idx(path)
    path.write_bytes(bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 7]))  # unknown type code
    with pytest.raises(ValueError, match="bad magic number"):
        read_idx(path)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(path)


def test_idx_truncated_and_too_long(tmp_path):
    path = tmp_path / "short.idx.gz"
    write_idx(path, np.arange(12, dtype=np.int32).reshape(3, 4))
    content = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(content[:-3]))
    with pytest.raises(ValueError, match=r"short\.idx\.gz.*truncated.*\(3, 4\)"):
        read_idx(path)
    path.write_bytes(gzip.compress(content[:10]))  # cut inside the header
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)
    path.write_bytes(gzip.compress(content + b"\x00"))
    with pytest.raises(ValueError, match="too long"):
        read_idx(path)


def test_write_idx_rejects_unsupported(tmp_path):
    with pytest.raises(ValueError, match="int64"):
        write_idx(tmp_path / "x.idx", np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="dimensions"):
        write_idx(tmp_path / "x.idx", np.array(3, dtype=np.uint8))


# ------------------------------------------------------------------------------------ MNIST


def _fake_mnist(directory, gz: bool, n_train: int = 20, n_test: int = 10):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    arrays = {
        "train_images": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    arrays["train_images"][:, 0, 0] = 0  # a constant pixel
    for key, array in arrays.items():
        write_idx(directory / (MNIST_FILES[key] + suffix), array)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist(tmp_path, gz):
    arrays = _fake_mnist(tmp_path, gz)
    data = load_mnist(tmp_path)
    assert data.x_train.shape == (20, 784) and data.x_test.shape == (10, 784)
    assert data.num_classes == 10 and data.name == "mnist"
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    np.testing.assert_array_equal(data.y_test, arrays["test_labels"])
    np.testing.assert_allclose(data.x_train.mean(axis=0), 0.0, atol=1e-5)
    assert data.std[0] == 1.0 and np.all(data.x_train[:, 0] == 0)
    raw = load_mnist(tmp_path, standardize=False, flatten=False, max_train=5, max_test=3)
    assert raw.x_train.shape == (5, 1, 28, 28) and raw.x_test.shape == (3, 1, 28, 28)
    np.testing.assert_allclose(raw.x_train[:, 0], arrays["train_images"][:5] / 255.0, atol=1e-7)


def test_load_mnist_missing_files(tmp_path):
    _fake_mnist(tmp_path, gz=False)
    (tmp_path / MNIST_FILES["test_labels"]).unlink()
    with pytest.raises(FileNotFoundError) as excinfo:
        load_mnist(tmp_path)
    message = str(excinfo.value)
    assert "missing" in message and "t10k-labels-idx1-ubyte" in message
    for name in MNIST_FILES.values():
        assert name in message
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path / "nowhere")


def test_load_mnist_mismatched_files(tmp_path):
    _fake_mnist(tmp_path, gz=False)
    write_idx(tmp_path / MNIST_FILES["train_labels"], np.zeros(7, dtype=np.uint8))
    with pytest.raises(ValueError, match="do not fit together"):
        load_mnist(tmp_path)


# ------------------------------------------------------------------------------------ batches


def test_batch_sampler_epochs_are_permutations():
    sampler = BatchSampler(10, 3, seed=0)
    assert sampler.batches_per_epoch == 3
    batches = sampler.take(6)
    assert all(b.shape == (3,) and b.dtype == np.int64 for b in batches)
    for epoch in (batches[:3], batches[3:]):
        indices = np.concatenate(epoch)
        assert len(set(indices.tolist())) == 9 and indices.max() < 10
    assert not np.array_equal(np.concatenate(batches[:3]), np.concatenate(batches[3:]))


def test_batch_sampler_is_deterministic():
    first = BatchSampler(50, 7, seed=3).take(20)
    again = BatchSampler(50, 7, seed=3).take(20)
    other = BatchSampler(50, 7, seed=4).take(20)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_batch_sampler_keep_last():
    sampler = BatchSampler(10, 4, seed=0, drop_last=False)
    assert sampler.batches_per_epoch == 3
    sizes = [len(b) for b in sampler.take(6)]
    assert sizes == [4, 4, 2, 4, 4, 2]


def test_iterate_minibatches_matches_sampler():
    rng = np.random.default_rng(5)
    epoch = list(iterate_minibatches(10, 5, rng))
    assert len(epoch) == 2
    np.testing.assert_array_equal(np.sort(np.concatenate(epoch)), np.arange(10))
    np.testing.assert_array_equal(epoch[0], BatchSampler(10, 5, seed=5).take(1)[0])


def test_batch_sampler_errors():
    with pytest.raises(ValueError, match="batch_size=20 is larger"):
        BatchSampler(10, 20)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        BatchSampler(10, 0)
