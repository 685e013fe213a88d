"""Tests of bncourse.torch_bn against torch.nn.functional.batch_norm and torch.nn.BatchNorm*d.

Tolerances: float64 within 1e-10, float32 within a few 1e-5, float16/bfloat16 within a few of
their own rounding steps. CUDA tests carry the ``cuda`` marker and are skipped without a GPU.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from _shapes import SHAPES, random_shapes
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from bncourse import torch_bn
from bncourse.fast import torch_bn as fast_torch_bn
from bncourse.fast.torch_bn import compiled_kernels
from bncourse.torch_bn import BatchNorm1d, BatchNorm2d, BatchNorm3d, batch_norm, fold_batch_norm

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fast_kernels_on_small_inputs")


TOLERANCE = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=3e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=4e-2, atol=4e-2),
}


OURS = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}
NATIVE = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
RANK_OF = {2: 1, 3: 1, 4: 2, 5: 3}  # input rank -> BatchNorm{1,2,3}d

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")


def generator(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def random(shape, gen, dtype=torch.float64, mean=0.5, std=2.0, device="cpu"):
    return (mean + std * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device, dtype)


def run_functional(fn, x, dy, running, weight, bias, training, momentum, eps):
    """Output, gradients and updated running statistics of one call of ``fn``."""
    x = x.detach().clone().requires_grad_(True)
    running = [None if r is None else r.clone() for r in running]
    params = [
        None if p is None else p.detach().clone().requires_grad_(True) for p in (weight, bias)
    ]
    y = fn(x, running[0], running[1], params[0], params[1], training, momentum, eps)
    y.backward(dy)
    grads = [None if p is None else p.grad for p in params]
    return y.detach(), x.grad, grads, running


def assert_close(actual, expected, dtype):
    if expected is None:
        assert actual is None
        return
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])


def compare_functional(shape, dtype, training, affine, track, momentum=0.1, eps=1e-5, **kw):
    device = kw.get("device", "cpu")
    gen = generator(shape, dtype, training, affine, track, momentum, eps)
    x = random(shape, gen, dtype, device=device)
    dy = random(shape, gen, dtype, mean=0.0, std=1.0, device=device)
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    channels = shape[1]
    weight = random(channels, gen, param_dtype, 1.0, 0.5, device) if affine else None
    bias = random(channels, gen, param_dtype, 0.0, 1.0, device) if affine else None
    running = [None, None]
    if track:
        running = [
            random(channels, gen, param_dtype, 0.0, 1.0, device),
            random(channels, gen, param_dtype, 2.0, 0.5, device).abs(),
        ]
    args = (x, dy, running, weight, bias, training, momentum, eps)
    ours = run_functional(batch_norm, *args)
    native = run_functional(F.batch_norm, *args)
    assert_close(ours[0], native[0], dtype)
    assert_close(ours[1], native[1], dtype)
    for a, b in zip(ours[2] + ours[3], native[2] + native[3], strict=True):
        assert_close(a, b, dtype)


# ---------------------------------------------------------------------------------------------
# The functional core against torch.nn.functional.batch_norm
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("track", [True, False], ids=["running", "no-running"])
def test_functional_training_matches_torch(shape, dtype, affine, track):
    compare_functional(shape, dtype, training=True, affine=affine, track=track)


@pytest.mark.parametrize("momentum", [0.1, 0.3, 1.0, 0.0])
@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.5])
def test_functional_momentum_and_eps_match_torch(momentum, eps):
    for dtype in (torch.float64, torch.float32):
        compare_functional((4, 3, 5), dtype, True, True, True, momentum=momentum, eps=eps)


@pytest.mark.parametrize(
    "shape", [(8, 3), (1, 3), (2, 3, 4, 5), (1, 2, 1, 1), (2, 2, 3, 1, 2)], ids=str
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_functional_evaluation_matches_torch(shape, dtype, affine):
    compare_functional(shape, dtype, training=False, affine=affine, track=True)
    compare_functional(shape, dtype, training=False, affine=affine, track=True, eps=0.0)


def test_running_buffers_are_updated_in_place_with_the_unbiased_variance():
    gen = generator("in-place")
    x = random((5, 2, 3), gen)
    running_mean, running_var = torch.zeros(2, dtype=torch.float64), torch.ones(2).double()
    mean_ptr, var_ptr = running_mean.data_ptr(), running_var.data_ptr()
    batch_norm(x, running_mean, running_var, training=True, momentum=0.25)
    assert running_mean.data_ptr() == mean_ptr and running_var.data_ptr() == var_ptr
    torch.testing.assert_close(running_mean, 0.25 * x.mean((0, 2)), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(
        running_var, 0.75 + 0.25 * x.var((0, 2), correction=1), rtol=1e-13, atol=1e-13
    )
    before = running_mean.clone(), running_var.clone()
    batch_norm(x, running_mean, running_var, training=False)
    assert torch.equal(running_mean, before[0]) and torch.equal(running_var, before[1])


@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
def test_gradient_flows_only_where_asked(training):
    gen = generator("needs-grad", training)
    x = random((4, 3, 2), gen)
    weight, bias = random(3, gen).requires_grad_(True), random(3, gen)
    running = (torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    dy = random((4, 3, 2), gen)
    batch_norm(x, *running, weight, bias, training=training).backward(dy)
    assert x.grad is None and bias.grad is None  # not asked for: absent
    expected = weight.detach().clone().requires_grad_(True)
    F.batch_norm(x, *running, expected, bias, training=training).backward(dy)
    torch.testing.assert_close(weight.grad, expected.grad)
    # only x asked for: the parameters get none, x gets torch's gradient
    x.requires_grad_(True)
    weight.requires_grad_(False)
    before = weight.grad.clone()
    batch_norm(x, *running, weight, bias, training=training).backward(dy)
    assert weight.grad.equal(before)  # unchanged: no gradient for weight this time
    x_native = x.detach().clone().requires_grad_(True)
    F.batch_norm(x_native, *running, weight, bias, training=training).backward(dy)
    torch.testing.assert_close(x.grad, x_native.grad)


# ---------------------------------------------------------------------------------------------
# gradcheck: the hand-derived backward against finite differences
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape", [(5, 3), (3, 2, 4), (2, 2, 3, 2), (1, 2, 3), (4, 1), (2, 1, 1, 2, 2)], ids=str
)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
def test_gradcheck(shape, affine, training):
    gen = generator("gradcheck", shape)
    x = random(shape, gen).requires_grad_(True)
    channels = shape[1]
    weight = random(channels, gen, mean=1.0, std=0.5).requires_grad_(affine)
    bias = random(channels, gen).requires_grad_(affine)
    running_mean = random(channels, gen)
    running_var = random(channels, gen, mean=2.0, std=0.3).abs()

    def f(x, weight, bias):
        # fresh buffers every call: the update in training must not change the next result
        return batch_norm(
            x,
            running_mean.clone(),
            running_var.clone(),
            weight if affine else None,
            bias if affine else None,
            training,
            0.1,
            1e-3,
        )

    assert torch.autograd.gradcheck(f, (x, weight, bias), eps=1e-6, atol=1e-8, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# The modules against torch.nn.BatchNorm*d
# ---------------------------------------------------------------------------------------------

MODES = ["train", "train", "train", "eval", "eval", "train"]


def run_modules(
    shape,
    momentum=0.1,
    eps=1e-5,
    affine=True,
    track=True,
    dtype=torch.float64,
    device="cpu",
    memory_format=torch.contiguous_format,
    steps=MODES,
):
    rank = RANK_OF[len(shape)]
    kwargs = dict(
        eps=eps,
        momentum=momentum,
        affine=affine,
        track_running_stats=track,
        device=device,
        dtype=dtype,
    )
    ours, native = OURS[rank](shape[1], **kwargs), NATIVE[rank](shape[1], **kwargs)
    gen = generator("modules", shape, momentum, eps, affine, track, dtype)
    if affine:
        with torch.no_grad():
            native.weight.copy_(random(shape[1], gen, dtype, 1.0, 0.5, device))
            native.bias.copy_(random(shape[1], gen, dtype, 0.0, 1.0, device))
    ours.load_state_dict(native.state_dict())
    for step, mode in enumerate(steps):
        ours.train(mode == "train")
        native.train(mode == "train")
        x = random(shape, gen, dtype, mean=step - 2.0, std=1.0 + step, device=device)
        x = x.contiguous(memory_format=memory_format) if x.dim() == 4 else x
        dy = random(shape, gen, dtype, mean=0.0, std=1.0, device=device)
        outputs = []
        for module in (ours, native):
            xi = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
            y = module(xi)
            y.backward(dy)
            outputs.append((y.detach(), xi.grad))
        (y_ours, dx_ours), (y_native, dx_native) = outputs
        assert_close(y_ours, y_native, dtype)
        assert_close(dx_ours, dx_native, dtype)
        if memory_format == torch.channels_last:
            assert y_ours.is_contiguous(memory_format=torch.channels_last)
        for name in ("weight", "bias"):
            p_ours, p_native = getattr(ours, name), getattr(native, name)
            if affine:
                assert_close(p_ours.grad, p_native.grad, dtype)
                p_ours.grad = p_native.grad = None
            else:
                assert p_ours is None and p_native is None
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            b_ours, b_native = getattr(ours, name), getattr(native, name)
            if track:
                assert_close(b_ours, b_native, dtype)
            else:
                assert b_ours is None and b_native is None
    return ours, native


@pytest.mark.parametrize(
    "shape",
    [(6, 3), (4, 2, 5), (1, 3, 4), (3, 2, 1), (2, 3, 2, 3), (3, 2, 1, 1), (2, 1, 2, 2, 3)],
    ids=str,
)
@pytest.mark.parametrize("momentum", [0.1, 0.3, None, 1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_modules_match_torch_over_several_steps(shape, momentum, dtype):
    run_modules(shape, momentum=momentum, dtype=dtype)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "no-track"])
@pytest.mark.parametrize("eps", [1e-5, 0.1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_module_options_match_torch(affine, track, eps, dtype):
    run_modules((4, 3, 3, 2), momentum=0.3, eps=eps, affine=affine, track=track, dtype=dtype)


def test_channels_last_is_kept_and_matches():
    run_modules((3, 4, 5, 2), memory_format=torch.channels_last)
    run_modules((3, 4, 5, 2), dtype=torch.float32, memory_format=torch.channels_last)


def _strided_input(make: str, gen: torch.Generator) -> Tensor:
    if make == "transposed":
        return random((5, 4, 3, 2), gen).transpose(2, 3)
    if make == "sliced":
        return random((6, 4, 5, 4), gen)[::2, :, 1:, ::2]
    if make == "expanded":
        return random((1, 3, 1, 4), gen).expand(5, 3, 2, 4)
    if make == "sliced-channels-last":
        return random((6, 4, 5, 3), gen).contiguous(memory_format=torch.channels_last)[::2]
    if make == "permuted":  # (N, H, W, C) data viewed as (N, C, H, W): channels-last strides
        return random((3, 5, 2, 4), gen).permute(0, 3, 1, 2)
    if make == "transposed-1d":  # (N, L, C) data viewed as (N, C, L)
        return random((4, 6, 3), gen).transpose(1, 2)
    raise ValueError(make)


STRIDED = ["transposed", "sliced", "expanded", "sliced-channels-last", "permuted", "transposed-1d"]


@pytest.mark.parametrize("make", STRIDED)
def test_non_contiguous_input(make):
    """Values, gradients and the output's memory layout match torch.nn for strided input."""
    gen = generator("non-contiguous", make)
    x = _strided_input(make, gen)
    assert not x.is_contiguous()
    modules = {3: (BatchNorm1d, nn.BatchNorm1d), 4: (BatchNorm2d, nn.BatchNorm2d)}[x.dim()]
    grad_output = random(tuple(x.shape), gen)
    for training in (True, False):
        ours, native = (module(x.shape[1]).double().train(training) for module in modules)
        with torch.no_grad():
            for bn in (ours, native):
                bn.weight.copy_(torch.linspace(0.5, 2.0, x.shape[1], dtype=torch.float64))
        results = []
        for bn in (ours, native):
            x_leaf = x.detach().requires_grad_(True)
            y = bn(x_leaf)
            (grad_input,) = torch.autograd.grad(y, x_leaf, grad_output)
            results.append((y, grad_input))
        (y_ours, dx_ours), (y_native, dx_native) = results
        torch.testing.assert_close(y_ours, y_native, **TOLERANCE[torch.float64])
        torch.testing.assert_close(dx_ours, dx_native, **TOLERANCE[torch.float64])
        assert y_ours.stride() == y_native.stride(), (training, y_ours.stride())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
def test_half_precision_on_cpu(dtype, training):
    """float16/bfloat16 input, float32 parameters and statistics, output in the input's dtype."""
    compare_functional((4, 3, 5, 6), dtype, training=training, affine=True, track=True)
    module = BatchNorm2d(3).train(training)
    x = torch.randn(4, 3, 5, 6, dtype=dtype, requires_grad=True)
    y = module(x)
    assert y.dtype == dtype and module.running_mean.dtype == torch.float32
    y.float().sum().backward()
    assert x.grad.dtype == dtype and module.weight.grad.dtype == torch.float32
    reference = nn.BatchNorm2d(3).train(training)(x.detach().float())
    torch.testing.assert_close(y.float(), reference, **TOLERANCE[dtype])


def test_modules_have_the_same_parameters_buffers_and_state_dict_keys():
    for rank in (1, 2, 3):
        for kwargs in (
            dict(),
            dict(affine=False),
            dict(track_running_stats=False),
            dict(affine=False, track_running_stats=False),
        ):
            ours, native = OURS[rank](5, **kwargs), NATIVE[rank](5, **kwargs)
            assert [n for n, _ in ours.named_parameters()] == [
                n for n, _ in native.named_parameters()
            ]
            assert [n for n, _ in ours.named_buffers()] == [n for n, _ in native.named_buffers()]
            assert list(ours.state_dict()) == list(native.state_dict())
            for key, value in native.state_dict().items():
                assert_close(ours.state_dict()[key], value, torch.float64)
            assert repr(ours).split("(", 1)[1] == repr(native).split("(", 1)[1]
            for attribute in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
                assert getattr(ours, attribute) == getattr(native, attribute)


def test_constructor_device_and_dtype():
    module = BatchNorm2d(4, device="cpu", dtype=torch.float64)
    for tensor in (module.weight, module.bias, module.running_mean, module.running_var):
        assert tensor.dtype == torch.float64 and tensor.device.type == "cpu"
    assert module.num_batches_tracked.dtype == torch.long
    module = BatchNorm1d(4, 1e-3, 0.2, True, True, "cpu", torch.float32)
    assert module.eps == 1e-3 and module.momentum == 0.2


def test_state_dicts_load_both_ways():
    ours, native = run_modules((4, 3, 2, 2), steps=["train", "train"])
    other_ours = BatchNorm2d(3, dtype=torch.float64)
    other_ours.load_state_dict(native.state_dict())
    other_native = nn.BatchNorm2d(3, dtype=torch.float64)
    other_native.load_state_dict(ours.state_dict())
    assert int(other_ours.num_batches_tracked) == int(other_native.num_batches_tracked) == 2
    x = random((2, 3, 2, 2), generator("state"))
    torch.testing.assert_close(other_ours.eval()(x), native.eval()(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(other_native.eval()(x), ours.eval()(x), rtol=1e-12, atol=1e-12)
    # state dicts from before num_batches_tracked existed (version 1) still load
    old = native.state_dict()
    del old["num_batches_tracked"]
    old._metadata[""]["version"] = 1
    for module in (BatchNorm2d(3, dtype=torch.float64), nn.BatchNorm2d(3, dtype=torch.float64)):
        module.load_state_dict(old)
        assert int(module.num_batches_tracked) == 0


def test_reset_running_stats_and_parameters():
    module = BatchNorm2d(2)
    module(torch.randn(3, 2, 2, 2))
    module.reset_parameters()
    assert torch.equal(module.running_mean, torch.zeros(2))
    assert torch.equal(module.running_var, torch.ones(2))
    assert int(module.num_batches_tracked) == 0


def test_eval_without_running_statistics_uses_batch_statistics():
    x = random((6, 3), generator("no-track"))
    for module in (
        BatchNorm1d(3, track_running_stats=False).double().eval(),
        nn.BatchNorm1d(3, track_running_stats=False).double().eval(),
    ):
        torch.testing.assert_close(
            module(x).mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0
        )


# ---------------------------------------------------------------------------------------------
# Constant channels and large means
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("value", [0.0, 3.0, -1234.5678])
def test_constant_channel_gives_bias_exactly_and_finite_gradients(dtype, value):
    x = random((4, 3, 2, 2), generator("constant", value), dtype)
    x[:, 1] = value
    x.requires_grad_(True)
    weight = torch.tensor([1.5, 2.0, 0.5], dtype=dtype, requires_grad=True)
    bias = torch.tensor([0.25, -0.7, 1.0], dtype=dtype, requires_grad=True)
    y = batch_norm(x, None, None, weight, bias, training=True)
    assert torch.equal(y[:, 1], torch.full_like(y[:, 1], bias[1].item()))
    y.backward(torch.randn(x.shape, dtype=dtype))
    for grad in (x.grad, weight.grad, bias.grad):
        assert torch.isfinite(grad).all()
    assert weight.grad[1] == 0


def test_large_mean_float32_stays_accurate():
    gen = generator("large-mean")
    x64 = (1e4 + torch.randn(64, 4, 8, 8, generator=gen, dtype=torch.float64)).float().double()
    mean, var = x64.mean((0, 2, 3), keepdim=True), x64.var((0, 2, 3), keepdim=True, correction=0)
    reference = (x64 - mean) / torch.sqrt(var + 1e-5)
    running_mean, running_var = torch.zeros(4), torch.ones(4)
    y = batch_norm(x64.float(), running_mean, running_var, training=True, momentum=1.0)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(running_mean.double(), mean.view(-1), rtol=1e-7, atol=0)
    count = x64.numel() // 4
    torch.testing.assert_close(
        running_var.double(), var.view(-1) * count / (count - 1), rtol=1e-4, atol=0
    )


def test_large_mean_float32_stays_accurate_in_evaluation():
    gen = generator("large-mean-eval")
    x = (1e4 + torch.randn(16, 3, 4, 4, generator=gen, dtype=torch.float64)).float()
    running_mean = (1e4 + 0.1 * torch.randn(3, generator=gen, dtype=torch.float64)).float()
    running_var = torch.rand(3, generator=gen) + 0.5
    weight, bias = torch.rand(3, generator=gen) + 0.5, torch.randn(3, generator=gen)
    view = (1, 3, 1, 1)
    reference = (x.double() - running_mean.double().view(view)) / torch.sqrt(
        running_var.double().view(view) + 1e-5
    ) * weight.double().view(view) + bias.double().view(view)
    y = batch_norm(x, running_mean, running_var, weight, bias, training=False)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), reference, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module, bad_ranks",
    [(BatchNorm1d, (1, 4, 5)), (BatchNorm2d, (2, 3, 5)), (BatchNorm3d, (2, 3, 4, 6))],
)
def test_modules_check_the_input_rank_like_torch(module, bad_ranks):
    native = {
        BatchNorm1d: nn.BatchNorm1d,
        BatchNorm2d: nn.BatchNorm2d,
        BatchNorm3d: nn.BatchNorm3d,
    }[module]
    for rank in bad_ranks:
        x = torch.randn((2,) * rank)
        with pytest.raises(ValueError) as ours:
            module(2)(x)
        with pytest.raises(ValueError) as theirs:
            native(2)(x)
        expected = str(theirs.value).split(" (got")[0]  # e.g. "expected 4D input"
        assert str(ours.value).startswith(f"{module.__name__}: {expected}")
        assert f"(got {rank}D input)" in str(ours.value)


def test_functional_wrong_rank_is_a_clear_error_of_torchs_type():
    for training, error in ((True, IndexError), (False, RuntimeError)):
        running = (None, None) if training else (torch.zeros(5), torch.ones(5))
        with pytest.raises(error, match=r"input must have shape \(N, C, \*\).*1-D tensor"):
            batch_norm(torch.randn(5), *running, training=training)
        with pytest.raises(error):
            F.batch_norm(torch.randn(5), *running, training=training)
    with pytest.raises(IndexError, match="0-D tensor"):
        batch_norm(torch.tensor(1.0), None, None, training=True)


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_per_channel_tensors_of_the_wrong_size_are_named(name):
    kwargs = dict(
        running_mean=torch.zeros(3),
        running_var=torch.ones(3),
        weight=torch.ones(3),
        bias=torch.zeros(3),
    )
    kwargs[name] = torch.ones(4)
    message = rf"{name} should be a vector of 3 values.*got shape \(4,\)"
    for training in (True, False):
        with pytest.raises(RuntimeError, match=message):
            batch_norm(torch.randn(2, 3, 4), training=training, **kwargs)
        with pytest.raises(RuntimeError):  # the same type as torch's
            F.batch_norm(torch.randn(2, 3, 4), training=training, **kwargs)


def test_module_with_the_wrong_number_of_channels_names_the_expected_shape():
    with pytest.raises(RuntimeError, match=r"4 channels \(num_features\).*shape \(2, 3, 5\)"):
        BatchNorm1d(4)(torch.randn(2, 3, 5))
    with pytest.raises(RuntimeError):  # the same type as torch's
        nn.BatchNorm1d(4)(torch.randn(2, 3, 5))
    with pytest.raises(RuntimeError, match=r"4 channels \(num_features\)"):
        BatchNorm2d(4, affine=False).eval()(torch.randn(2, 3, 5, 5))
    # like torch.nn, a module without per-channel tensors accepts any number of channels
    BatchNorm1d(4, affine=False, track_running_stats=False)(torch.randn(2, 3, 5))
    nn.BatchNorm1d(4, affine=False, track_running_stats=False)(torch.randn(2, 3, 5))


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 2, 1, 1), (1, 1, 1, 1, 1)], ids=str)
def test_one_value_per_channel_in_training_is_a_value_error_as_in_torch(shape):
    x = torch.ones(shape)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        batch_norm(x, None, None, training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        F.batch_norm(x, None, None, training=True)
    module = OURS[RANK_OF[len(shape)]](shape[1])
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        module(x)
    module.eval()(x)  # evaluation with running statistics is fine


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64], ids=str)
def test_non_floating_input_is_not_implemented_as_in_torch(dtype):
    x = torch.ones(4, 3, dtype=dtype)
    with pytest.raises(NotImplementedError, match=rf"floating-point.*got dtype {dtype}"):
        batch_norm(x, None, None, training=True)
    with pytest.raises(NotImplementedError, match="floating-point"):
        BatchNorm1d(3)(x)
    with pytest.raises(NotImplementedError):
        nn.BatchNorm1d(3)(x)


def test_other_bad_arguments():
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="input must be a Tensor"):
        batch_norm(x.numpy(), None, None, training=True)
    with pytest.raises(
        RuntimeError, match="weight has dtype torch.float64, expected torch.float32"
    ):
        batch_norm(x, None, None, torch.ones(3, dtype=torch.float64), training=True)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        batch_norm(x, None, None, training=True, eps=0.0)
    with pytest.raises(ValueError, match="both be None or neither"):
        batch_norm(x, torch.zeros(3), None, training=True)
    with pytest.raises(RuntimeError, match="must be defined in evaluation mode"):
        batch_norm(x, None, None, training=False)
    with pytest.raises(TypeError, match="momentum must be a float"):
        batch_norm(x, None, None, training=True, momentum=None)


@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
def test_empty_batch_matches_torch(training):
    results = []
    for module in (BatchNorm1d(3), nn.BatchNorm1d(3)):
        module.train(training)
        x = torch.randn(0, 3, 4, requires_grad=True)
        y = module(x)
        y.sum().backward()
        state = {k: v.clone() for k, v in module.state_dict().items()}
        results.append((y, x.grad, module.weight.grad, module.bias.grad, state))
    (y, dx, dw, db, state), (y_ref, dx_ref, dw_ref, db_ref, state_ref) = results
    assert y.shape == y_ref.shape == (0, 3, 4) and dx.shape == dx_ref.shape
    torch.testing.assert_close(dw, dw_ref)  # zeros: no values, no gradient
    torch.testing.assert_close(db, db_ref)
    assert state.keys() == state_ref.keys()
    for key in state:  # the running statistics and the batch count as torch.nn leaves them
        torch.testing.assert_close(state[key], state_ref[key], equal_nan=True)


# ---------------------------------------------------------------------------------------------
# fold_batch_norm
# ---------------------------------------------------------------------------------------------


def _trained_bn(module_type, channels, gen, affine=True):
    bn = module_type(channels, affine=affine).double()
    for _ in range(3):
        shape = (
            (8, channels, 5, 5) if module_type in (BatchNorm2d, nn.BatchNorm2d) else (8, channels)
        )
        bn(random(shape, gen, mean=1.0, std=3.0))
    if affine:
        with torch.no_grad():
            bn.weight.copy_(random(channels, gen, mean=1.0, std=0.5))
            bn.bias.copy_(random(channels, gen))
    return bn.eval()


@pytest.mark.parametrize("bn_type", [BatchNorm1d, nn.BatchNorm1d])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("layer_bias", [True, False])
def test_fold_linear(bn_type, affine, layer_bias):
    gen = generator("fold-linear", affine, layer_bias)
    layer = nn.Linear(6, 4, bias=layer_bias).double()
    bn = _trained_bn(bn_type, 4, gen, affine)
    folded = fold_batch_norm(layer, bn)
    assert type(folded) is nn.Linear and folded is not layer
    x = random((10, 6), gen)
    torch.testing.assert_close(folded(x), bn(layer(x)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bn_type", [BatchNorm2d, nn.BatchNorm2d])
@pytest.mark.parametrize(
    "conv_kwargs",
    [dict(), dict(stride=2, padding=1, groups=2, bias=False)],
    ids=["plain", "strided-grouped"],
)
def test_fold_conv2d(bn_type, conv_kwargs):
    gen = generator("fold-conv", bn_type, repr(conv_kwargs))
    layer = nn.Conv2d(4, 6, 3, **conv_kwargs).double()
    weight_before = layer.weight.detach().clone()
    bn = _trained_bn(bn_type, 6, gen)
    folded = fold_batch_norm(layer, bn)
    assert type(folded) is nn.Conv2d and torch.equal(layer.weight, weight_before)
    x = random((2, 4, 7, 7), gen)
    torch.testing.assert_close(folded(x), bn(layer(x)), rtol=1e-11, atol=1e-11)
    folded32 = fold_batch_norm(layer.float(), bn.float())
    torch.testing.assert_close(folded32(x.float()), bn(layer(x.float())), rtol=1e-5, atol=1e-5)


def test_fold_errors():
    with pytest.raises(TypeError, match="layer must be nn.Linear"):
        fold_batch_norm(nn.ReLU(), BatchNorm1d(3))
    with pytest.raises(TypeError, match="bn must be a BatchNorm"):
        fold_batch_norm(nn.Linear(2, 3), nn.LayerNorm(3))
    with pytest.raises(ValueError, match="no running statistics"):
        fold_batch_norm(nn.Linear(2, 3), BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="3 output channels but bn has 4 features"):
        fold_batch_norm(nn.Linear(2, 3), BatchNorm1d(4))


# ---------------------------------------------------------------------------------------------
# Property-based tests
# ---------------------------------------------------------------------------------------------

shapes = random_shapes()


@settings(max_examples=40, deadline=None)
@given(
    shape=shapes,
    seed=st.integers(0, 2**32 - 1),
    location=st.floats(-100, 100),
    scale=st.floats(1e-2, 1e2),
    eps=st.sampled_from([1e-5, 1e-3, 0.5]),
    momentum=st.sampled_from([0.1, 0.3, 1.0]),
    training=st.booleans(),
)
def test_property_functional_matches_torch(shape, seed, location, scale, eps, momentum, training):
    gen = torch.Generator().manual_seed(seed)
    x = random(shape, gen, mean=location, std=scale)
    dy = random(shape, gen, mean=0.0, std=1.0)
    channels = shape[1]
    weight, bias = random(channels, gen), random(channels, gen)
    running = [random(channels, gen), random(channels, gen, mean=1.0, std=0.5).abs()]
    args = (x, dy, running, weight, bias, training, momentum, eps)
    ours, native = run_functional(batch_norm, *args), run_functional(F.batch_norm, *args)
    tol = dict(rtol=1e-9, atol=1e-9 * max(1.0, 1.0 / scale))
    torch.testing.assert_close(ours[0], native[0], **tol)
    torch.testing.assert_close(ours[1], native[1], **tol)
    for a, b in zip(ours[2] + ours[3], native[2] + native[3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(
    shape=shapes,
    seed=st.integers(0, 2**32 - 1),
    momentum=st.sampled_from([0.1, 0.3, None, 1.0]),
    steps=st.integers(1, 3),
)
def test_property_modules_match_torch(shape, seed, momentum, steps):
    modes = ["train"] * steps + ["eval"]
    run_modules(shape, momentum=momentum, steps=modes, eps=1e-5 * (1 + seed % 3))


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize(
    "shape", [(8, 3), (4, 3, 7), (2, 3, 4, 5), (1, 2, 3, 3), (2, 3, 2, 3, 4)], ids=str
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
def test_cuda_functional_matches_torch(shape, dtype, training):
    compare_functional(shape, dtype, training=training, affine=True, track=True, device="cuda")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cuda_modules_match_torch(momentum, dtype):
    run_modules((4, 3, 5, 6), momentum=momentum, dtype=dtype, device="cuda")
    run_modules((4, 3, 5), momentum=momentum, dtype=dtype, device="cuda")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
def test_cuda_half_precision(dtype, training):
    compare_functional(
        (8, 4, 6, 6), dtype, training=training, affine=True, track=True, device="cuda"
    )
    module = BatchNorm2d(4, device="cuda").train(training)
    x = torch.randn(8, 4, 6, 6, device="cuda", dtype=dtype, requires_grad=True)
    y = module(x)
    y.float().sum().backward()
    assert y.dtype == x.grad.dtype == dtype
    assert module.running_mean.dtype == module.weight.grad.dtype == torch.float32


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cuda_channels_last(dtype):
    if dtype == torch.float16:
        module = BatchNorm2d(4, device="cuda")
        x = torch.randn(3, 4, 5, 6, device="cuda", dtype=dtype)
        y = module(x.contiguous(memory_format=torch.channels_last))
        assert y.is_contiguous(memory_format=torch.channels_last)
        reference = nn.BatchNorm2d(4, device="cuda")(x.float())
        torch.testing.assert_close(y.float(), reference, **TOLERANCE[dtype])
    else:
        run_modules((3, 4, 5, 6), dtype=dtype, device="cuda", memory_format=torch.channels_last)


@pytest.mark.cuda
@needs_cuda
def test_cuda_gradcheck_and_fold():
    x = torch.randn(3, 2, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    weight = torch.randn(2, dtype=torch.float64, device="cuda", requires_grad=True)
    bias = torch.randn(2, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: batch_norm(x, None, None, w, b, training=True), (x, weight, bias)
    )
    layer = nn.Conv2d(3, 4, 3, device="cuda", dtype=torch.float64)
    bn = BatchNorm2d(4, device="cuda", dtype=torch.float64)
    bn(torch.randn(5, 4, 6, 6, device="cuda", dtype=torch.float64))
    bn.eval()
    images = torch.randn(2, 3, 6, 6, device="cuda", dtype=torch.float64)
    torch.testing.assert_close(fold_batch_norm(layer, bn)(images), bn(layer(images)))


# ---------------------------------------------------------------------------------------------
# Compiled kernels (use_compiled_kernels): the same formulas fused by torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def compiled():
    """The compiled training kernels switched on for one test, and off again afterwards."""
    previous = torch_bn.use_compiled_kernels(True)
    yield
    torch_bn.use_compiled_kernels(previous)


def test_use_compiled_kernels_returns_the_previous_setting_and_checks_its_argument():
    assert torch_bn.use_compiled_kernels(True) is False
    assert torch_bn.use_compiled_kernels(False) is True
    with pytest.raises(TypeError, match="enabled must be a bool"):
        torch_bn.use_compiled_kernels(1)


@pytest.mark.usefixtures("compiled")
@pytest.mark.parametrize(
    "shape, dtype, affine, track",
    [
        ((8, 3), torch.float32, True, True),
        ((2, 3, 4, 5), torch.float32, True, True),
        ((3, 2, 5, 2), torch.float32, True, True),  # a second shape: dynamic shapes
        ((2, 3, 4, 5), torch.float64, False, False),
        ((1, 2, 2, 2, 2), torch.float64, True, True),
        ((4, 3, 5, 6), torch.bfloat16, True, True),
    ],
    ids=str,
)
def test_compiled_functional_training_matches_torch(shape, dtype, affine, track, monkeypatch):
    compiled_kernels()
    forward, backward = fast_torch_bn._kernel("forward"), fast_torch_bn._kernel("backward")
    calls = []

    def counted(kernel, name):
        def run(*args):
            calls.append(name)
            return kernel(*args)

        return run

    monkeypatch.setitem(fast_torch_bn._compiled, "forward", counted(forward, "forward"))
    monkeypatch.setitem(fast_torch_bn._compiled, "backward", counted(backward, "backward"))
    compare_functional(shape, dtype, training=True, affine=affine, track=track)
    assert calls == ["forward", "backward"]  # the compiled kernels ran


@pytest.mark.usefixtures("compiled")
def test_compiled_modules_match_torch_with_cumulative_momentum_and_channels_last():
    run_modules((3, 4, 5, 2), momentum=None, dtype=torch.float32)
    run_modules((3, 4, 5, 2), dtype=torch.float32, memory_format=torch.channels_last)
    for make in STRIDED:
        x = _strided_input(make, generator("compiled-strided", make)).float()
        module = BatchNorm1d if x.dim() == 3 else BatchNorm2d
        native_module = nn.BatchNorm1d if x.dim() == 3 else nn.BatchNorm2d
        y, y_native = module(x.shape[1])(x), native_module(x.shape[1])(x)
        torch.testing.assert_close(y, y_native, **TOLERANCE[torch.float32])
        assert y.stride() == y_native.stride(), make


@pytest.mark.usefixtures("compiled")
def test_compiled_gradcheck_constant_channel_and_large_mean():
    gen = generator("compiled-gradcheck")
    x = random((3, 2, 4), gen).requires_grad_(True)
    weight, bias = random(2, gen).requires_grad_(True), random(2, gen).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: batch_norm(x, None, None, w, b, training=True),
        (x, weight, bias),
        eps=1e-6,
        atol=1e-8,
        rtol=1e-6,
    )
    constant = random((4, 3, 2, 2), gen, torch.float32)
    constant[:, 1] = -1234.5678
    bias = torch.tensor([0.25, -0.7, 1.0])
    y = batch_norm(constant, None, None, torch.tensor([1.5, 2.0, 0.5]), bias, training=True)
    assert torch.equal(y[:, 1], torch.full_like(y[:, 1], bias[1].item()))
    x64 = (1e4 + torch.randn(64, 4, 8, 8, generator=gen, dtype=torch.float64)).float().double()
    mean, var = x64.mean((0, 2, 3), keepdim=True), x64.var((0, 2, 3), keepdim=True, correction=0)
    y = batch_norm(x64.float(), None, None, training=True)
    torch.testing.assert_close(y.double(), (x64 - mean) / torch.sqrt(var + 1e-5), rtol=0, atol=1e-5)


def test_compiled_kernels_that_fail_to_compile_fall_back_with_a_warning(compiled, monkeypatch):
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(fast_torch_bn, "_compiled", {})
    monkeypatch.setattr(fast_torch_bn.torch, "compile", lambda function, **kwargs: broken)
    gen = generator("compiled-fallback")
    x = random((4, 3, 5), gen)
    with pytest.warns(RuntimeWarning, match="compiling the batch-norm kernels failed"):
        y = batch_norm(x, None, None, training=True)
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True))
    # from then on the reference kernel runs, without a second warning
    assert fast_torch_bn._compiled["forward"] is fast_torch_bn._forward_keeping_no_centred_input


@pytest.mark.cuda
@needs_cuda
@pytest.mark.usefixtures("compiled")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cuda_compiled_matches_torch(dtype):
    compare_functional((8, 4, 6, 6), dtype, training=True, affine=True, track=True, device="cuda")


def test_sync_batch_norm_is_the_distributed_one_and_converts_ours():
    from bncourse import distributed

    assert torch_bn.SyncBatchNorm is distributed.SyncBatchNorm
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        torch_bn.NoSuchThing  # noqa: B018
    model = nn.Sequential(nn.Conv2d(3, 4, 1), BatchNorm2d(4), nn.Sequential(BatchNorm1d(4)))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[1], nn.SyncBatchNorm)
    assert isinstance(converted[2][0], nn.SyncBatchNorm)
