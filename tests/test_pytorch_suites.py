"""PyTorch's own test inputs for batch norm, run against bncourse.torch_bn.

* ``torch.testing._internal.common_modules.module_db``: the entries of ``nn.BatchNorm1d/2d/3d``
  (constructor arguments, inputs, training and evaluation) and their error inputs;
* ``torch.testing._internal.common_methods_invocations.op_db``: the OpInfo of
  ``nn.functional.batch_norm`` (sample inputs, gradcheck, gradgradcheck).

Each sample runs through ours and torch's with the same values; outputs, gradients and the
updated running statistics must agree, and ours must raise the exception type torch raises. Both
the fast (default) and the reference kernels run. These suites need ``expecttest`` (in
requirements.txt).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bncourse import torch_bn

pytest.importorskip("expecttest", reason="PyTorch's test inputs import expecttest")
common_modules = pytest.importorskip("torch.testing._internal.common_modules")
common_methods = pytest.importorskip("torch.testing._internal.common_methods_invocations")

KERNELS = ["fast", "reference"]
DTYPES = [torch.float64, torch.float32]
TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-5)}
MODULE_INFOS = {
    info.name: info
    for info in common_modules.module_db
    if info.module_cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
}
(OP_INFO,) = [
    op
    for op in common_methods.op_db
    if op.name == "nn.functional.batch_norm" and op.variant_test_name == ""
]


pytestmark = pytest.mark.usefixtures("one_torch_thread", "fast_kernels_on_small_inputs")


def _ours(info) -> type[nn.Module]:
    return getattr(torch_bn, info.module_cls.__name__)


def _clone(value):
    if isinstance(value, torch.Tensor):
        copied = value.detach().clone()
        return copied.requires_grad_(True) if value.requires_grad else copied
    return value


def _close(actual, expected, dtype):
    assert (actual is None) == (expected is None)
    if actual is not None:
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, **TOLERANCE[dtype], equal_nan=True)


# ---------------------------------------------------------------------------------------------
# module_db
# ---------------------------------------------------------------------------------------------


def _module_inputs(info, dtype, training):
    return info.module_inputs_func(
        info, device="cpu", dtype=dtype, requires_grad=True, training=training
    )


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(MODULE_INFOS))
def test_module_db_inputs_match_torch(name, dtype, training, kernels):
    info = MODULE_INFOS[name]
    inputs = _module_inputs(info, dtype, training)
    assert len(inputs) >= 5
    for sample in inputs:
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        native = info.module_cls(*args, **kwargs).to(dtype).train(training)
        ours = _ours(info)(*args, **kwargs, kernels=kernels).to(dtype).train(training)
        ours.load_state_dict(native.state_dict())
        assert isinstance(ours, nn.modules.batchnorm._BatchNorm)
        assert repr(ours) == repr(native)
        for _ in range(2):  # two steps: the running statistics are used after an update
            results = []
            for module in (ours, native):
                forward_args = [_clone(a) for a in sample.forward_input.args]
                output = module(*forward_args, **sample.forward_input.kwargs)
                output.backward(torch.ones_like(output) + output.detach())
                grads = [a.grad for a in forward_args] + [p.grad for p in module.parameters()]
                results.append((output, grads))
                module.zero_grad()
            (output, grads), (expected, expected_grads) = results
            _close(output, expected, dtype)
            for actual, wanted in zip(grads, expected_grads, strict=True):
                _close(actual, wanted, dtype)
        for (key, value), (key_native, value_native) in zip(
            ours.state_dict().items(), native.state_dict().items(), strict=True
        ):
            assert key == key_native
            _close(value, value_native, dtype)


@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
@pytest.mark.parametrize("name", sorted(MODULE_INFOS))
def test_module_db_gradcheck_and_gradgradcheck(name, training):
    info = MODULE_INFOS[name]
    for sample in _module_inputs(info, torch.float64, training):
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        module = _ours(info)(*args, **kwargs).double().train(training)
        (x,) = sample.forward_input.args
        if x.numel() == 0:
            continue
        names = [n for n, _ in module.named_parameters()]
        params = [p.detach().clone().requires_grad_(True) for p in module.parameters()]
        buffers = {n: b for n, b in module.named_buffers()}

        def f(x, *params, names=names, buffers=buffers, module=module):
            state = dict(zip(names, params, strict=True))
            state.update({n: b.clone() for n, b in buffers.items()})  # no update between calls
            return torch.func.functional_call(module, state, (x,))

        inputs = (x.detach().clone().requires_grad_(True), *params)
        # fast mode: random projections of the Jacobians (as PyTorch's own suite runs them)
        assert torch.autograd.gradcheck(f, inputs, fast_mode=True)
        assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("name", sorted(MODULE_INFOS))
def test_module_db_error_inputs_raise_torchs_exception_types(name):
    info = MODULE_INFOS[name]
    training = True  # the error inputs (eps <= 0) are errors in training
    errors = info.module_error_inputs_func(
        info, device="cpu", dtype=torch.float32, requires_grad=False, training=training
    )
    assert errors
    for error in errors:
        sample = error.module_error_input
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        for cls in (info.module_cls, _ours(info)):
            with pytest.raises(error.error_type):
                module = cls(*args, **kwargs).train(training)
                module(*sample.forward_input.args, **sample.forward_input.kwargs)


# ---------------------------------------------------------------------------------------------
# OpInfo of nn.functional.batch_norm
# ---------------------------------------------------------------------------------------------


def _op_samples(dtype, requires_grad=False):
    return list(OP_INFO.sample_inputs("cpu", dtype, requires_grad=requires_grad))


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_db_samples_match_torch(dtype, kernels):
    samples = _op_samples(dtype, requires_grad=True)
    assert len(samples) >= 10
    for sample in samples:
        results = []
        for fn in (F.batch_norm, torch_bn.batch_norm):
            x = _clone(sample.input)
            args = [_clone(a) for a in sample.args]
            kwargs = dict(sample.kwargs, kernels=kernels) if fn is not F.batch_norm else {}
            kwargs = {**sample.kwargs, **kwargs}
            output = fn(x, *args, **kwargs)
            differentiable = [t for t in [x, *args] if isinstance(t, torch.Tensor)]
            differentiable = [t for t in differentiable if t.requires_grad]
            grads = torch.autograd.grad(
                output, differentiable, output.detach() + 1.0, allow_unused=True
            )
            results.append((output, grads, args[:2]))
        (expected, expected_grads, expected_running), (output, grads, running) = results
        _close(output, expected, dtype)
        for actual, wanted in zip(grads, expected_grads, strict=True):
            _close(actual, wanted, dtype)
        for actual, wanted in zip(running, expected_running, strict=True):
            _close(actual, wanted, dtype)


@pytest.mark.parametrize("kernels", KERNELS)
def test_op_db_gradcheck_and_gradgradcheck(kernels):
    checked = 0
    for sample in _op_samples(torch.float64, requires_grad=True):
        if sample.input.numel() == 0:
            continue
        args = list(sample.args)
        positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and i >= 2]
        positions = [i for i in positions if a_requires_grad(args[i])]
        running = [None if a is None else a.detach() for a in args[:2]]

        def f(x, *params, positions=positions, running=running, sample=sample, args=args):
            call = [None if r is None else r.clone() for r in running] + list(args[2:])
            for i, p in zip(positions, params, strict=True):
                call[i] = p
            return torch_bn.batch_norm(x, *call, **sample.kwargs, kernels=kernels)

        inputs = (sample.input, *[args[i] for i in positions])
        assert torch.autograd.gradcheck(f, inputs)
        assert torch.autograd.gradgradcheck(f, inputs)
        checked += 1
    assert checked >= 8


def a_requires_grad(tensor: torch.Tensor) -> bool:
    return tensor.requires_grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_db_samples_under_torch_func_jvp_match_torch(dtype):
    """OpInfo samples (training ones without running statistics) through torch.func.jvp."""
    for sample in _op_samples(dtype):
        if sample.input.dim() < 2 or sample.input.numel() == 0:
            continue
        training = sample.kwargs.get("training", False)
        args = copy.deepcopy(list(sample.args))
        if training:
            args[0] = args[1] = None
        tangent = torch.randn_like(sample.input)
        outputs = []
        for fn in (F.batch_norm, torch_bn.batch_norm):

            def call(x, fn=fn, args=args, kwargs=sample.kwargs):
                return fn(x, *[_clone(a) for a in args], **kwargs)

            primal, jvp = torch.func.jvp(call, (sample.input,), (tangent,))
            outputs.append((primal, jvp))
        for actual, wanted in zip(outputs[1], outputs[0], strict=True):
            _close(actual, wanted, dtype)
