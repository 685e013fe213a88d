"""Tests of bncourse.batch_variants: ghost batch norm and batch renormalisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bncourse import torch_bn
from bncourse.batch_variants import BatchRenorm, GhostBatchNorm, to_batch_variant

pytestmark = pytest.mark.usefixtures("fast_kernels_on_small_inputs")


def _input(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (
        1.0 + 3.0 * torch.randn(shape, generator=generator, dtype=torch.float64)
    ).requires_grad_()


@pytest.mark.parametrize("shape", [(12, 3), (12, 3, 4), (12, 3, 2, 2), (12, 3, 2, 1, 2)])
def test_ghost_equals_batch_norm_on_each_slice(shape):
    x = _input(shape)
    ghost = GhostBatchNorm(3, virtual_batch_size=5).double()
    y = ghost(x)
    expected = []
    for chunk in torch.split(x, 5):  # slices of 5, 5 and 2
        layer = nn.BatchNorm1d(3).double() if len(shape) < 4 else nn.BatchNorm2d(3).double()
        if len(shape) == 5:
            layer = nn.BatchNorm3d(3).double()
        expected.append(layer(chunk))
    torch.testing.assert_close(y, torch.cat(expected))
    # gradients through the slices, parameters included
    weights = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)
    (dx,) = torch.autograd.grad((y * weights).sum(), x)
    (dx_ref,) = torch.autograd.grad((torch.cat(expected) * weights).sum(), x)
    torch.testing.assert_close(dx, dx_ref)


def test_ghost_running_statistics_average_the_slices():
    x = _input((8, 3)).detach()
    ghost = GhostBatchNorm(3, virtual_batch_size=4, momentum=1.0).double()
    ghost(x)
    halves = x.view(2, 4, 3)
    torch.testing.assert_close(ghost.running_mean, halves.mean(1).mean(0))
    torch.testing.assert_close(ghost.running_var, halves.var(1, unbiased=True).mean(0))
    assert int(ghost.num_batches_tracked) == 1
    ghost.eval()
    reference = nn.BatchNorm1d(3).double().eval()
    reference.load_state_dict(ghost.state_dict())
    torch.testing.assert_close(ghost(x), reference(x))


@pytest.mark.parametrize("shape", [(12, 3), (12, 3, 2, 2)])
def test_ghost_equal_slices_path_matches_the_slice_loop(shape):
    x = _input(shape, seed=1)
    fast, slow = GhostBatchNorm(3, 4).double(), GhostBatchNorm(3, 4).double()
    with torch.no_grad():
        for layer in (fast, slow):
            layer.weight.copy_(torch.tensor([2.0, -1.0, 0.5]))
            layer.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    y_fast = fast(x)
    y_slow = torch.cat([slow(chunk) for chunk in torch.split(x, 4)])  # one slice per call
    torch.testing.assert_close(y_fast, y_slow)
    weights = torch.randn(y_fast.shape, dtype=torch.float64)
    grads = torch.autograd.grad((y_fast * weights).sum(), [x, fast.weight])
    grads_slow = torch.autograd.grad((y_slow * weights).sum(), [x, slow.weight])
    for got, expected in zip(grads, grads_slow, strict=True):
        torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="more than 1 value"):
        GhostBatchNorm(3, 1)(torch.randn(4, 3))
    # one image per ghost batch is fine for images: statistics over H*W
    assert GhostBatchNorm(3, 1)(torch.randn(4, 3, 2, 2)).shape == (4, 3, 2, 2)


def test_renorm_per_slice_with_r_max_1_is_ghost_batch_norm():
    x = _input((12, 3))
    renorm = BatchRenorm(3, r_max=1.0, d_max=0.0, virtual_batch_size=4).double()
    ghost = GhostBatchNorm(3, 4).double()
    torch.testing.assert_close(renorm(x), ghost(x))
    torch.testing.assert_close(renorm.running_var, ghost.running_var)


def test_ghost_with_a_large_virtual_batch_is_batch_norm():
    x = _input((6, 3, 2, 2))
    ghost, bn = GhostBatchNorm(3, virtual_batch_size=64).double(), nn.BatchNorm2d(3).double()
    torch.testing.assert_close(ghost(x), bn(x))
    torch.testing.assert_close(ghost.running_var, bn.running_var)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        GhostBatchNorm(3, virtual_batch_size=0)


def test_renorm_with_r_max_1_and_d_max_0_is_batch_norm():
    x = _input((10, 3, 2, 2))
    renorm = BatchRenorm(3, r_max=1.0, d_max=0.0).double()
    bn = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        renorm.running_mean.fill_(5.0)  # ignored when r = 1, d = 0
        bn.running_mean.fill_(5.0)
    y, y_ref = renorm(x), bn(x)
    torch.testing.assert_close(y, y_ref)
    weights = torch.randn(y.shape, dtype=torch.float64)
    grads = torch.autograd.grad((y * weights).sum(), [x, renorm.weight, renorm.bias])
    grads_ref = torch.autograd.grad((y_ref * weights).sum(), [x, bn.weight, bn.bias])
    for got, expected in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(renorm.running_var, bn.running_var)
    torch.testing.assert_close(renorm.running_mean, bn.running_mean)


def test_renorm_unclipped_output_is_the_evaluation_output():
    x = _input((16, 3))
    renorm = BatchRenorm(3, r_max=100.0, d_max=100.0).double()
    with torch.no_grad():
        renorm.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        renorm.running_var.copy_(torch.tensor([4.0, 9.0, 0.25]))
        renorm.weight.copy_(torch.tensor([2.0, -1.0, 0.5]))
    evaluation = nn.BatchNorm1d(3).double().eval()
    evaluation.load_state_dict(renorm.state_dict())
    expected = evaluation(x)
    y = renorm(x)
    torch.testing.assert_close(y, expected)
    # ... but its gradient flows through the batch statistics: r times batch norm's gradient
    bn = nn.BatchNorm1d(3).double()
    with torch.no_grad():
        bn.weight.copy_(renorm.weight)
    weights = torch.randn(y.shape, dtype=torch.float64)
    (dx,) = torch.autograd.grad((y * weights).sum(), x)
    (dx_bn,) = torch.autograd.grad((bn(x) * weights).sum(), x)
    var = x.detach().var(0, unbiased=False)
    r = torch.sqrt(var + 1e-5) / torch.sqrt(torch.tensor([4.0, 9.0, 0.25]) + 1e-5)
    torch.testing.assert_close(dx, dx_bn * r)


def test_renorm_clips_the_corrections():
    x = _input((16, 2)).detach() * 10  # std about 30 against running std 1
    renorm = BatchRenorm(2, r_max=2.0, d_max=0.5, momentum=0.0).double()
    y = renorm(x)
    x_hat = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    mean_gap = x.mean(0)  # running mean 0, running std about 1
    d = mean_gap.clamp(-0.5, 0.5)
    torch.testing.assert_close(y, x_hat * 2.0 + d, rtol=1e-6, atol=1e-6)
    renorm.eval()
    torch.testing.assert_close(renorm(x), x / torch.sqrt(torch.tensor(1 + 1e-5)))
    with pytest.raises(ValueError, match="r_max"):
        BatchRenorm(2, r_max=0.5)
    with pytest.raises(ValueError, match="more than 1 value"):
        BatchRenorm(2).train()(torch.randn(1, 2))


def test_bad_input():
    for layer in (GhostBatchNorm(3), BatchRenorm(3)):
        with pytest.raises(ValueError, match="2D to 5D"):
            layer(torch.randn(3))
        with pytest.raises(RuntimeError, match="3 channels"):
            layer(torch.randn(4, 2))
        with pytest.raises(TypeError, match="torch.Tensor"):
            layer("x")


def test_to_batch_variant_shares_parameters():
    model = nn.Sequential(
        nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Sequential(torch_bn.BatchNorm1d(3))
    )
    weight = model[1].weight
    ghost = to_batch_variant(model, "ghost", virtual_batch_size=2)
    assert isinstance(ghost[1], GhostBatchNorm) and ghost[1].virtual_batch_size == 2
    assert isinstance(ghost[2][0], GhostBatchNorm)
    assert ghost[1].weight is weight
    renorm = to_batch_variant(nn.Sequential(nn.BatchNorm2d(4)), "renorm", r_max=2.0)
    assert isinstance(renorm[0], BatchRenorm) and renorm[0].r_max == 2.0
    with pytest.raises(ValueError, match="variant"):
        to_batch_variant(model, "other")
