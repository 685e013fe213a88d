"""bncourse.torch_bn as a drop-in for torch.nn batch norm under PyTorch's tools and transforms.

One test per tool or transform, each comparing with torch's own values for the same inputs
(torch.func grad/vmap/jvp/functional_call, forward-mode AD, double backward, torch.jit.script and
trace, torch.fx, torch.export, torch.compile); the exception types of torch for bad input; half
precision and autocast; tiny variances; and a model swap in a ResNet-style and an
EfficientNet-style network. The fast (default) and the reference kernels both run.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bncourse import torch_bn

KERNELS = ["fast", "reference"]
TOL64 = dict(rtol=1e-9, atol=1e-9)
TOL32 = dict(rtol=1e-5, atol=1e-5)


pytestmark = pytest.mark.usefixtures("one_torch_thread", "fast_kernels_on_small_inputs")


@pytest.fixture(params=KERNELS)
def kernels(request):
    """Every test that takes this fixture runs with the fast and with the reference kernels."""
    with torch_bn.kernels(request.param):
        yield request.param


def _data(seed=0, shape=(5, 3, 4), dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = 1.0 + 2.0 * torch.randn(shape, generator=gen, dtype=dtype)
    w = 1.0 + 0.3 * torch.randn(shape[1], generator=gen, dtype=dtype)
    b = torch.randn(shape[1], generator=gen, dtype=dtype)
    rm = torch.randn(shape[1], generator=gen, dtype=dtype)
    rv = 0.5 + torch.rand(shape[1], generator=gen, dtype=dtype)
    return x, w, b, rm, rv


def _functional(fn, training, rm, rv):
    """``fn(x, w, b)`` in training (batch statistics, no running ones) or evaluation."""

    def call(x, w, b):
        if training:
            return fn(x, None, None, w, b, True, 0.1, 1e-5)
        return fn(x, rm, rv, w, b, False, 0.1, 1e-5)

    return call


MODES = pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])


# ---------------------------------------------------------------------------------------------
# torch.func and autograd
# ---------------------------------------------------------------------------------------------


@MODES
def test_func_grad(kernels, training):
    x, w, b, rm, rv = _data(1)
    results = [
        torch.func.grad(lambda x, w, f=f: (f(x, w, b) ** 3).sum(), argnums=(0, 1))(x, w)
        for f in (_functional(fn, training, rm, rv) for fn in (torch_bn.batch_norm, F.batch_norm))
    ]
    torch.testing.assert_close(results[0], results[1], **TOL64)


@MODES
def test_func_vmap(kernels, training):
    x, w, b, rm, rv = _data(2)
    batched = torch.stack([x, 3.0 * x + 1.0, x.flip(0)])  # three independent batches
    weights = torch.stack([w, 2.0 * w, -w])
    results = [
        torch.func.vmap(f, in_dims=(0, 0, None))(batched, weights, b)
        for f in (_functional(fn, training, rm, rv) for fn in (torch_bn.batch_norm, F.batch_norm))
    ]
    torch.testing.assert_close(results[0], results[1], **TOL64)
    if training:  # and each slice is the batch norm of that batch alone
        alone = torch_bn.batch_norm(batched[1], None, None, weights[1], b, True)
        torch.testing.assert_close(results[0][1], alone, **TOL64)


def test_func_vmap_of_gradients_per_sample(kernels):
    """vmap over torch.func.grad: per-batch gradients, as torch's."""
    x, w, b, _, _ = _data(3)
    batched = torch.stack([x, x**2, -x])
    results = []
    for fn in (torch_bn.batch_norm, F.batch_norm):

        def loss(x, w, fn=fn):
            return (fn(x, None, None, w, b, True) ** 3).sum()

        results.append(
            torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), (0, None))(batched, w)
        )
    torch.testing.assert_close(results[0], results[1], **TOL64)


@MODES
def test_func_jvp(kernels, training):
    x, w, b, rm, rv = _data(4)
    tangents = tuple(torch.randn_like(t) for t in (x, w, b))
    results = [
        torch.func.jvp(f, (x, w, b), tangents)
        for f in (_functional(fn, training, rm, rv) for fn in (torch_bn.batch_norm, F.batch_norm))
    ]
    torch.testing.assert_close(results[0], results[1], **TOL64)


@MODES
def test_forward_mode_ad(kernels, training):
    import torch.autograd.forward_ad as fwAD

    x, w, b, rm, rv = _data(5)
    tx, tw = torch.randn_like(x), torch.randn_like(w)
    results = []
    for f in (_functional(fn, training, rm, rv) for fn in (torch_bn.batch_norm, F.batch_norm)):
        with fwAD.dual_level():
            out = f(fwAD.make_dual(x, tx), fwAD.make_dual(w, tw), b)
            results.append(fwAD.unpack_dual(out).tangent)
    torch.testing.assert_close(results[0], results[1], **TOL64)


@MODES
def test_double_backward_equals_torchs(kernels, training):
    x, w, b, rm, rv = _data(6)
    results = []
    for f in (_functional(fn, training, rm, rv) for fn in (torch_bn.batch_norm, F.batch_norm)):
        inputs = [t.clone().requires_grad_(True) for t in (x, w, b)]
        y = f(*inputs)
        grads = torch.autograd.grad((y**3).sum(), inputs, create_graph=True)
        second = torch.autograd.grad(sum((g**2).sum() for g in grads), inputs, allow_unused=True)
        results.append(
            [torch.zeros_like(t) if s is None else s for t, s in zip(inputs, second, strict=True)]
        )
    assert results[0][0].abs().max() > 0  # a real second derivative, not None
    torch.testing.assert_close(results[0], results[1], **TOL64)


@MODES
def test_gradgradcheck(kernels, training):
    x, w, b, rm, rv = _data(7, shape=(4, 2, 3))
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, w, b))
    f = _functional(torch_bn.batch_norm, training, rm, rv)
    assert torch.autograd.gradgradcheck(f, inputs)


def _pair(seed=0, training=True, cls=(torch_bn.BatchNorm2d, nn.BatchNorm2d)):
    """A small conv net with our batch norm and the same with torch's, equal parameters."""
    torch.manual_seed(seed)
    ours = nn.Sequential(nn.Conv2d(3, 4, 3), cls[0](4), nn.ReLU(), nn.Conv2d(4, 2, 1), cls[0](2))
    native = nn.Sequential(nn.Conv2d(3, 4, 3), cls[1](4), nn.ReLU(), nn.Conv2d(4, 2, 1), cls[1](2))
    with torch.no_grad():
        for module in (ours[1], ours[4]):
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.5, 0.5)
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    native.load_state_dict(ours.state_dict())
    return ours.train(training), native.train(training)


def _images(seed=0):
    return torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def test_functional_call(kernels):
    ours, native = (model.double() for model in _pair(1))
    params = {k: v.detach() * 1.5 for k, v in native.named_parameters()}
    x = _images(1).double()
    results = [torch.func.functional_call(m, params, (x,)) for m in (ours, native)]
    torch.testing.assert_close(results[0], results[1], **TOL64)
    # gradients with respect to the parameters through torch.func.grad (the buffers, which
    # training mode updates in place, are passed in: torch.func refuses to mutate captured ones)
    grads, buffers = [], []
    for model in (ours, native):
        state = {k: v.clone() for k, v in model.named_buffers()}

        def loss(p, b, model=model):
            return torch.func.functional_call(model, {**p, **b}, (x,)).pow(2).sum()

        grads.append(torch.func.grad(loss)(params, state))
        buffers.append(state)
    torch.testing.assert_close(grads[0], grads[1], **TOL64)
    torch.testing.assert_close(buffers[0], buffers[1], **TOL64)
    assert buffers[0]["1.num_batches_tracked"].item() == 2  # two training calls


def test_replace_all_batch_norm_modules_and_vmap_of_a_model():
    """torch.func's helper finds our modules (they are _BatchNorm) and vmap then runs them."""
    ours, native = _pair(2)
    for model in (ours, native):
        torch.func.replace_all_batch_norm_modules_(model)
    assert ours[1].running_mean is None and not ours[1].track_running_stats
    x = torch.stack([_images(3), _images(4)])
    results = [torch.func.vmap(model)(x) for model in (ours, native)]
    torch.testing.assert_close(results[0], results[1], **TOL32)


# ---------------------------------------------------------------------------------------------
# Tracing, scripting, export, compile: outputs and state equal to torch's
# ---------------------------------------------------------------------------------------------


def _run_tool(tool, training):
    """Apply ``tool`` to our model and to torch's; two calls each; outputs and state equal."""
    ours, native = _pair(3, training)
    x = _images(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation warnings
        tools = tool(ours, x), tool(native, x)
    for scale in (1.0, 2.0):
        out, expected = (t(x * scale) for t in tools)
        torch.testing.assert_close(out, expected, **TOL32)
    state, expected_state = ours.state_dict(), native.state_dict()
    assert state.keys() == expected_state.keys()
    for key in state:
        torch.testing.assert_close(state[key], expected_state[key], **TOL32)
    return tools[0]


@MODES
def test_jit_script(training):
    scripted = _run_tool(lambda m, x: torch.jit.script(m), training)
    assert isinstance(scripted, torch.jit.ScriptModule)


@MODES
def test_jit_trace(training):
    _run_tool(lambda m, x: torch.jit.trace(m, x, check_trace=False), training)


@MODES
def test_fx_symbolic_trace(kernels, training):
    traced = _run_tool(lambda m, x: torch.fx.symbolic_trace(m), training)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert targets.count(torch_bn._module_forward) == 2  # one node per batch norm
    # the module's mode is read when the graph runs, not frozen at tracing time
    ours, native = _pair(4, training=True)
    traced = torch.fx.symbolic_trace(ours)
    traced.eval()
    native.eval()
    torch.testing.assert_close(traced(_images(6)), native(_images(6)), **TOL32)


@MODES
def test_export(kernels, training):
    def export(model, x):
        return torch.export.export(model, (x,)).module()

    _run_tool(export, training)


@MODES
def test_compile_fullgraph(training):
    """torch.compile(fullgraph=True) (aot_eager: no C++ compile); outputs and gradients."""
    ours, native = _pair(5, training)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    x = _images(7)
    results = []
    for model in (compiled, native):
        x_leaf = x.clone().requires_grad_(True)
        y = model(x_leaf)
        y.pow(2).sum().backward()
        results.append(
            (y, x_leaf.grad, model[1].weight.grad if model is native else ours[1].weight.grad)
        )
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-4)


def test_forward_ad_under_compile_fails_clearly():
    """The autograd function used under torch.compile has no custom jvp (Dynamo refuses one):
    forward-mode AD through a compiled model raises rather than returning a wrong tangent."""
    ours, _ = _pair(6)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    import torch.autograd.forward_ad as fwAD

    with pytest.raises(Exception), fwAD.dual_level():  # noqa: B017 - torch's own error type
        compiled(fwAD.make_dual(_images(8), torch.ones(4, 3, 6, 6)))


# ---------------------------------------------------------------------------------------------
# Recognised as batch norm
# ---------------------------------------------------------------------------------------------


def test_modules_are_torch_batch_norms_and_convert_to_sync_batch_norm():
    ours, _ = _pair(7)
    assert all(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in (ours[1], ours[4]))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(ours)
    assert isinstance(converted[1], nn.SyncBatchNorm) and isinstance(converted[4], nn.SyncBatchNorm)


def test_old_checkpoints_without_num_batches_tracked_load():
    module = torch_bn.BatchNorm2d(3)
    state = module.state_dict()
    del state["num_batches_tracked"]
    state._metadata = {"": {"version": 1}}
    module.num_batches_tracked.fill_(5)
    module.load_state_dict(state)
    assert module.num_batches_tracked.item() == 5  # kept, as torch.nn does for version 1
    native = nn.BatchNorm2d(3)
    native.num_batches_tracked.fill_(5)
    native.load_state_dict(state)
    assert native.num_batches_tracked.item() == 5


# ---------------------------------------------------------------------------------------------
# Bad input: torch's exception types; inputs torch accepts
# ---------------------------------------------------------------------------------------------

X = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(14))
ONE = torch.randn(1, 3, generator=torch.Generator().manual_seed(15))
W13, B31 = torch.rand(1, 3) + 0.5, torch.rand(3, 1)
BAD_FUNCTIONAL_CALLS = {
    "channels of running_mean": lambda f: f(X, torch.zeros(4), torch.ones(4), training=True),
    "channels of weight": lambda f: f(X, None, None, torch.ones(4), training=True),
    "running_mean of shape (1, 3)": lambda f: f(X, torch.zeros(1, 3), torch.ones(3)),
    "integer input": lambda f: f(X.long(), None, None, training=True),
    "bool input": lambda f: f(X > 0, torch.zeros(3), torch.ones(3)),
    "one value per channel": lambda f: f(torch.randn(1, 3), None, None, training=True),
    "eps 0 in training": lambda f: f(X, None, None, training=True, eps=0.0),
    "eps < 0 in evaluation": lambda f: f(X, torch.zeros(3), torch.ones(3), eps=-1.0),
    "training=1": lambda f: f(X, None, None, training=1),
    "training=None": lambda f: f(X, None, None, training=None),
    "momentum=None": lambda f: f(X, torch.zeros(3), torch.ones(3), training=True, momentum=None),
    "float64 weight, float32 input": lambda f: f(X, None, None, torch.ones(3).double(), None, True),
    "float16 weight, bfloat16 input": lambda f: f(X.bfloat16(), None, None, torch.ones(3).half()),
    "evaluation without running stats": lambda f: f(X, None, None),
    "only running_mean": lambda f: f(X, torch.zeros(3), None, training=True),
    "1-D input in training": lambda f: f(torch.randn(5), None, None, training=True),
    "0-D input": lambda f: f(torch.tensor(1.0), None, None, training=True),
}
ACCEPTED_FUNCTIONAL_CALLS = {
    "weight of shape (1, 3), bias (3, 1)": lambda f: f(X, None, None, W13, B31, training=True),
    "tensor momentum": lambda f: f(
        X, torch.zeros(3), torch.ones(3), training=True, momentum=torch.tensor(0.2)
    ),
    "tensor eps": lambda f: f(X, None, None, training=True, eps=torch.tensor(1e-3)),
    "integer momentum": lambda f: f(X, torch.zeros(3), torch.ones(3), training=True, momentum=1),
    "1-D empty input, training": lambda f: f(torch.randn(0), None, None, training=True),
    "1-D empty input, evaluation": lambda f: f(torch.randn(0), torch.zeros(0), torch.ones(0)),
    "empty batch": lambda f: f(torch.randn(0, 3, 2), None, None, training=True),
    "zero channels": lambda f: f(torch.randn(4, 0), None, None, training=True),
    "eps 0 in evaluation": lambda f: f(X, torch.zeros(3), torch.ones(3), eps=0.0),
    "half input, half running statistics": lambda f: f(
        X.half(), torch.zeros(3).half(), torch.ones(3).half(), training=True
    ),
    "one value per channel in evaluation": lambda f: f(ONE, torch.zeros(3), torch.ones(3)),
}


@pytest.mark.parametrize("case", list(BAD_FUNCTIONAL_CALLS))
def test_bad_functional_input_raises_torchs_exception_type(case):
    call = BAD_FUNCTIONAL_CALLS[case]
    with pytest.raises(Exception) as expected:  # noqa: B017 - the type is what we compare
        call(F.batch_norm)
    with pytest.raises(expected.type) as ours:
        call(torch_bn.batch_norm)
    assert any(word in str(ours.value) for word in ("batch_norm", "Expected more", "running_mean"))


@pytest.mark.parametrize("case", list(ACCEPTED_FUNCTIONAL_CALLS))
def test_inputs_torch_accepts_give_torchs_results(case):
    call = ACCEPTED_FUNCTIONAL_CALLS[case]
    expected, ours = call(F.batch_norm), call(torch_bn.batch_norm)
    assert ours.dtype == expected.dtype
    torch.testing.assert_close(ours, expected, rtol=1e-3, atol=1e-3)


BAD_MODULE_CALLS = {
    "wrong channel count": lambda M: M["BatchNorm1d"](4)(X),
    "wrong channel count, evaluation": lambda M: M["BatchNorm1d"](4).eval()(X),
    "wrong rank": lambda M: M["BatchNorm2d"](3)(X),
    "integer input": lambda M: M["BatchNorm1d"](3)(X.long()),
    "one value per channel": lambda M: M["BatchNorm1d"](3)(torch.randn(1, 3)),
    "eps 0 in training": lambda M: M["BatchNorm1d"](3, eps=0.0)(X),
    "float64 input, float32 module": lambda M: M["BatchNorm1d"](3)(X.double()),
}


@pytest.mark.parametrize("case", list(BAD_MODULE_CALLS))
def test_bad_module_input_raises_torchs_exception_type(case):
    call = BAD_MODULE_CALLS[case]
    with pytest.raises(Exception) as expected:  # noqa: B017
        call({"BatchNorm1d": nn.BatchNorm1d, "BatchNorm2d": nn.BatchNorm2d})
    with pytest.raises(expected.type):
        call({"BatchNorm1d": torch_bn.BatchNorm1d, "BatchNorm2d": torch_bn.BatchNorm2d})


# ---------------------------------------------------------------------------------------------
# Numerics: tiny variances, large means, half precision
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-5, 1e-30, 1e-40])
def test_gradients_finite_for_a_constant_channel_and_tiny_eps(kernels, eps):
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(8))
    x[:, 1] = 0.1
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    grads = []
    for fn in (torch_bn.batch_norm, F.batch_norm):
        x_leaf, w = x.clone().requires_grad_(True), torch.ones(3, requires_grad=True)
        fn(x_leaf, None, None, w, None, training=True, eps=eps).backward(dy)
        grads.append((x_leaf.grad, w.grad))
    for ours, native in zip(grads[0], grads[1], strict=True):
        assert torch.isfinite(native).all()
        assert torch.isfinite(ours).all()
    torch.testing.assert_close(grads[0][0][:, 0], grads[1][0][:, 0], rtol=1e-4, atol=1e-4)


def test_large_mean_stays_more_accurate_than_torch(kernels):
    gen = torch.Generator().manual_seed(10)
    x64 = (1e4 + torch.randn(64, 4, 8, 8, generator=gen, dtype=torch.float64)).float().double()
    mean = x64.mean((0, 2, 3), keepdim=True)
    exact = (x64 - mean) / torch.sqrt(x64.var((0, 2, 3), keepdim=True, correction=0) + 1e-5)
    ours = torch_bn.batch_norm(x64.float(), None, None, training=True)
    native = F.batch_norm(x64.float(), None, None, training=True)
    error, native_error = ((y.double() - exact).abs().max().item() for y in (ours, native))
    assert error < 1e-6 and error < native_error / 100


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@MODES
def test_half_precision_input_with_float32_parameters(kernels, dtype, training):
    ours, native = _pair(9, training, cls=(torch_bn.BatchNorm2d, nn.BatchNorm2d))
    ours, native = ours[1:3], native[1:3]
    x = torch.randn(4, 4, 5, 5, generator=torch.Generator().manual_seed(11)).to(dtype)
    results = []
    for model in (ours, native):
        x_leaf = x.clone().requires_grad_(True)
        y = model(x_leaf)
        y.float().pow(2).sum().backward()
        results.append((y, x_leaf.grad, model[0].weight.grad, model[0].running_var))
    for actual, expected in zip(results[0], results[1], strict=True):
        assert actual.dtype == expected.dtype
        torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2)


@MODES
def test_cpu_bfloat16_autocast_matches_torch(kernels, training):
    ours, native = _pair(10, training)
    x = _images(12)
    results = []
    for model in (ours, native):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().sum().backward()
        results.append((y, model[0].weight.grad, model[1].running_mean))
    for actual, expected in zip(results[0], results[1], strict=True):
        assert actual.dtype == expected.dtype
        torch.testing.assert_close(actual, expected, rtol=2e-2, atol=5e-2)


# ---------------------------------------------------------------------------------------------
# A model swap: every batch norm of two architectures replaced by ours
# ---------------------------------------------------------------------------------------------


class _ResidualBlock(nn.Module):
    def __init__(self, channels_in: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels_in != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _resnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        _ResidualBlock(8, 8, 1),
        _ResidualBlock(8, 16, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
        nn.BatchNorm1d(10),
    )


class _MBConv(nn.Module):
    """EfficientNet's block: expand, depthwise, squeeze-and-excitation, project (+ skip)."""

    def __init__(self, channels_in: int, channels: int, expand: int, stride: int) -> None:
        super().__init__()
        hidden = channels_in * expand
        self.expand = nn.Sequential(
            nn.Conv2d(channels_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.SiLU()
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden, eps=1e-3, momentum=0.01),
            nn.SiLU(),
        )
        self.squeeze = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(hidden, 4, 1), nn.SiLU(), nn.Conv2d(4, hidden, 1)
        )
        self.project = nn.Sequential(
            nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels, eps=1e-3)
        )
        self.skip = stride == 1 and channels_in == channels

    def forward(self, x):
        h = self.depthwise(self.expand(x))
        h = self.project(h * torch.sigmoid(self.squeeze(h)))
        return h + x if self.skip else h


def _efficientnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1, bias=False),
        nn.BatchNorm2d(8, momentum=None),
        nn.SiLU(),
        _MBConv(8, 8, 2, 1),
        _MBConv(8, 12, 3, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 10),
    )


def _swap_batch_norms(model: nn.Module) -> int:
    """Replace every torch.nn batch norm of ``model`` by ours with the same state; the count."""
    swapped = 0
    for name, child in model.named_children():
        if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d):
            ours = getattr(torch_bn, type(child).__name__)(
                child.num_features, child.eps, child.momentum, child.affine
            )
            ours.load_state_dict(child.state_dict())
            setattr(model, name, ours)
            swapped += 1
        else:
            swapped += _swap_batch_norms(child)
    return swapped


@pytest.mark.parametrize(
    "make, count", [(_resnet, 7), (_efficientnet, 7)], ids=["resnet", "effnet"]
)
def test_model_swap_training_step_and_evaluation_equal(kernels, make, count):
    torch.manual_seed(12)
    native = make()
    ours = make()
    ours.load_state_dict(native.state_dict())
    assert _swap_batch_norms(ours) == count
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in ours.modules())
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(8, 3, 16, 16, generator=gen)
    labels = torch.randint(0, 10, (8,), generator=gen)
    for model in (native, ours):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(2):
            optimizer.zero_grad()
            F.cross_entropy(model(x), labels).backward()
            optimizer.step()
    for (key, value), (key_native, value_native) in zip(
        ours.state_dict().items(), native.state_dict().items(), strict=True
    ):
        assert key == key_native
        torch.testing.assert_close(value, value_native, rtol=1e-4, atol=1e-5)
    native.eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), native(x), rtol=1e-4, atol=1e-5)
