"""The C kernels of the fast batch norm (bncourse.fast.native, bn_forward / bn_backward), which
take contiguous NCHW input with at least 16 positions on a CPU, against the reference kernels
of bncourse.torch_bn; skipped where no C compiler could build them (with the reason)."""

from __future__ import annotations

import pytest
import torch
from test_fast_torch_bn import _inputs

from bncourse import torch_bn
from bncourse.fast import native
from bncourse.fast import torch_bn as fast

pytestmark = pytest.mark.usefixtures("fast_kernels_on_small_inputs")

SHAPES = [(5, 3, 16), (3, 4, 4, 5), (1, 2, 4, 4), (2, 3, 2, 3, 4), (7, 5, 17)]
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=2e-5)}


@pytest.fixture(autouse=True)
def c_kernels():
    if native.library() is None:
        pytest.skip(f"the C kernels are not built here: {native.unavailable_reason()}")
    with native.native_kernels(True):
        yield


def _forward_and_backward(x, g, gamma, beta, eps=1e-5):
    y, mu, var, centring = fast.batch_norm_forward(x, gamma, beta, eps, False)
    assert centring.shape == (x.shape[1],) and centring.dtype == torch.float64  # C ran
    grads = fast.batch_norm_backward_from_input(g, x, centring, gamma, var, eps)
    return (y, mu, var), grads


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_c_kernels_match_the_reference(shape, dtype, affine):
    x, g, gamma, beta = _inputs(shape, dtype, affine)
    outputs, grads = _forward_and_backward(x, g, gamma, beta)
    expected = torch_bn.batch_norm_forward(x, gamma, beta, 1e-5)
    wanted = torch_bn.batch_norm_backward(g, expected[3], gamma, expected[2], 1e-5)
    for actual, want in zip((*outputs, *grads), (*expected[:3], *wanted), strict=True):
        assert actual.dtype == want.dtype and actual.shape == want.shape
        torch.testing.assert_close(actual, want, **TOLERANCE[dtype])


def test_c_kernels_take_only_contiguous_nchw_with_16_positions():
    x, g, gamma, beta = _inputs((3, 4, 4, 4), torch.float32, True)
    assert fast._c_layout(x) == (3, 4, 16)
    for other in (
        x.contiguous(memory_format=torch.channels_last),
        x[:, :, :, :3],  # 12 positions
        x.view(3, 64),  # (N, C)
        x.half(),
    ):
        assert fast._c_layout(other) is None
    centring = fast.batch_norm_forward(x[:, :, :, :3].contiguous(), gamma, beta, 1e-5, False)[3]
    assert centring.dtype == torch.float32  # the operations' route


def test_c_kernels_large_mean_in_float32_stay_accurate():
    """A mean of 1e4 in float32: each channel's first value as pivot keeps the sums exact, the
    mean kept in float64 keeps the backward centred; compared with float64."""
    x, g, gamma, beta = _inputs((9, 3, 4, 5), torch.float32, True, mean=1e4)
    (y, _, var), (dx, dgamma, dbeta) = _forward_and_backward(x, g, gamma, beta)
    exact = torch_bn.batch_norm_forward(x.double(), gamma.double(), beta.double(), 1e-5)
    wanted = torch_bn.batch_norm_backward(g.double(), exact[3], gamma.double(), exact[2], 1e-5)
    torch.testing.assert_close(y.double(), exact[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(var.double(), exact[2], rtol=1e-5, atol=0)
    torch.testing.assert_close(dx.double(), wanted[0], rtol=0, atol=1e-5)
    # dx sums to zero over each channel (up to rounding): the float32 rounding of the mean,
    # 5e-4 at 1e4, is taken out, or each value would carry p * 5e-4
    assert dx.double().sum((0, 2, 3)).abs().max() < 2e-5
    torch.testing.assert_close(dgamma.double(), wanted[1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dbeta.double(), wanted[2], rtol=1e-6, atol=1e-5)


def test_c_kernels_constant_channel_gives_beta_exactly_and_finite_gradients():
    x, g, gamma, beta = _inputs((9, 3, 4, 4), torch.float32, True, mean=1e4)
    x[:, 1] = -1234.5678
    (y, _, var), (dx, dgamma, _) = _forward_and_backward(x, g, gamma, beta, eps=1e-30)
    assert var[1] == 0 and torch.equal(y[:, 1], beta[1].expand_as(y[:, 1]))
    assert torch.isfinite(dx).all() and dgamma[1] == 0


def test_modules_with_c_kernels_match_torch_and_take_a_non_contiguous_gradient():
    """The drop-in module on NCHW input (the C kernels) against torch.nn.BatchNorm2d: output,
    the three gradients and the running statistics, with an upstream gradient that is a
    transposed view, over three steps."""
    ours, theirs = torch_bn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    for step in range(3):
        x, _, _, _ = _inputs((6, 4, 5, 5), torch.float32, False, seed=step)
        dy = torch.randn(4, 6, 5, 5).transpose(0, 1)
        results = []
        for module in (ours, theirs):
            leaf = x.clone().requires_grad_(True)
            module(leaf).backward(dy)
            results.append((leaf.grad, module.weight.grad, module.bias.grad))
            module.zero_grad()
        for actual, wanted in zip(*results, strict=True):
            torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name))


def test_c_backward_runs_after_the_c_forward_even_when_turned_off_between():
    x, g, gamma, beta = _inputs((3, 2, 4, 4), torch.float32, True, mean=1e4)
    y, _, var, centring = fast.batch_norm_forward(x, gamma, beta, 1e-5, False)
    with native.native_kernels(False):
        dx, _, _ = fast.batch_norm_backward_from_input(g, x, centring, gamma, var, 1e-5)
    assert dx.dtype == torch.float32
    exact = torch_bn.batch_norm_forward(x.double(), gamma.double(), beta.double(), 1e-5)
    wanted = torch_bn.batch_norm_backward(g.double(), exact[3], gamma.double(), exact[2], 1e-5)
    torch.testing.assert_close(dx.double(), wanted[0], rtol=0, atol=1e-5)


def test_modules_with_c_kernels_pass_gradcheck_and_gradgradcheck_in_float64():
    """Double backward goes through the differentiable outputs mu and var of the Function: the
    C forward must hand them over as tensors of their own, not the mean it keeps."""
    module = torch_bn.BatchNorm2d(3).double()
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) for p in module.parameters()]

    def f(x, weight, bias):
        state = {"weight": weight, "bias": bias}
        return torch.func.functional_call(module, state, (x,), strict=False)

    assert fast._c_layout(x) is not None
    assert torch.autograd.gradcheck(f, (x, *params))
    assert torch.autograd.gradgradcheck(f, (x, *params))
