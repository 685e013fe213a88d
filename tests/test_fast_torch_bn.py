"""bncourse.fast.torch_bn against the reference kernels of bncourse.torch_bn (the parity suite),
and the switch between them (use_kernels, kernels, the modules' ``kernels`` argument)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _shapes import SHAPES

from bncourse import torch_bn
from bncourse.fast import torch_bn as fast

TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=2e-5)}


pytestmark = pytest.mark.usefixtures("one_torch_thread", "fast_kernels_on_small_inputs")


def _inputs(shape, dtype, affine, mean=0.5, seed=0, channels_last=False):
    gen = torch.Generator().manual_seed(seed)
    x = (mean + 2.0 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    gamma = (1.0 + 0.5 * torch.randn(shape[1], generator=gen, dtype=torch.float64)).to(dtype)
    beta = torch.randn(shape[1], generator=gen, dtype=torch.float64).to(dtype)
    return x, g, (gamma if affine else None), (beta if affine else None)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_fast_kernels_match_the_reference(shape, dtype, affine):
    x, g, gamma, beta = _inputs(shape, dtype, affine)
    ours = fast.batch_norm_forward(x, gamma, beta, 1e-5)
    reference = torch_bn.batch_norm_forward(x, gamma, beta, 1e-5)
    for actual, expected in zip(ours, reference, strict=True):
        assert actual.shape == expected.shape and actual.dtype == expected.dtype
        torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])
    x_mu, var = reference[3], reference[2]
    for actual, expected in zip(
        fast.batch_norm_backward(g, x_mu, gamma, var, 1e-5),
        torch_bn.batch_norm_backward(g, x_mu, gamma, var, 1e-5),
        strict=True,
    ):
        torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])


def test_reference_kernels_match_torch():
    x, g, gamma, beta = _inputs((4, 3, 5, 2), torch.float64, True)
    y, mu, var, x_mu = torch_bn.batch_norm_forward(x, gamma, beta, 1e-3)
    x_leaf, gamma_leaf, beta_leaf = (t.clone().requires_grad_(True) for t in (x, gamma, beta))
    expected = F.batch_norm(x_leaf, None, None, gamma_leaf, beta_leaf, True, eps=1e-3)
    expected.backward(g)
    torch.testing.assert_close(y, expected.detach())
    torch.testing.assert_close(mu, x.mean((0, 2, 3)))
    torch.testing.assert_close(var, x.var((0, 2, 3), correction=0))
    torch.testing.assert_close(x_mu, x - mu.view(1, 3, 1, 1))
    dx, dgamma, dbeta = torch_bn.batch_norm_backward(g, x_mu, gamma, var, 1e-3)
    for actual, leaf in zip((dx, dgamma, dbeta), (x_leaf, gamma_leaf, beta_leaf), strict=True):
        torch.testing.assert_close(actual, leaf.grad)


def test_fast_kernels_channels_last_large_mean_and_constant_channel():
    x, g, gamma, beta = _inputs((4, 3, 5, 6), torch.float32, True, mean=1e4, channels_last=True)
    x[:, 1] = -1234.5678
    ours = fast.batch_norm_forward(x, gamma, beta, 1e-5)
    assert ours[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(ours[0][:, 1], beta[1].expand_as(ours[0][:, 1]))  # exactly beta
    exact = torch_bn.batch_norm_forward(x.double(), gamma.double(), beta.double(), 1e-5)
    torch.testing.assert_close(ours[0].double(), exact[0], rtol=0, atol=1e-5)
    dx, dgamma, _ = fast.batch_norm_backward(g, ours[3], gamma, ours[2], 1e-30)
    assert torch.isfinite(dx).all() and dgamma[1] == 0


@pytest.mark.parametrize("name", ["fast", "reference"])
def test_the_switch_picks_the_kernels(name, monkeypatch):
    calls = []
    kernel = {"fast": fast, "reference": torch_bn}[name]
    original = kernel.batch_norm_forward

    def counted(*args):
        calls.append(name)
        return original(*args)

    monkeypatch.setattr(kernel, "batch_norm_forward", counted)
    x = torch.randn(4, 3)
    with torch_bn.kernels(name):
        torch_bn.batch_norm(x, None, None, training=True)
    assert calls == [name]
    other = "reference" if name == "fast" else "fast"
    torch_bn.BatchNorm1d(3, kernels=other)(x)  # the module's own choice wins
    with torch_bn.kernels(other):
        torch_bn.BatchNorm1d(3, kernels=name)(x)
    assert calls == [name, name]


def test_use_kernels_returns_the_previous_choice_and_checks_it():
    assert torch_bn.use_kernels("reference") == "fast"
    try:
        with torch_bn.kernels("compiled"):
            assert torch_bn.use_kernels("fast") == "compiled"
        assert torch_bn.use_kernels("fast") == "reference"  # restored after the block
    finally:
        torch_bn.use_kernels("fast")
    with pytest.raises(ValueError, match="kernels must be one of"):
        torch_bn.use_kernels("turbo")
    with pytest.raises(ValueError, match="kernels must be one of"):
        torch_bn.BatchNorm2d(3, kernels="turbo")


def test_compiled_kernels_keep_no_centred_input_and_still_serve_every_transform():
    """The compiled forward keeps no centred input; its backward, double backward, jvp and
    vmap recompute it and equal torch's."""
    forward, _ = fast.compiled_kernels()
    x, g, gamma, beta = _inputs((4, 3, 5), torch.float64, True, seed=3)
    assert forward(x, gamma, beta, 1e-5)[3].numel() == 0
    results = []
    for fn, name in ((torch_bn.batch_norm, "compiled"), (F.batch_norm, None)):
        kwargs = {"kernels": name} if name else {}
        inputs = [t.clone().requires_grad_(True) for t in (x, gamma, beta)]
        y = fn(inputs[0], None, None, inputs[1], inputs[2], True, **kwargs)
        (dx,) = torch.autograd.grad(y, inputs[0], g, create_graph=True)
        second = torch.autograd.grad((dx**2).sum(), inputs[:2])  # (beta: not in dx)
        y_first = fn(x, None, None, gamma, beta, True, **kwargs)
        tangent = torch.func.jvp(
            lambda t, fn=fn, kwargs=kwargs: fn(t, None, None, gamma, beta, True, **kwargs),
            (x,),
            (g,),
        )[1]
        batched = torch.func.vmap(
            lambda t, fn=fn, kwargs=kwargs: fn(t, None, None, gamma, beta, True, **kwargs)
        )(torch.stack([x, 2.0 * x]))
        results.append((y_first, dx, *second, tangent, batched))
    for actual, expected in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)
