"""Tests of bncourse.numpy_bn and bncourse.fast.numpy_bn, with PyTorch as the oracle.

Every test of the training-mode transform and of the layer runs twice, over the reference
kernels (:mod:`bncourse.numpy_bn`) and the fast ones (:mod:`bncourse.fast.numpy_bn`): the
parity suite. The paths particular to the fast kernels (slabs, long rows) are in
``test_larger_shapes_match_torch``.

Tolerances: float64 results agree with PyTorch (float64) within 1e-10; float32 results within a
few 1e-5. The backward passes are also checked against central finite differences in float64.
"""

from __future__ import annotations

import functools
import zlib
from types import SimpleNamespace

import _shapes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bncourse import numpy_bn
from bncourse.fast import native
from bncourse.fast import numpy_bn as fast_numpy_bn
from bncourse.numpy_bn import (
    BatchNorm,
    BatchNormCache,
    batch_norm_backward_graph,
    batch_norm_inference,
    batch_statistics,
)
from bncourse.utils import finite_difference_gradient

pytestmark = pytest.mark.usefixtures("one_torch_thread")


KERNEL_SETS = [
    SimpleNamespace(
        batch_norm_forward=module.batch_norm_forward,
        batch_norm_backward=module.batch_norm_backward,
        BatchNorm=functools.partial(BatchNorm, kernels=name),
    )
    for name, module in (("reference", numpy_bn), ("fast", fast_numpy_bn))
]
BOTH = pytest.mark.parametrize("bn", KERNEL_SETS, ids=["reference", "fast"])
"""Runs a test with ``bn`` = the reference kernels, then the fast ones."""


@pytest.fixture(autouse=True)
def fast_kernels_on_every_size(monkeypatch):
    """The fast kernels hand small inputs to the reference; here they run on every size."""
    monkeypatch.setattr(fast_numpy_bn, "_SMALL_INPUT", 0)


@pytest.fixture(autouse=True, params=["C", "operations"])
def fast_implementation(request):
    """Every test twice: the fast kernels with their C kernels (which take C-contiguous input
    of at least 16 positions, where a compiler built them) and with NumPy operations only."""
    with native.native_kernels(request.param == "C"):
        yield request.param


def test_fast_kernels_hand_small_inputs_to_the_reference(monkeypatch):
    monkeypatch.setattr(fast_numpy_bn, "_SMALL_INPUT", 1 << 16)
    calls = []
    for name in ("batch_norm_forward", "batch_norm_backward"):
        original = getattr(numpy_bn, name)

        def spy(*args, original=original, name=name):
            calls.append(name)
            return original(*args)

        monkeypatch.setattr(numpy_bn, name, spy)
    rng = np.random.default_rng(20)
    cases = (((2, 64, 8, 8), 2), ((300, 3, 9, 9), 0), ((4096, 64), 2), ((1024, 1024), 0))
    for shape, expected in cases:
        calls.clear()
        x = random_input(rng, shape, np.float32)
        _, cache = fast_numpy_bn.batch_norm_forward(x, None, None)
        fast_numpy_bn.batch_norm_backward(x, cache)
        assert len(calls) == expected, shape


TOLERANCE = {np.float64: dict(rtol=1e-10, atol=1e-10), np.float32: dict(rtol=1e-5, atol=3e-5)}

# the shared parity shapes (tests/_shapes.py) and one with more channels than examples
SHAPES = [*_shapes.SHAPES, (2, 5)]

TORCH_MODULES = {
    2: torch.nn.BatchNorm1d,
    3: torch.nn.BatchNorm1d,
    4: torch.nn.BatchNorm2d,
    5: torch.nn.BatchNorm3d,
}


def random_input(rng: np.random.Generator, shape, dtype=np.float64, mean=0.5, std=2.0):
    return (mean + std * rng.standard_normal(shape)).astype(dtype)


def torch_reference(x, gamma, beta, dy, eps=1e-5):
    """Output and gradients of torch.nn.functional.batch_norm in training mode."""
    xt = torch.tensor(x, requires_grad=True)
    gt = None if gamma is None else torch.tensor(gamma, dtype=xt.dtype, requires_grad=True)
    bt = None if beta is None else torch.tensor(beta, dtype=xt.dtype, requires_grad=True)
    y = torch.nn.functional.batch_norm(xt, None, None, gt, bt, training=True, eps=eps)
    y.backward(torch.tensor(dy))
    return (
        y.detach().numpy(),
        xt.grad.numpy(),
        None if gt is None else gt.grad.numpy(),
        None if bt is None else bt.grad.numpy(),
    )


# ---------------------------------------------------------------------------------------------
# Functional forward and backward against PyTorch
# ---------------------------------------------------------------------------------------------


@BOTH
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_forward_backward_match_torch(bn, shape, dtype, affine, eps):
    rng = np.random.default_rng(len(shape) * 100 + shape[1])
    x = random_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    channels = shape[1]
    gamma = 1.0 + 0.5 * rng.standard_normal(channels) if affine else None
    beta = rng.standard_normal(channels) if affine else None

    y, cache = bn.batch_norm_forward(x, gamma, beta, eps)
    dx, dgamma, dbeta = bn.batch_norm_backward(dy, cache)
    y_ref, dx_ref, dgamma_ref, dbeta_ref = torch_reference(x, gamma, beta, dy, eps)

    tol = TOLERANCE[dtype]
    assert y.dtype == dtype and dx.dtype == dtype
    assert y.shape == shape and dx.shape == shape
    np.testing.assert_allclose(y, y_ref, **tol)
    np.testing.assert_allclose(dx, dx_ref, **tol)
    np.testing.assert_allclose(
        dbeta, dy.sum(axis=(0, *range(2, len(shape))), dtype=np.float64), **tol
    )
    if affine:
        np.testing.assert_allclose(dgamma, dgamma_ref, **tol)
        np.testing.assert_allclose(dbeta, dbeta_ref, **tol)


# shapes that take the other paths of the slab-by-slab passes: a last slab that is not a whole
# number of constant rows, rows of 4096 values and more, samples larger than a slab, many slabs
@BOTH
@pytest.mark.parametrize(
    "shape", [(7, 10, 100), (3, 2, 4100), (3, 40, 4000), (300, 3, 9, 9), (5000, 3)], ids=str
)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_larger_shapes_match_torch(bn, shape, dtype):
    rng = np.random.default_rng(int(np.prod(shape)))
    x = random_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma, beta = 1.0 + 0.5 * rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
    y, cache = bn.batch_norm_forward(x, gamma, beta)
    dx, dgamma, dbeta = bn.batch_norm_backward(dy, cache)
    y_ref, dx_ref, dgamma_ref, dbeta_ref = torch_reference(x, gamma, beta, dy)
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(y, y_ref, **tol)
    np.testing.assert_allclose(dx, dx_ref, **tol)
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=tol["rtol"], atol=tol["atol"] * 10)
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=tol["rtol"], atol=tol["atol"] * 10)
    layer = bn.BatchNorm(shape[1])
    for _ in range(2):  # the second call reuses the first one's x_hat memory
        np.testing.assert_allclose(layer(x), bn.batch_norm_forward(x, None, None)[0], **tol)


@BOTH
@pytest.mark.parametrize("make", ["fortran", "sliced", "transposed"])
def test_non_contiguous_input_and_gradient(bn, make):
    rng = np.random.default_rng(13)
    base = random_input(rng, (6, 3, 8, 5))
    x = {
        "fortran": np.asfortranarray(base),
        "sliced": base[::2, :, 1:, ::2],
        "transposed": base.transpose(0, 1, 3, 2),
    }[make]
    dy = rng.standard_normal(x.shape)[..., ::-1]  # negative strides
    assert not x.flags.c_contiguous and not dy.flags.c_contiguous
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    y, cache = bn.batch_norm_forward(x, gamma, beta)
    dx, dgamma, dbeta = bn.batch_norm_backward(dy, cache)
    y_ref, dx_ref, dgamma_ref, dbeta_ref = torch_reference(
        np.ascontiguousarray(x), gamma, beta, np.ascontiguousarray(dy)
    )
    for actual, expected in ((y, y_ref), (dx, dx_ref), (dgamma, dgamma_ref), (dbeta, dbeta_ref)):
        np.testing.assert_allclose(actual, expected, **TOLERANCE[np.float64])


@BOTH
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_graph_backward_agrees_with_closed_form(bn, shape, dtype):
    rng = np.random.default_rng(7)
    x = random_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma = rng.standard_normal(shape[1])
    beta = rng.standard_normal(shape[1])
    _, cache = bn.batch_norm_forward(x, gamma, beta)
    closed = bn.batch_norm_backward(dy, cache)
    graph = batch_norm_backward_graph(dy, cache)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else TOLERANCE[dtype]
    for a, b in zip(closed, graph, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, **tol)


@BOTH
def test_cache_holds_the_documented_fields(bn):
    rng = np.random.default_rng(0)
    x = random_input(rng, (4, 3, 2), np.float32)
    y, cache = bn.batch_norm_forward(x, None, None, eps=1e-3)
    assert isinstance(cache, BatchNormCache)
    assert cache.x is x
    assert cache.x_hat.dtype == np.float32 and cache.x_hat.shape == x.shape
    assert cache.mean.dtype == cache.var.dtype == cache.inv_std.dtype == np.float64
    assert cache.eps == 1e-3
    np.testing.assert_array_equal(cache.gamma, np.ones(3))
    np.testing.assert_allclose(cache.inv_std, 1 / np.sqrt(cache.var + 1e-3), rtol=1e-15)
    np.testing.assert_allclose(cache.x_hat, y, rtol=0, atol=0)
    assert not np.shares_memory(cache.x_hat, y)  # y belongs to the caller


def test_batch_statistics_are_float64_two_pass():
    rng = np.random.default_rng(1)
    x = random_input(rng, (5, 3, 4, 4), np.float32)
    mean, var = batch_statistics(x)
    assert mean.dtype == var.dtype == np.float64
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(var, x64.var(axis=(0, 2, 3)), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Finite differences
# ---------------------------------------------------------------------------------------------


def _relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-300))


@BOTH
@pytest.mark.parametrize(
    "shape", [(5, 3), (3, 2, 4), (2, 2, 3, 2), (1, 2, 3), (2, 1, 1, 2, 2)], ids=str
)
@pytest.mark.parametrize("backward", ["closed-form", "graph"])
def test_backward_matches_central_finite_differences(bn, shape, backward):
    rng = np.random.default_rng(3)
    x = random_input(rng, shape)
    gamma = 1.0 + 0.3 * rng.standard_normal(shape[1])
    beta = rng.standard_normal(shape[1])
    weights = rng.standard_normal(shape)  # L = sum(weights * y), so dL/dy = weights

    def loss(x_, gamma_, beta_):
        return float(np.sum(weights * bn.batch_norm_forward(x_, gamma_, beta_)[0]))

    _, cache = bn.batch_norm_forward(x, gamma, beta)
    closed = bn.batch_norm_backward
    dx, dgamma, dbeta = (closed if backward == "closed-form" else batch_norm_backward_graph)(
        weights, cache
    )

    numeric = finite_difference_gradient
    assert _relative_error(dx, numeric(lambda v: loss(v, gamma, beta), x, h=1e-5)) < 1e-7
    assert _relative_error(dgamma, numeric(lambda v: loss(x, v, beta), gamma, h=1e-5)) < 1e-7
    assert _relative_error(dbeta, numeric(lambda v: loss(x, gamma, v), beta, h=1e-5)) < 1e-7


# ---------------------------------------------------------------------------------------------
# Numerics: dtypes, large means, constant channels
# ---------------------------------------------------------------------------------------------


@BOTH
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_keeps_the_input_dtype(bn, dtype):
    rng = np.random.default_rng(2)
    x = random_input(rng, (4, 3, 5), dtype)
    y, cache = bn.batch_norm_forward(x, np.ones(3), np.zeros(3))
    dx, dgamma, dbeta = bn.batch_norm_backward(x, cache)
    assert y.dtype == dtype and dx.dtype == dtype
    assert dgamma.dtype == dbeta.dtype == np.float64
    layer = bn.BatchNorm(3)
    assert layer(x).dtype == dtype and layer.backward(x).dtype == dtype
    assert layer.eval()(x).dtype == dtype


@BOTH
@pytest.mark.parametrize("shape", [(64, 4, 8, 8), (4096, 3), (2, 2, 4096)], ids=str)
def test_large_mean_float32_stays_accurate(bn, shape):
    """Mean 1e4, standard deviation 1, float32: E[x^2] - E[x]^2 would lose every digit."""
    rng = np.random.default_rng(4)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    x64 = x.astype(np.float64)  # the exact values the float32 input holds
    axes = (0, *range(2, x.ndim))
    mean_ref = x64.mean(axis=axes, keepdims=True)
    var_ref = x64.var(axis=axes, keepdims=True)
    y_ref = (x64 - mean_ref) / np.sqrt(var_ref + 1e-5)

    y, cache = bn.batch_norm_forward(x, None, None)
    assert y.dtype == np.float32
    np.testing.assert_allclose(cache.mean, mean_ref.ravel(), rtol=1e-12)
    np.testing.assert_allclose(cache.var, var_ref.ravel(), rtol=1e-5)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-5)
    mean, var = batch_statistics(x)
    np.testing.assert_allclose(var, var_ref.ravel(), rtol=1e-5)

    dy = rng.standard_normal(shape).astype(np.float32)
    dx, dgamma, _ = bn.batch_norm_backward(dy, cache)
    _, cache64 = bn.batch_norm_forward(x64, None, None)
    dx_ref, dgamma_ref, _ = bn.batch_norm_backward(dy.astype(np.float64), cache64)
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=1e-4, atol=1e-2)


@BOTH
def test_large_mean_float32_stays_accurate_in_evaluation(bn):
    rng = np.random.default_rng(12)
    x = (1e4 + rng.standard_normal((16, 3, 4, 4))).astype(np.float32)
    running_mean = 1e4 + 0.1 * rng.standard_normal(3)  # float64, not a float32 number
    running_var = rng.uniform(0.5, 2.0, 3)
    gamma, beta = rng.uniform(0.5, 2.0, 3), rng.standard_normal(3)
    column = (1, 3, 1, 1)
    reference = (x.astype(np.float64) - running_mean.reshape(column)) / np.sqrt(
        running_var.reshape(column) + 1e-5
    ) * gamma.reshape(column) + beta.reshape(column)
    y = batch_norm_inference(x, running_mean, running_var, gamma, beta)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, reference, rtol=0, atol=1e-5)
    layer = bn.BatchNorm(3)
    layer.load_state_dict(
        {
            "weight": gamma,
            "bias": beta,
            "running_mean": running_mean,
            "running_var": running_var,
            "num_batches_tracked": 1,
        }
    )
    np.testing.assert_allclose(layer.eval()(x), reference, rtol=0, atol=1e-5)


@BOTH
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("value", [0.0, 3.0, -1234.5678])
def test_constant_channel_gives_beta_exactly_and_finite_gradients(bn, dtype, value):
    rng = np.random.default_rng(5)
    x = random_input(rng, (4, 3, 2, 2), dtype)
    x[:, 1] = value
    gamma = np.array([1.5, 2.0, 0.5])
    beta = np.array([0.25, -0.7, 1.0])
    y, cache = bn.batch_norm_forward(x, gamma, beta)
    np.testing.assert_array_equal(y[:, 1], np.asarray(beta[1], dtype=dtype))
    dy = rng.standard_normal(x.shape).astype(dtype)
    # x_hat = 0 on the constant channel, so dx = gamma / sqrt(eps) * (dy - mean(dy)) there
    g = dy[:, 1].astype(np.float64)
    expected = gamma[1] / np.sqrt(1e-5) * (g - g.mean())
    tol = TOLERANCE[dtype]
    for backward in (bn.batch_norm_backward, batch_norm_backward_graph):
        dx, dgamma, dbeta = backward(dy, cache)
        np.testing.assert_allclose(dx[:, 1], expected, rtol=tol["rtol"], atol=100 * tol["atol"])
        assert dgamma[1] == 0.0
        np.testing.assert_allclose(dbeta[1], g.sum(), rtol=1e-6)
    layer = bn.BatchNorm(3)
    assert (layer(x)[:, 1] == 0).all()
    np.testing.assert_allclose(
        layer.backward(dy)[:, 1], expected / gamma[1], rtol=tol["rtol"], atol=100 * tol["atol"]
    )


# ---------------------------------------------------------------------------------------------
# The layer against torch.nn.BatchNorm*d
# ---------------------------------------------------------------------------------------------


def _copy_parameters(layer: BatchNorm, module: torch.nn.Module, rng: np.random.Generator):
    if layer.affine:
        layer.weight = 1.0 + 0.5 * rng.standard_normal(layer.num_features)
        layer.bias = rng.standard_normal(layer.num_features)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(layer.weight))
            module.bias.copy_(torch.from_numpy(layer.bias))


def _assert_state_matches(layer: BatchNorm, module: torch.nn.Module, tol) -> None:
    if layer.track_running_stats:
        np.testing.assert_allclose(layer.running_mean, module.running_mean.double().numpy(), **tol)
        np.testing.assert_allclose(layer.running_var, module.running_var.double().numpy(), **tol)
        assert layer.num_batches_tracked == int(module.num_batches_tracked)
    else:
        assert layer.running_mean is None and module.running_mean is None
        assert layer.running_var is None and layer.num_batches_tracked is None


# training steps, then evaluation, then training again
MODES = ["train", "train", "train", "eval", "eval", "train"]


@BOTH
@pytest.mark.parametrize(
    "shape", [(6, 3), (4, 2, 5), (1, 3, 4), (3, 2, 1, 1), (2, 3, 2, 3), (2, 1, 2, 2, 3)], ids=str
)
@pytest.mark.parametrize("momentum", [0.1, 0.3, None, 1.0])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_layer_matches_torch_over_several_steps(bn, shape, momentum, dtype):
    _run_layer_against_torch(bn, shape, momentum, dtype, eps=1e-5, affine=True, track=True)


@BOTH
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "no-track"])
@pytest.mark.parametrize("eps", [1e-5, 0.1])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_layer_options_match_torch(bn, affine, track, eps, dtype):
    _run_layer_against_torch(bn, (4, 3, 3, 2), 0.3, dtype, eps=eps, affine=affine, track=track)


def _run_layer_against_torch(bn, shape, momentum, dtype, eps, affine, track):
    rng = np.random.default_rng(zlib.crc32(repr((shape, momentum, eps, affine, track)).encode()))
    channels = shape[1]
    layer = bn.BatchNorm(
        channels, eps=eps, momentum=momentum, affine=affine, track_running_stats=track
    )
    module = TORCH_MODULES[len(shape)](
        channels,
        eps=eps,
        momentum=momentum,
        affine=affine,
        track_running_stats=track,
        dtype=torch.float64 if dtype == np.float64 else torch.float32,
    )
    _copy_parameters(layer, module, rng)
    tol = TOLERANCE[dtype]
    for step, mode in enumerate(MODES):
        layer.train(mode == "train")
        module.train(mode == "train")
        assert layer.training == module.training
        x = random_input(rng, shape, dtype, mean=step - 2.0, std=1.0 + step)
        dy = rng.standard_normal(shape).astype(dtype)
        xt = torch.tensor(x, requires_grad=True)
        y_ref = module(xt)
        y_ref.backward(torch.tensor(dy))
        y = layer(x)
        dx = layer.backward(dy)
        assert y.dtype == dtype and dx.dtype == dtype
        np.testing.assert_allclose(y, y_ref.detach().numpy(), **tol)
        np.testing.assert_allclose(dx, xt.grad.numpy(), **tol)
        if affine:
            np.testing.assert_allclose(layer.grad_weight, module.weight.grad.numpy(), **tol)
            np.testing.assert_allclose(layer.grad_bias, module.bias.grad.numpy(), **tol)
            module.weight.grad = module.bias.grad = None
        else:
            assert layer.weight is None and layer.bias is None and layer.parameters() == []
        _assert_state_matches(layer, module, tol)


@BOTH
def test_layer_defaults_and_running_statistics_start_at_zero_and_one(bn):
    layer = bn.BatchNorm(4)
    assert layer.training and layer.eps == 1e-5 and layer.momentum == 0.1
    np.testing.assert_array_equal(layer.weight, np.ones(4))
    np.testing.assert_array_equal(layer.bias, np.zeros(4))
    np.testing.assert_array_equal(layer.running_mean, np.zeros(4))
    np.testing.assert_array_equal(layer.running_var, np.ones(4))
    assert layer.num_batches_tracked == 0
    assert layer.eval() is layer and not layer.training
    assert layer.train() is layer and layer.training


@BOTH
def test_running_statistics_update_rule_and_unbiased_variance(bn):
    rng = np.random.default_rng(8)
    x = random_input(rng, (5, 2, 3))
    layer = bn.BatchNorm(2, momentum=0.3)
    layer(x)
    mean = x.mean(axis=(0, 2))
    unbiased = x.var(axis=(0, 2), ddof=1)
    np.testing.assert_allclose(layer.running_mean, 0.7 * 0 + 0.3 * mean, rtol=1e-13)
    np.testing.assert_allclose(layer.running_var, 0.7 * 1 + 0.3 * unbiased, rtol=1e-13)
    cumulative = bn.BatchNorm(2, momentum=None)
    batches = [random_input(rng, (5, 2, 3)) for _ in range(3)]
    for batch in batches:
        cumulative(batch)
    np.testing.assert_allclose(
        cumulative.running_mean, np.mean([b.mean(axis=(0, 2)) for b in batches], axis=0), rtol=1e-12
    )
    np.testing.assert_allclose(
        cumulative.running_var,
        np.mean([b.var(axis=(0, 2), ddof=1) for b in batches], axis=0),
        rtol=1e-12,
    )
    assert cumulative.num_batches_tracked == 3


@BOTH
def test_eval_without_tracking_uses_batch_statistics(bn):
    rng = np.random.default_rng(9)
    x = random_input(rng, (6, 3))
    layer = bn.BatchNorm(3, track_running_stats=False).eval()
    y = layer(x)
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-12)
    assert layer.running_mean is None and layer.running_var is None
    assert layer.num_batches_tracked is None


@BOTH
def test_eval_with_tracking_allows_one_value_per_channel(bn):
    layer = bn.BatchNorm(3).eval()
    y = layer(np.array([[1.0, 2.0, 3.0]]))
    np.testing.assert_allclose(y, np.array([[1.0, 2.0, 3.0]]) / np.sqrt(1 + 1e-5), rtol=1e-14)


def test_batch_norm_inference_is_the_affine_map():
    rng = np.random.default_rng(10)
    x = random_input(rng, (4, 3, 2))
    mean, var = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    y = batch_norm_inference(x, mean, var, gamma, beta, eps=1e-3)
    ref = torch.nn.functional.batch_norm(
        torch.tensor(x),
        torch.tensor(mean),
        torch.tensor(var),
        torch.tensor(gamma),
        torch.tensor(beta),
        eps=1e-3,
    )
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        batch_norm_inference(x, mean, var),
        torch.nn.functional.batch_norm(
            torch.tensor(x), torch.tensor(mean), torch.tensor(var)
        ).numpy(),
        rtol=1e-12,
        atol=1e-12,
    )


@BOTH
def test_state_dict_round_trips_with_torch(bn):
    rng = np.random.default_rng(11)
    module = torch.nn.BatchNorm2d(3, momentum=0.5).double()
    for _ in range(2):
        module(torch.tensor(random_input(rng, (4, 3, 2, 2))))
    with torch.no_grad():
        module.weight.uniform_(0.5, 2)
        module.bias.uniform_(-1, 1)
    layer = bn.BatchNorm(3, momentum=0.5)
    layer.load_state_dict(module.state_dict())
    assert set(layer.state_dict()) == set(module.state_dict())
    assert layer.num_batches_tracked == 2
    x = random_input(rng, (2, 3, 2, 2))
    np.testing.assert_allclose(
        layer.eval()(x), module.eval()(torch.tensor(x)).detach().numpy(), rtol=1e-12, atol=1e-12
    )
    other = torch.nn.BatchNorm2d(3).double()
    other.load_state_dict({k: torch.as_tensor(v) for k, v in layer.state_dict().items()})
    for key, value in module.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value)
    with pytest.raises(KeyError, match="running_mean"):
        layer.load_state_dict({"weight": np.ones(3)})


def test_repr_names_the_arguments():
    assert repr(BatchNorm(3, momentum=None)) == (
        "BatchNorm(3, eps=1e-05, momentum=None, affine=True, track_running_stats=True)"
    )
    assert repr(BatchNorm(2, kernels="reference")).endswith(
        "track_running_stats=True, kernels='reference')"
    )


def test_kernels_must_be_named():
    with pytest.raises(ValueError, match=r"kernels must be one of \('fast', 'reference'\)"):
        BatchNorm(3, kernels="slow")


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def _no_broadcast_traceback(excinfo) -> None:
    assert "broadcast" not in str(excinfo.value)


@BOTH
@pytest.mark.parametrize("bad", [np.ones(5), np.float64(1.0)], ids=["1-D", "0-D"])
def test_wrong_rank_is_a_clear_error(bn, bad):
    with pytest.raises(ValueError, match=r"x must have shape \(N, C\) or \(N, C, \*spatial\)"):
        bn.batch_norm_forward(bad, None, None)
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        bn.BatchNorm(5)(bad)


@BOTH
@pytest.mark.parametrize("name", ["gamma", "beta"])
@pytest.mark.parametrize("size", [2, 4])
def test_parameters_of_the_wrong_size_are_named(bn, name, size):
    x = np.ones((4, 3, 2))
    kwargs = {"gamma": np.ones(3), "beta": np.zeros(3)}
    kwargs[name] = np.ones(size)
    with pytest.raises(
        ValueError, match=rf"{name} must have shape \(3,\).*got shape \({size},\)"
    ) as excinfo:
        bn.batch_norm_forward(x, **kwargs)
    _no_broadcast_traceback(excinfo)


@BOTH
def test_parameter_of_the_wrong_rank_is_named(bn):
    with pytest.raises(ValueError, match=r"gamma must have shape \(3,\)"):
        bn.batch_norm_forward(np.ones((4, 3)), np.ones((1, 3)), None)


@BOTH
@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_running_buffers_of_the_wrong_size_are_named(bn, name):
    x = np.ones((4, 3))
    buffers = {"running_mean": np.zeros(3), "running_var": np.ones(3)}
    buffers[name] = np.ones(5)
    with pytest.raises(
        ValueError, match=rf"{name} must have shape \(3,\).*got shape \(5,\)"
    ) as excinfo:
        batch_norm_inference(x, **buffers)
    _no_broadcast_traceback(excinfo)
    layer = bn.BatchNorm(3)
    state = layer.state_dict()
    state[name] = np.ones(5)
    with pytest.raises(ValueError, match=rf"{name} must have shape \(3,\)"):
        layer.load_state_dict(state)


@BOTH
def test_layer_with_the_wrong_number_of_channels_is_a_clear_error(bn):
    with pytest.raises(ValueError, match=r"4 channels on axis 1 \(num_features\).*\(2, 3\)"):
        bn.BatchNorm(4)(np.ones((2, 3)))
    with pytest.raises(ValueError, match="4 channels"):
        bn.BatchNorm(4).eval()(np.ones((2, 3, 5)))


@BOTH
@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 2, 1, 1), (1, 1, 1, 1, 1)], ids=str)
def test_one_value_per_channel_in_training_is_a_value_error_as_in_torch(bn, shape):
    x = np.ones(shape)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bn.batch_norm_forward(x, None, None)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn.BatchNorm(shape[1])(x)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        torch.nn.functional.batch_norm(torch.ones(shape), None, None, training=True)


@BOTH
@pytest.mark.parametrize("dtype", [np.int64, np.int32, bool, np.complex128])
def test_non_floating_input_is_a_type_error(bn, dtype):
    x = np.ones((4, 3), dtype=dtype)
    with pytest.raises(TypeError, match=f"floating-point.*got dtype {np.dtype(dtype)}"):
        bn.batch_norm_forward(x, None, None)
    with pytest.raises(TypeError, match="floating-point"):
        bn.BatchNorm(3)(x)


@BOTH
def test_non_array_input_and_non_floating_parameters_are_type_errors(bn):
    with pytest.raises(TypeError, match="NumPy array"):
        bn.batch_norm_forward([[1.0, 2.0], [3.0, 4.0]], None, None)
    with pytest.raises(TypeError, match="gamma must be floating point"):
        bn.batch_norm_forward(np.ones((4, 3)), np.ones(3, dtype=np.int64), None)


@BOTH
def test_backward_checks_dy_and_order(bn):
    x = np.random.default_rng(0).standard_normal((4, 3))
    _, cache = bn.batch_norm_forward(x, None, None)
    with pytest.raises(ValueError, match=r"dy must have the shape of the forward input \(4, 3\)"):
        bn.batch_norm_backward(np.ones((4, 2)), cache)
    with pytest.raises(ValueError, match="dy must have the shape"):
        batch_norm_backward_graph(np.ones((3, 3)), cache)
    with pytest.raises(RuntimeError, match="backward called before forward"):
        bn.BatchNorm(3).backward(np.ones((4, 3)))
    layer = bn.BatchNorm(3)
    layer(x)
    with pytest.raises(ValueError, match="dy must have the shape"):
        layer.backward(np.ones((4, 2)))
    layer.eval()(x)
    with pytest.raises(ValueError, match="dy must have the shape"):
        layer.backward(np.ones((4, 2)))


@BOTH
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_features=0), "num_features must be a positive integer"),
        (dict(num_features=3, eps=0.0), "eps must be positive"),
        (dict(num_features=3, momentum=1.5), r"momentum must be in \[0, 1\] or None"),
    ],
)
def test_bad_constructor_arguments(bn, kwargs, message):
    with pytest.raises(ValueError, match=message):
        bn.BatchNorm(**kwargs)


# ---------------------------------------------------------------------------------------------
# Property-based tests
# ---------------------------------------------------------------------------------------------

shapes = _shapes.random_shapes()


@BOTH
@settings(max_examples=40, deadline=None)
@given(
    shape=shapes,
    seed=st.integers(0, 2**32 - 1),
    location=st.floats(-100, 100),
    scale=st.floats(1e-2, 1e2),
    eps=st.sampled_from([1e-5, 1e-3, 0.5]),
)
def test_property_forward_backward_match_torch(bn, shape, seed, location, scale, eps):
    rng = np.random.default_rng(seed)
    x = location + scale * rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    gamma = rng.standard_normal(shape[1])
    beta = rng.standard_normal(shape[1])
    y, cache = bn.batch_norm_forward(x, gamma, beta, eps)
    dx, dgamma, dbeta = bn.batch_norm_backward(dy, cache)
    y_ref, dx_ref, dgamma_ref, dbeta_ref = torch_reference(x, gamma, beta, dy, eps)
    np.testing.assert_allclose(y, y_ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-9, atol=1e-9 * max(1.0, 1 / scale))
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=1e-9, atol=1e-9)
    graph = batch_norm_backward_graph(dy, cache)
    np.testing.assert_allclose(graph[0], dx, rtol=1e-8, atol=1e-8 * max(1.0, 1 / scale))


@BOTH
@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**32 - 1), location=st.floats(-1e4, 1e4))
def test_property_output_is_normalised_and_gradient_sums_to_zero(bn, shape, seed, location):
    """Per channel: y has mean beta and variance gamma**2 * var / (var + eps); sum(dx) = 0."""
    rng = np.random.default_rng(seed)
    x = location + rng.standard_normal(shape)
    gamma, beta = rng.uniform(0.5, 2, shape[1]), rng.standard_normal(shape[1])
    y, cache = bn.batch_norm_forward(x, gamma, beta)
    axes = (0, *range(2, len(shape)))
    np.testing.assert_allclose(y.mean(axis=axes), beta, atol=1e-9)
    np.testing.assert_allclose(
        y.var(axis=axes), gamma**2 * cache.var / (cache.var + 1e-5), rtol=1e-9, atol=1e-12
    )
    dy = rng.standard_normal(shape)
    dx, _, _ = bn.batch_norm_backward(dy, cache)
    # rounding in dx is relative to its terms, gamma / std * dy, which can be large (tiny
    # spread), and the rounding of the mean is relative to |location| / std
    magnitude = (gamma * cache.inv_std).max() * np.abs(dy).sum()
    relative = 1e-13 * (1.0 + abs(location) * cache.inv_std.max())
    np.testing.assert_allclose(dx.sum(axis=axes), 0, atol=relative * max(1.0, magnitude))


@BOTH
@settings(max_examples=25, deadline=None)
@given(
    shape=shapes,
    seed=st.integers(0, 2**32 - 1),
    momentum=st.sampled_from([0.1, 0.3, None, 1.0]),
    steps=st.integers(1, 3),
)
def test_property_running_statistics_match_torch(bn, shape, seed, momentum, steps):
    rng = np.random.default_rng(seed)
    layer = bn.BatchNorm(shape[1], momentum=momentum)
    module = TORCH_MODULES[len(shape)](shape[1], momentum=momentum, dtype=torch.float64)
    for _ in range(steps):
        x = random_input(rng, shape)
        layer(x)
        module(torch.tensor(x))
    _assert_state_matches(layer, module, TOLERANCE[np.float64])


def test_c_kernels_run_where_they_apply(fast_implementation, monkeypatch):
    """The fast forward and backward go through the C kernels for C-contiguous float input of
    at least 16 positions (when built and on), through NumPy operations otherwise; the same
    results either way."""
    calls = []
    for name in ("_c_forward", "_c_backward"):
        original = getattr(fast_numpy_bn, name)
        monkeypatch.setattr(
            fast_numpy_bn, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a)
        )
    rng = np.random.default_rng(0)
    for shape, by_c in [((4, 3, 4, 4), True), ((4, 3, 3, 5), False), ((40, 3), False)]:
        x = rng.standard_normal(shape).astype(np.float32)
        y, cache = fast_numpy_bn.batch_norm_forward(x, None, None)
        fast_numpy_bn.batch_norm_backward(x, cache)
        ran = by_c and fast_implementation == "C" and native.library() is not None
        assert calls == (["_c_forward", "_c_backward"] if ran else [])
        calls.clear()
        np.testing.assert_allclose(y, numpy_bn.batch_norm_forward(x, None, None)[0], atol=2e-6)
