"""The fast kernels' slab-by-slab sums (bncourse.fast.torch_bn) against the reference kernels:
slabs are made two samples long here, so that every test shape (N odd) spans several of them
and leaves a remainder."""

from __future__ import annotations

import pytest
import torch
from test_fast_torch_bn import _inputs as shared_inputs

from bncourse import torch_bn
from bncourse.fast import torch_bn as fast

pytestmark = pytest.mark.usefixtures("fast_kernels_on_small_inputs", "without_c_kernels")

SHAPES = [(7, 3), (9, 2, 5), (5, 3, 2, 3), (11, 1, 2, 2), (7, 2, 2, 3, 2)]
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=2e-5)}


@pytest.fixture
def slabs_of_two(monkeypatch):
    def set_for(x):
        monkeypatch.setattr(fast, "SLAB_BYTES", 2 * x[0].numel() * x.element_size())

    return set_for


def _inputs(shape, dtype, mean=0.5, channels_last=False):
    assert shape[0] % 2 == 1 and shape[0] >= 5  # several slabs of two and a remainder
    return shared_inputs(shape, dtype, True, mean=mean, channels_last=channels_last)


# the two routes of the fast kernels on a CPU (inputs of standard deviation 2): every channel's
# mean within fast.ONE_PASS_MEAN standard deviations of zero (sums of x itself), or not (pivot)
ROUTES = {"one-pass": 0.5, "pivot": 20.0}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("keep_centred", [True, False], ids=["kept", "not-kept"])
@pytest.mark.parametrize("route", ROUTES)
def test_slab_sums_match_the_reference(shape, dtype, keep_centred, route, slabs_of_two):
    x, g, gamma, beta = _inputs(shape, dtype, mean=ROUTES[route])
    slabs_of_two(x)
    expected = torch_bn.batch_norm_forward(x, gamma, beta, 1e-5)
    ours = fast.batch_norm_forward(x, gamma, beta, 1e-5, keep_centred)
    for actual, wanted in zip(ours[:3], expected[:3], strict=True):
        torch.testing.assert_close(actual, wanted, **TOLERANCE[dtype])
    if keep_centred:
        torch.testing.assert_close(ours[3], expected[3], **TOLERANCE[dtype])
        gradients = fast.batch_norm_backward(g, ours[3], gamma, ours[2], 1e-5)
    else:
        centring = ours[3]
        if route == "one-pass":  # the mean itself
            assert centring.shape == (shape[1],)
            torch.testing.assert_close(centring, expected[1], **TOLERANCE[dtype])
        else:  # pivots, then mean(x - pivot): their sum is mu
            assert centring.shape == (2 * shape[1],)
            torch.testing.assert_close(centring[: shape[1]] + centring[shape[1] :], expected[1])
        gradients = fast.batch_norm_backward_from_input(g, x, centring, gamma, ours[2], 1e-5)
    wanted = torch_bn.batch_norm_backward(g, expected[3], gamma, expected[2], 1e-5)
    for actual, want in zip(gradients, wanted, strict=True):
        torch.testing.assert_close(actual, want, **TOLERANCE[dtype])


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
def test_one_pass_route_at_its_limit_is_accurate_in_float32(channels_last, slabs_of_two):
    """Every mean just inside fast.ONE_PASS_MEAN standard deviations: the one-pass route runs
    (the mean is what it keeps) and agrees with the float64 reference to float32 precision."""
    x, g, gamma, beta = _inputs((9, 3, 4, 5), torch.float64, mean=0.0, channels_last=channels_last)
    x = x - x.mean((0, 2, 3), keepdim=True)
    x = (x + 0.99 * fast.ONE_PASS_MEAN * x.std((0, 2, 3), correction=0, keepdim=True)).float()
    slabs_of_two(x)
    exact = torch_bn.batch_norm_forward(x.double(), gamma, beta, 1e-5)
    y, mu, var, centring = fast.batch_norm_forward(x, gamma.float(), beta.float(), 1e-5, False)
    assert centring.shape == (3,)
    torch.testing.assert_close(y.double(), exact[0], rtol=0, atol=2e-6)
    torch.testing.assert_close(var.double(), exact[2], rtol=2e-6, atol=0)
    dx, dgamma, _ = fast.batch_norm_backward_from_input(
        g.float(), x, centring, gamma.float(), var, 1e-5
    )
    wanted = torch_bn.batch_norm_backward(g, exact[3], gamma, exact[2], 1e-5)
    torch.testing.assert_close(dx.double(), wanted[0], rtol=0, atol=2e-6)
    torch.testing.assert_close(dgamma.double(), wanted[1], rtol=0, atol=2e-4)
    x[:, 1] += 50.0  # one channel's mean now far out (std 2): the pivot route
    assert fast.batch_norm_forward(x, gamma.float(), beta.float(), 1e-5, False)[3].shape == (6,)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
def test_large_mean_stays_accurate_forward_and_backward(channels_last, slabs_of_two):
    """A mean of 1e4 in float32: the pivot keeps the forward exact and the backward from the
    input re-centres what the float32 rounding of mu moved; compared in float64."""
    x, g, gamma, beta = _inputs((9, 3, 4, 5), torch.float32, mean=1e4, channels_last=channels_last)
    slabs_of_two(x)
    exact = torch_bn.batch_norm_forward(x.double(), gamma.double(), beta.double(), 1e-5)
    y, mu, var, centring = fast.batch_norm_forward(x, gamma, beta, 1e-5, False)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(y.double(), exact[0], rtol=0, atol=1e-5)
    dx, dgamma, dbeta = fast.batch_norm_backward_from_input(g, x, centring, gamma, var, 1e-5)
    wanted = torch_bn.batch_norm_backward(g.double(), exact[3], gamma.double(), exact[2], 1e-5)
    torch.testing.assert_close(dx.double(), wanted[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(dgamma.double(), wanted[1], rtol=1e-5, atol=1e-4)


def test_constant_channel_gives_beta_exactly_and_finite_gradients(slabs_of_two):
    x, g, gamma, beta = _inputs((9, 3, 2, 2), torch.float32, mean=1e4)
    slabs_of_two(x)
    x[:, 1] = -1234.5678
    y, mu, var, centring = fast.batch_norm_forward(x, gamma, beta, 1e-5, False)
    assert torch.equal(y[:, 1], beta[1].expand_as(y[:, 1]))
    dx, dgamma, _ = fast.batch_norm_backward_from_input(g, x, centring, gamma, var, 1e-30)
    assert torch.isfinite(dx).all() and dgamma[1] == 0


def test_modules_keep_no_centred_input_by_default_and_match_torch(slabs_of_two):
    """The default (fast) module saves x, not x - mu, for the backward, and trains like
    torch.nn.BatchNorm2d over slab-spanning inputs."""
    x, g, _, _ = _inputs((9, 3, 4, 5), torch.float64)
    slabs_of_two(x)
    ours, native = torch_bn.BatchNorm2d(3).double(), torch.nn.BatchNorm2d(3).double()
    results = []
    for module in (ours, native):
        leaf = x.clone().requires_grad_(True)
        y = module(leaf)
        y.backward(g)
        results.append((y.detach(), leaf.grad, module.weight.grad, module.running_var))
    for actual, wanted in zip(*results, strict=True):
        torch.testing.assert_close(actual, wanted)
    y = ours(x.clone().requires_grad_(True))
    saved = [t for t in y.grad_fn.saved_tensors if isinstance(t, torch.Tensor)]
    assert sum(t.numel() == x.numel() for t in saved) == 1  # x only
    assert saved[-1].shape == (x.shape[1],)  # the mean (a small mean: the one-pass route)


def test_modules_run_the_reference_kernels_on_small_inputs(monkeypatch):
    """Below fast.SMALL_INPUT values the fast choice runs the reference kernels (which keep
    the centred input, full size); from it on, the fast ones (C values kept: the mean)."""
    module = torch_bn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    for threshold, kept in ((x.numel() + 1, x.numel()), (x.numel(), 3)):
        monkeypatch.setattr(fast, "SMALL_INPUT", threshold)
        y = module(x.clone().requires_grad_(True))
        saved = [t for t in y.grad_fn.saved_tensors if isinstance(t, torch.Tensor)]
        assert saved[-1].numel() == kept
