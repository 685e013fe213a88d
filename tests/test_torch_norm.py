"""Parity of bncourse.torch_norm with torch.nn: forward, backward, state, errors, module_db."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from bncourse import torch_norm as T

PAIRS = {
    "LayerNorm": (T.LayerNorm, nn.LayerNorm),
    "RMSNorm": (T.RMSNorm, nn.RMSNorm),
    "GroupNorm": (T.GroupNorm, nn.GroupNorm),
    "InstanceNorm1d": (T.InstanceNorm1d, nn.InstanceNorm1d),
    "InstanceNorm2d": (T.InstanceNorm2d, nn.InstanceNorm2d),
    "InstanceNorm3d": (T.InstanceNorm3d, nn.InstanceNorm3d),
}

# (name, constructor args, constructor kwargs, input shape)
CASES = [
    ("LayerNorm", (16,), {}, (4, 7, 16)),
    ("LayerNorm", ((7, 16),), {"eps": 1e-3}, (4, 7, 16)),
    ("LayerNorm", ([16],), {"elementwise_affine": False}, (5, 16)),
    ("LayerNorm", (16,), {"bias": False}, (2, 3, 16)),
    ("RMSNorm", (16,), {}, (4, 7, 16)),
    ("RMSNorm", ((7, 16),), {"eps": 1e-6}, (4, 7, 16)),
    ("RMSNorm", (16,), {"elementwise_affine": False}, (3, 16)),
    ("GroupNorm", (4, 8), {}, (3, 8, 5, 5)),
    ("GroupNorm", (1, 8), {"affine": False}, (3, 8, 6)),
    ("GroupNorm", (8, 8), {"bias": False}, (3, 8, 2, 2, 2)),
    ("GroupNorm", (2, 6), {}, (4, 6)),
    ("InstanceNorm1d", (6,), {}, (3, 6, 9)),
    ("InstanceNorm1d", (6,), {"affine": True, "track_running_stats": True}, (6, 9)),
    ("InstanceNorm2d", (4,), {"affine": True}, (3, 4, 5, 5)),
    ("InstanceNorm2d", (4,), {"track_running_stats": True, "momentum": 0.3}, (3, 4, 5, 5)),
    ("InstanceNorm2d", (4,), {"track_running_stats": True, "momentum": None}, (3, 4, 5, 5)),
    ("InstanceNorm3d", (2,), {"affine": True, "track_running_stats": True}, (2, 2, 3, 3, 3)),
]
DTYPES = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _pair(name, args, kwargs, dtype, seed=0):
    ours_cls, theirs_cls = PAIRS[name]
    ours = ours_cls(*args, **kwargs, dtype=dtype)
    theirs = theirs_cls(*args, **kwargs, dtype=dtype)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _assert_close(actual, expected, tol, what):
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}"
    )


def _step(module, x, dy):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(dy)
    return y.detach(), x.grad


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize(("name", "args", "kwargs", "shape"), CASES)
def test_parity_forward_backward_state(name, args, kwargs, shape, dtype):
    tol = DTYPES[dtype]
    ours, theirs = _pair(name, args, kwargs, dtype)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    torch.manual_seed(1)
    for training in (True, True, False):
        ours.train(training)
        theirs.train(training)
        x = (torch.randn(shape) * 2 + 3).to(dtype)
        dy = torch.randn(shape).to(dtype)
        y1, dx1 = _step(ours, x, dy)
        y2, dx2 = _step(theirs, x, dy)
        _assert_close(y1, y2, tol, f"{name} output (training={training})")
        _assert_close(dx1, dx2, 5 * tol, f"{name} input gradient (training={training})")
        for (pname, p1), p2 in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            _assert_close(p1.grad, p2.grad, 20 * tol, f"{name} {pname}.grad")
            p1.grad, p2.grad = None, None
        for key, value in theirs.state_dict().items():
            mine = ours.state_dict()[key]
            if value.is_floating_point():
                _assert_close(mine, value, tol, f"{name} buffer {key}")
            else:
                assert torch.equal(mine, value), key


@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm2d"])
def test_gradcheck_float64(name):
    args, shape = {
        "LayerNorm": (((3, 4),), (2, 3, 4)),
        "RMSNorm": ((4,), (2, 3, 4)),
        "GroupNorm": ((2, 4), (2, 4, 3)),
        "InstanceNorm2d": ((3,), (2, 3, 2, 3)),
    }[name]
    kwargs = {"affine": True} if name.startswith("Instance") else {}
    module = PAIRS[name][0](*args, **kwargs, dtype=torch.float64)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    params = tuple(module.parameters())
    assert torch.autograd.gradcheck(lambda x, *_: module(x), (x, *params))


def test_general_function_gives_batch_norm():
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    ours = T.normalize(x, (0, 2, 3), w.view(1, 3, 1, 1))
    ours.sum().mul(0).add((ours * torch.arange(ours.numel()).view_as(ours)).sum()).backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref = nn.functional.batch_norm(x, None, None, w, training=True)
    (ref * torch.arange(ref.numel()).view_as(ref)).sum().backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)


def test_rms_norm_eps_none_is_the_dtype_eps():
    for dtype in (torch.float32, torch.float64, torch.float16):
        x = torch.full((2, 4), 1e-4, dtype=dtype)
        torch.testing.assert_close(T.RMSNorm(4, dtype=dtype)(x), nn.RMSNorm(4, dtype=dtype)(x))
    assert T.RMSNorm(4).eps is None


def test_empty_batch():
    for ours, theirs, shape in [
        (T.LayerNorm(5), nn.LayerNorm(5), (0, 5)),
        (T.GroupNorm(2, 4), nn.GroupNorm(2, 4), (0, 4, 3)),
    ]:
        x = torch.randn(shape, requires_grad=True)
        y = ours(x)
        assert y.shape == theirs(x).shape
        y.sum().backward()
        assert x.grad.shape == x.shape


def test_errors_match_torch_types():
    cases = [
        (lambda m: m(torch.randn(3, 5)), T.LayerNorm(4), nn.LayerNorm(4)),
        (lambda m: m(torch.randn(3, 5)), T.RMSNorm(4), nn.RMSNorm(4)),
        (lambda m: m(torch.randn(3, 5, 2)), T.GroupNorm(2, 4), nn.GroupNorm(2, 4)),
        (lambda m: m(torch.randn(3)), T.GroupNorm(1, 4), nn.GroupNorm(1, 4)),
        (lambda m: m(torch.randn(3, 4)), T.InstanceNorm2d(4), nn.InstanceNorm2d(4)),
        (
            lambda m: m(torch.randn(2, 5, 3)),
            T.InstanceNorm1d(4, affine=True),
            nn.InstanceNorm1d(4, affine=True),
        ),
        (lambda m: m(torch.randn(2, 4, 1)), T.InstanceNorm1d(4), nn.InstanceNorm1d(4)),
    ]
    for call, ours, theirs in cases:
        with pytest.raises(Exception) as expected:
            call(theirs)
        with pytest.raises(expected.type) as got:
            call(ours)
        assert len(str(got.value)) > 20
    with pytest.raises(ValueError, match="divisible"):
        T.GroupNorm(3, 8)


def test_instance_norm_warns_like_torch_on_unused_num_features():
    with pytest.warns(UserWarning, match="does not match num_features"):
        T.InstanceNorm1d(4)(torch.randn(2, 5, 3))


def test_instance_norm_refuses_an_old_checkpoint_like_torch():
    """A pre-0.4 checkpoint (no version) with running statistics for an untracked layer."""
    state = nn.InstanceNorm1d(3, track_running_stats=True).state_dict()
    state._metadata[""]["version"] = None
    for module in (T.InstanceNorm1d(3), nn.InstanceNorm1d(3)):
        with pytest.raises(RuntimeError, match="Unexpected running stats buffer"):
            module.load_state_dict(copy.deepcopy(state))
    loaded = T.InstanceNorm1d(3, track_running_stats=True)
    loaded.load_state_dict(copy.deepcopy(state))
    assert loaded.num_batches_tracked.item() == 0


# ---------------------------------------------------------------------------------------------
# PyTorch's own module inputs (torch.testing._internal.common_modules.module_db)


def _module_db_entries():
    try:
        import expecttest  # noqa: F401  (torch's common_modules imports it)
    except ImportError:
        pytest.fail("PyTorch's module_db needs expecttest: pip install expecttest")
    from torch.testing._internal.common_modules import module_db

    names = {f"nn.{name}": name for name in PAIRS}
    return [(names[info.name], info) for info in module_db if info.name in names]


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    return value


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_db_inputs(dtype, training):
    checked = 0
    for name, info in _module_db_entries():
        ours_cls, theirs_cls = PAIRS[name]
        inputs = info.module_inputs_func(
            info, device="cpu", dtype=dtype, requires_grad=True, training=training
        )
        for module_input in inputs:
            args = module_input.constructor_input.args
            kwargs = dict(module_input.constructor_input.kwargs, dtype=dtype)
            torch.manual_seed(0)
            theirs = theirs_cls(*args, **kwargs).train(training)
            ours = ours_cls(*args, **kwargs).train(training)
            ours.load_state_dict(theirs.state_dict())
            forward = module_input.forward_input
            outputs = []
            for module in (ours, theirs):
                fargs = [_clone(a) for a in forward.args]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    y = module(*fargs, **forward.kwargs)
                grads = ()
                if y.requires_grad and y.numel():
                    leaves = [a for a in fargs if isinstance(a, torch.Tensor)]
                    leaves += list(module.parameters())
                    grads = torch.autograd.grad(
                        y, leaves, torch.ones_like(y) * 0.5 + y.detach(), allow_unused=True
                    )
                outputs.append((y, grads, module.state_dict()))
            (y1, g1, s1), (y2, g2, s2) = outputs
            what = f"{name} {module_input.desc} ({dtype}, training={training})"
            torch.testing.assert_close(y1, y2, msg=lambda m, w=what: f"{w}: {m}")
            assert len(g1) == len(g2), what
            for a, b in zip(g1, g2, strict=True):
                torch.testing.assert_close(a, b, msg=lambda m, w=what: f"{w} grad: {m}")
            assert list(s1) == list(s2), what
            for key in s1:
                torch.testing.assert_close(s1[key], s2[key], msg=lambda m, w=what: f"{w}: {m}")
            checked += 1
        if info.module_error_inputs_func is not None:
            errors = info.module_error_inputs_func(
                info, device="cpu", dtype=dtype, requires_grad=False, training=training
            )
            for error in errors:
                constructor = error.module_error_input.constructor_input
                with pytest.raises(error.error_type, match=error.error_regex):
                    ours_cls(*constructor.args, **constructor.kwargs)
                checked += 1
    # 10 GroupNorm + 2 GroupNorm errors + 3 x 6 InstanceNorm + 7 LayerNorm + 6 RMSNorm
    assert checked == 43, checked


def test_non_contiguous_inputs_match_torch():
    torch.manual_seed(0)
    cases = [
        (T.LayerNorm(16), nn.LayerNorm(16), torch.randn(16, 4, 3).transpose(0, 2)),
        (T.RMSNorm(16), nn.RMSNorm(16), torch.randn(3, 32)[:, ::2]),
        (
            T.GroupNorm(2, 4),
            nn.GroupNorm(2, 4),
            torch.randn(2, 4, 5, 5).to(memory_format=torch.channels_last),
        ),
        (T.InstanceNorm2d(4), nn.InstanceNorm2d(4), torch.randn(2, 5, 5, 4).permute(0, 3, 1, 2)),
    ]
    for ours, theirs, x in cases:
        assert not x.is_contiguous()
        dy = torch.randn(x.shape)
        y1, dx1 = _step(ours, x, dy)
        y2, dx2 = _step(theirs, x, dy)
        torch.testing.assert_close(y1, y2, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(dx1, dx2, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_modules_compile_in_one_graph():
    """torch.compile(fullgraph=True) traces the Function and its hand-derived backward."""
    torch.manual_seed(0)
    for module, shape in [
        (T.LayerNorm(16), (4, 3, 16)),
        (T.GroupNorm(2, 4), (2, 4, 5)),
        (T.InstanceNorm2d(4, affine=True), (2, 4, 3, 3)),
        (T.RMSNorm(16), (3, 16)),
    ]:
        x = torch.randn(shape)
        dy = torch.randn(shape)
        y1, dx1 = _step(module, x, dy)
        y2, dx2 = _step(torch.compile(module, fullgraph=True), x, dy)
        torch.testing.assert_close(y2, y1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dx2, dx1, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The fast kernels (bncourse.fast.torch_norm) against the reference kernels
# ---------------------------------------------------------------------------------------------

# (function, input shape, the module's own arguments): every layer, with and without affine
FAST_CASES = [
    ("layer_norm", (4, 6, 16), {"normalized_shape": (16,)}),
    ("layer_norm", (4, 6, 16), {"normalized_shape": (6, 16), "affine": False}),
    ("layer_norm", (5, 16), {"normalized_shape": (16,), "bias": False}),
    ("rms_norm", (4, 6, 16), {"normalized_shape": (16,)}),
    ("rms_norm", (4, 6, 16), {"normalized_shape": (6, 16), "affine": False}),
    ("group_norm", (3, 8, 5, 5), {"num_groups": 4}),
    ("group_norm", (3, 8, 7), {"num_groups": 1, "affine": False}),
    ("group_norm", (3, 8, 2, 3), {"num_groups": 8, "bias": False}),
    ("instance_norm", (3, 4, 5, 5), {}),
    ("instance_norm", (2, 3, 9), {"affine": False}),
]


@pytest.fixture(params=["C", "operations"])
def implementation(request):
    """The fast kernels' two implementations on a CPU: the C kernels (skipped where they cannot
    be built, with the reason) and the PyTorch operations."""
    from bncourse.fast import native

    if request.param == "C" and native.library() is None:
        pytest.skip(f"the C kernels are not built here: {native.unavailable_reason()}")
    previous = native.use_native(request.param == "C")
    yield request.param
    native.use_native(previous)


def _fast_call(name, x, kwargs, params):
    weight, bias = params
    if name in ("layer_norm", "rms_norm"):
        dims = tuple(range(-len(kwargs["normalized_shape"]), 0))
        return T.normalize(x, dims, weight, bias, 1e-5, center=name == "layer_norm")
    if name == "group_norm":
        return T.group_norm(x, kwargs["num_groups"], weight, bias)
    return T.instance_norm(x, weight=weight, bias=bias)


def _fast_params(name, x, kwargs, dtype):
    if kwargs.get("affine", True) is False:
        return None, None
    shape = kwargs.get("normalized_shape", (x.shape[1],))
    weight = (torch.randn(shape, dtype=dtype) * 0.5 + 1).requires_grad_()
    has_bias = kwargs.get("bias", True) and name != "rms_norm"
    bias = torch.randn(shape, dtype=dtype).requires_grad_() if has_bias else None
    return weight, bias


def _both_kernels(name, x, kwargs, params, dy):
    results = []
    for kernels in ("fast", "reference"):
        leaves = [x] + [p for p in params if p is not None]
        with T.kernels(kernels):
            y = _fast_call(name, x, kwargs, params)
        grads = torch.autograd.grad(y, leaves, dy)
        results.append((y.detach(), grads))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("name", "shape", "kwargs"), FAST_CASES)
def test_fast_kernels_match_the_reference(name, shape, kwargs, dtype, implementation):
    from bncourse.fast import torch_norm as fast

    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype).mul_(2).add_(0.5).requires_grad_()
    params = _fast_params(name, x, kwargs, dtype)
    dy = torch.randn(shape, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    (y1, g1), (y2, g2) = _both_kernels(name, x, kwargs, params, dy)
    torch.testing.assert_close(y1, y2, atol=tol, rtol=tol)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    # the fast kernels did run (contiguous float input), with small chunks too
    previous = fast.CHUNK_BYTES
    fast.CHUNK_BYTES = 1  # one row per chunk
    try:
        (y3, g3), _ = _both_kernels(name, x, kwargs, params, dy)
    finally:
        fast.CHUNK_BYTES = previous
    torch.testing.assert_close(y3, y2, atol=tol, rtol=tol)
    for a, b in zip(g3, g2, strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_fast_kernels_are_used_where_they_apply():
    from bncourse.fast import torch_norm as fast

    x = torch.randn(2, 4, 3, 3)
    w = torch.ones(1, 2, 2, 1, 1)
    assert fast.supports(x.view(2, 2, 2, 3, 3), w, w, (2, 3, 4))  # GroupNorm's view
    assert fast.supports(x, None, None, (2, 3))
    assert not fast.supports(x, None, None, (0, 2, 3))  # batch norm's dims: not trailing
    assert not fast.supports(x.to(memory_format=torch.channels_last), None, None, (2, 3))
    assert not fast.supports(x.half(), None, None, (2, 3))


@pytest.mark.parametrize(
    ("name", "shape", "kwargs"), [FAST_CASES[0], FAST_CASES[3], FAST_CASES[5], FAST_CASES[8]]
)
def test_fast_kernels_large_mean_float32_stay_accurate(name, shape, kwargs, implementation):
    """Mean 1e4, std 1 in float32: within 1e-4 of the float64 result (PyTorch's own kernels are
    about 4e-4 off here)."""
    torch.manual_seed(0)
    x64 = (torch.randn(shape, dtype=torch.float64) + 1e4).float().double()
    params64 = _fast_params(name, x64, kwargs, torch.float64)
    dy64 = torch.randn(shape, dtype=torch.float64)
    x32 = x64.float().requires_grad_()
    params32 = [None if p is None else p.detach().float().requires_grad_() for p in params64]
    x64.requires_grad_()
    (y32, g32), _ = _both_kernels(name, x32, kwargs, params32, dy64.float())
    (y64, g64), _ = _both_kernels(name, x64, kwargs, params64, dy64)
    for a, b in zip((y32, *g32), (y64, *g64), strict=True):
        error = (a.double() - b).abs().max() / b.abs().max()
        assert error < 1e-4, error


@pytest.mark.parametrize(("name", "shape", "kwargs"), FAST_CASES)
def test_fast_kernels_constant_rows_give_the_shift_and_finite_gradients(
    name, shape, kwargs, implementation
):
    torch.manual_seed(0)
    x = torch.full(shape, 3.7).requires_grad_()
    params = _fast_params(name, x, kwargs, torch.float32)
    dy = torch.randn(shape)
    (y, grads), _ = _both_kernels(name, x, kwargs, params, dy)
    weight, bias = params
    if bias is not None:
        shift = bias.detach() if name != "group_norm" and name != "instance_norm" else None
        if shift is None:
            shift = bias.detach().view(1, -1, *([1] * (x.dim() - 2)))
        assert torch.equal(y, shift.expand_as(y))
    elif name == "layer_norm" or name != "rms_norm":
        assert torch.equal(y, torch.zeros_like(y))
    assert all(torch.isfinite(g).all() for g in grads)


def test_fast_kernels_non_contiguous_and_channels_last_inputs_match_torch(implementation):
    torch.manual_seed(0)
    cases = [
        (T.GroupNorm(4, 8), nn.GroupNorm(4, 8), (2, 8, 5, 5)),
        (T.InstanceNorm2d(8, affine=True), nn.InstanceNorm2d(8, affine=True), (2, 8, 5, 5)),
    ]
    for ours, theirs, shape in cases:
        x = torch.randn(shape).to(memory_format=torch.channels_last)
        dy = torch.randn(shape).to(memory_format=torch.channels_last)
        y1, dx1 = _step(ours, x, dy)
        y2, dx2 = _step(theirs, x, dy)
        torch.testing.assert_close(y1, y2, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(dx1, dx2, atol=1e-4, rtol=1e-4)
    x = torch.randn(6, 16, 32)[:, :, ::2]  # LayerNorm on strided rows
    y1, dx1 = _step(T.LayerNorm(16), x, torch.ones(x.shape))
    y2, dx2 = _step(nn.LayerNorm(16), x, torch.ones(x.shape))
    torch.testing.assert_close(y1, y2, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(dx1, dx2, atol=1e-4, rtol=1e-4)


def test_fast_kernels_double_backward_and_gradcheck(implementation):
    """A recorded backward (create_graph) falls back to the differentiable reference."""
    torch.manual_seed(0)
    for module, shape in [
        (T.LayerNorm(5, dtype=torch.float64), (3, 4, 5)),
        (T.GroupNorm(2, 4, dtype=torch.float64), (2, 4, 3)),
        (T.RMSNorm(5, dtype=torch.float64), (3, 5)),
    ]:
        with torch.no_grad():
            for p in module.parameters():
                p.normal_()
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        params = tuple(module.parameters())
        assert torch.autograd.gradcheck(lambda x, *_, m=module: m(x), (x, *params))
        assert torch.autograd.gradgradcheck(lambda x, *_, m=module: m(x), (x, *params))


def test_c_kernels_run_where_they_apply(implementation):
    """The forward's saved statistics tell which implementation ran: (input, mean, rstd) in
    float64 from the C kernels, (input, pivot, shift, inv_std) from the operations."""
    from bncourse.fast import torch_norm as fast

    x = torch.randn(6, 8, 5)
    cases = [
        ((2,), torch.randn(5), torch.randn(5), True),  # LayerNorm: a scale per column, L = 1
        ((1, 2), torch.randn(8, 1), torch.randn(8, 1), True),  # per column, constant along L
        ((2,), None, None, True),  # no scale: rows of L = 5 values
        ((2,), torch.randn(8, 5), None, False),  # a scale per (row, column): operations
    ]
    for dims, weight, bias, by_c in cases:
        y, saved = fast.normalize_forward(x, weight, bias, dims, 1e-5, True)
        c_ran = len(saved) == 3
        assert c_ran == (by_c and implementation == "C")
        if c_ran:
            assert saved[1].dtype == saved[2].dtype == torch.float64
        with T.kernels("reference"):
            expected = T.normalize(x, dims, weight, bias)
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_fast_kernels_take_a_non_contiguous_upstream_gradient(implementation):
    """dy of a transposed view (as attention's reshapes hand it over): the kernels read a
    contiguous copy, alive for the whole call."""
    torch.manual_seed(2)
    x = torch.randn(8, 12, 16, requires_grad=True)
    weight = torch.randn(16, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)
    for _ in range(3):  # (a freed copy would be overwritten by the next allocations)
        dy = torch.randn(12, 8, 16).transpose(0, 1)
        results = []
        for kernels in ("fast", "reference"):
            y = T.normalize(x, (2,), weight, bias, kernels=kernels)
            results.append(torch.autograd.grad(y, (x, weight, bias), dy))
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("center", [True, False])
def test_c_kernels_general_layouts_match_the_reference(implementation, center):
    """normalize() over two trailing dims with a scale that is constant along the last (per
    column, L > 1) and with no scale, forward and all three gradients, float64."""
    torch.manual_seed(1)
    x = torch.randn(4, 6, 7, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(4, 6, 7, dtype=torch.float64)
    for weight, bias in [
        (torch.randn(6, 1, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)),
        (None, None),
    ]:
        leaves = [x] + [p.requires_grad_() for p in (weight, bias) if p is not None]
        results = []
        for kernels in ("fast", "reference"):
            y = T.normalize(x, (1, 2), weight, bias, 1e-5, center, kernels=kernels)
            results.append((y, *torch.autograd.grad(y, leaves, dy)))
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_c_kernels_build_into_the_cache_and_fall_back_without_a_compiler(monkeypatch, tmp_path):
    from bncourse.fast import native

    if native.library() is None:
        pytest.skip(f"the C kernels are not built here: {native.unavailable_reason()}")
    monkeypatch.setenv("BNCOURSE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_state", {"enabled": True})
    assert native.library() is not None and native.unavailable_reason() is None
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]  # no partial build left behind
    monkeypatch.setenv("BNCOURSE_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(native, "_state", {"enabled": True})
    assert native.library() is None
    assert "no-such-compiler" in native.unavailable_reason()
    x = torch.randn(3, 8, requires_grad=True)
    y = T.LayerNorm(8)(x)  # the PyTorch operations instead
    torch.testing.assert_close(y, nn.LayerNorm(8)(x), atol=1e-5, rtol=1e-5)
    assert native.use_native(False) is True
    assert native.unavailable_reason().startswith("turned off")
    with pytest.raises(TypeError, match="enabled must be a bool"):
        native.use_native(1)


def test_kernels_switch_and_errors():
    assert T.use_kernels("reference") == "fast"
    assert T.use_kernels("fast") == "reference"
    with T.kernels("reference"):
        assert T._KERNELS.get() == "reference"
    with pytest.raises(ValueError, match="kernels must be one of"):
        T.use_kernels("turbo")
