"""Tests of bncourse.precision and of batch norm in reduced precision (ours against torch's)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bncourse import torch_bn
from bncourse.experiments.ch9 import running_var_in_half
from bncourse.precision import (
    FLOAT16_MAX,
    FLOAT16_TINY,
    batch_norm_dtypes,
    half_except_batch_norm,
    variance_in,
)

pytestmark = pytest.mark.usefixtures("fast_kernels_on_small_inputs")

IMPLS = {"torch": nn, "bncourse": torch_bn}


def test_constants():
    assert FLOAT16_MAX == 65504.0
    assert torch.tensor(FLOAT16_TINY, dtype=torch.float16).item() > 0
    assert torch.tensor(FLOAT16_TINY / 2.1, dtype=torch.float16).item() == 0


def test_float16_sum_of_squares_overflows_above_256():
    x = torch.randn(100, 3, generator=torch.Generator().manual_seed(0)) * 30 + 300
    naive = variance_in(x, torch.float16)
    assert not torch.isfinite(naive).any()
    exact = x.double().var(dim=0, unbiased=False)
    torch.testing.assert_close(
        variance_in(x, torch.float32, "two_pass").double(), exact, rtol=1e-4, atol=0
    )
    # two passes avoid the huge sum of squares but the sum of the values still overflows
    assert not torch.isfinite(variance_in(x, torch.float16, "two_pass")).all()
    small = x / 300  # values around 1: float16 is fine
    assert torch.isfinite(variance_in(small, torch.float16)).all()


def test_small_variances_underflow_in_float16():
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(1)) * 1e-4
    assert torch.all(variance_in(x, torch.float16, "two_pass") == 0)  # squares flush to 0
    torch.testing.assert_close(
        variance_in(x, torch.float32, "two_pass"), x.var(dim=0, unbiased=False), rtol=1e-4, atol=0
    )
    with pytest.raises(ValueError, match="method"):
        variance_in(x, torch.float16, "welford")


@pytest.mark.parametrize(
    "scale, check",
    [
        (300.0, lambda v: torch.isinf(v).all()),  # true variance 9e4 > 65504
        (3e-4, lambda v: ((v < 1e-6) & (v * 2**24 == (v * 2**24).round())).all()),
    ],
)
def test_float16_running_var_overflows_and_underflows_like_torch(scale, check):
    ours = running_var_in_half(torch_bn.BatchNorm1d(4).half(), scale, steps=200)
    theirs = running_var_in_half(nn.BatchNorm1d(4).half(), scale, steps=200)
    assert ours.dtype == theirs.dtype == torch.float16
    assert check(ours) and check(theirs)
    torch.testing.assert_close(ours, theirs, rtol=2e-3, atol=1e-7)


def test_float16_model_without_autocast_behaves_like_torch():
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(2)).half()
    outputs = {}
    for name, module in IMPLS.items():
        bn = module.BatchNorm1d(5).half()
        outputs[name] = (bn(x), bn.running_mean.clone(), bn.running_var.clone())
    for ours, theirs in zip(outputs["bncourse"], outputs["torch"], strict=True):
        assert ours.dtype == theirs.dtype == torch.float16
        torch.testing.assert_close(ours, theirs, rtol=2e-3, atol=2e-3)


def _linear_bn(impl: str, dims: int) -> nn.Sequential:
    torch.manual_seed(3)
    if dims == 1:
        return nn.Sequential(nn.Linear(6, 4), IMPLS[impl].BatchNorm1d(4))
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), IMPLS[impl].BatchNorm2d(4))


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("training", [True, False])
def test_autocast_keeps_statistics_in_float32_and_matches_torch(dims, training):
    x = torch.randn(
        (8, 6) if dims == 1 else (4, 2, 5, 5), generator=torch.Generator().manual_seed(4)
    )
    results = {}
    for impl in IMPLS:
        model = _linear_bn(impl, dims).train(training)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(x)
        output.float().sum().backward()
        bn = model[1]
        results[impl] = (
            output,
            bn.running_mean,
            bn.running_var,
            bn.weight.grad,
            model[0].weight.grad,
        )
        assert output.dtype == torch.bfloat16
        assert batch_norm_dtypes(model) == [
            dict.fromkeys(("weight", "bias", "running_mean", "running_var"), torch.float32)
        ]
        assert bn.weight.grad.dtype == torch.float32
    for ours, theirs in zip(results["bncourse"], results["torch"], strict=True):
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_half_except_batch_norm(impl):
    model = _linear_bn(impl, 2).eval()
    with torch.no_grad():
        model[1].running_var.fill_(1e5)  # above float16's range
    x = torch.randn(3, 2, 5, 5)
    expected = model(x)
    half = half_except_batch_norm(copy.deepcopy(model))
    assert half[0].weight.dtype == torch.float16
    assert batch_norm_dtypes(half)[0]["running_var"] == torch.float32
    output = half(x.half())
    assert output.dtype == torch.float16
    torch.testing.assert_close(output.float(), expected, rtol=1e-2, atol=1e-2)
    plain = copy.deepcopy(model).half()
    assert torch.isinf(plain[1].running_var).all()  # what the fix avoids
