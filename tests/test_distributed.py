"""Tests of bncourse.distributed: SyncBatchNorm on gloo (CPU) process groups, and alone.

Each multi-process test starts its processes with :func:`bncourse.distributed.launch`, which
binds 127.0.0.1 on a free port and kills the processes after a time limit, so a hang fails the
test. Starting processes is the slow part (a few seconds each), so every launch runs several
checks and returns their results; the comparisons with single-process ``torch.nn`` batch norm
happen here, in the parent.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from bncourse import torch_bn
from bncourse.distributed import (
    SyncBatchNorm,
    collective_numbers,
    find_free_port,
    launch,
    replace_batch_norms,
)

TIMEOUT = 90.0  # seconds for one launch (process start-up included) on a loaded 2-core machine


# ---------------------------------------------------------------------------------------------
# Worker functions (importable: the processes are spawned)
# ---------------------------------------------------------------------------------------------


def _case_data(sizes, tail, seed, dtype=torch.float64):
    """The global batch (concatenated over ranks) and the upstream gradient of a case."""
    generator = torch.Generator().manual_seed(seed)
    shape = (sum(sizes), 3, *tail)
    x = 3.0 + 2.0 * torch.randn(shape, generator=generator, dtype=dtype)
    grad = torch.randn(shape, generator=generator, dtype=dtype)
    return x, grad


def _rank_slice(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _run_layer(layer, x, grad, steps=2):
    """Two training steps (forward, backward) of ``layer``; outputs and gradients of the last."""
    for _ in range(steps):
        x = x.detach().requires_grad_()
        layer.zero_grad()
        y = layer(x)
        y.backward(grad)
    return {
        "y": y.detach(),
        "dx": x.grad,
        "dw": layer.weight.grad,
        "db": layer.bias.grad,
        "running_mean": layer.running_mean.clone(),
        "running_var": layer.running_var.clone(),
        "tracked": int(layer.num_batches_tracked),
    }


def _sync_case(rank, sizes, tail, seed, group=None, momentum=0.1):
    x, grad = _case_data(sizes, tail, seed)
    part = _rank_slice(sizes, rank)
    layer = SyncBatchNorm(3, momentum=momentum, process_group=group).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
        layer.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    return _run_layer(layer, x[part], grad[part])


def _reference_case(sizes, tail, seed, momentum=0.1, rows=slice(None)):
    x, grad = _case_data(sizes, tail, seed)
    x, grad = x[rows], grad[rows]
    layer = nn.BatchNorm1d(3, momentum=momentum).double()
    if len(tail) == 2:
        layer = nn.BatchNorm2d(3, momentum=momentum).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
        layer.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    return _run_layer(layer, x, grad)


class SmallCNN(nn.Module):
    """Two conv blocks, one with torch's BN and one with bncourse's, and a linear head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1, bias=False),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1, bias=False),
            torch_bn.BatchNorm2d(4),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 3), nn.BatchNorm1d(3))

    def forward(self, x):
        return self.head(self.features(x))


def _cnn_data(seed=7, batch=8):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 4, 4, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (batch,), generator=generator)
    return x, labels


def _cnn_model():
    torch.manual_seed(3)
    return SmallCNN().double()


def _sgd_step(model, x, labels):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = nn.functional.cross_entropy(model(x), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _eval_without_communication():
    """In evaluation mode the layer must not communicate: run it on one rank only, with a
    short collective time limit (a collective would fail)."""
    layer = SyncBatchNorm(3).double()
    layer.collective_timeout = 2.0
    layer.eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    reference = nn.BatchNorm1d(3).double().eval()
    return (layer(x) - reference(x)).abs().max().item()


def _count_collectives(rank):
    """How many collectives of each kind, with how many numbers, one training step makes."""
    calls = []
    originals = dist.all_gather, dist.all_reduce

    def all_gather(outputs, tensor, *args, **kwargs):
        calls.append(("all_gather", tensor.numel()))
        return originals[0](outputs, tensor, *args, **kwargs)

    def all_reduce(tensor, *args, **kwargs):
        calls.append(("all_reduce", tensor.numel()))
        return originals[1](tensor, *args, **kwargs)

    dist.all_gather, dist.all_reduce = all_gather, all_reduce
    try:
        layer = SyncBatchNorm(5)
        x = torch.randn(4 + rank, 5, 3, requires_grad=True)
        layer(x).square().sum().backward()
    finally:
        dist.all_gather, dist.all_reduce = originals
    return calls


def _sync_case_bfloat16(rank):
    """bfloat16 input: statistics in float32, output in bfloat16, close to float32 BN."""
    x, grad = _case_data((4, 4), (2, 2), seed=30, dtype=torch.float32)
    part = _rank_slice((4, 4), rank)
    layer = SyncBatchNorm(3)
    mine = x[part].to(torch.bfloat16).requires_grad_()
    y = layer(mine)
    y.backward(grad[part].to(torch.bfloat16))
    return {"y": y.detach(), "dx": mine.grad, "running_var": layer.running_var}


def _two_rank_worker(rank, world_size):
    out = {}
    # 2-D and 4-D float64, equal and unequal batch sizes, two steps each
    out["2d"] = _sync_case(rank, (4, 4), (), seed=0)
    out["4d"] = _sync_case(rank, (2, 3), (3, 2), seed=1)
    out["momentum_none"] = _sync_case(rank, (5, 2), (), seed=2, momentum=None)
    out["3d"] = _sync_case(rank, (2, 2), (4,), seed=3)
    out["collectives"] = _count_collectives(rank)
    out["bfloat16"] = _sync_case_bfloat16(rank)
    # eval mode: rank 0 alone (no collective may happen)
    out["eval_gap"] = _eval_without_communication() if rank == 0 else None
    dist.barrier()
    # one value per channel over both ranks: ValueError on every rank, no hang
    layer = SyncBatchNorm(3)
    try:
        layer(torch.randn(1 if rank == 0 else 0, 3))
        out["count_one"] = "no error"
    except ValueError as error:
        out["count_one"] = str(error)
    # convert a CNN holding torch's and our BN, then one DDP step on this rank's half batch
    model = SyncBatchNorm.convert_sync_batchnorm(_cnn_model())
    out["sync_layers"] = sorted(
        name for name, m in model.named_modules() if isinstance(m, SyncBatchNorm)
    )
    ddp = nn.parallel.DistributedDataParallel(model)
    x, labels = _cnn_data()
    part = slice(4 * rank, 4 * rank + 4)
    _sgd_step(ddp, x[part], labels[part])
    out["ddp_state"] = {k: v.clone() for k, v in model.state_dict().items()}
    # a collective that cannot complete: rank 1 never calls the layer
    if rank == 0:
        layer = SyncBatchNorm(2)
        layer.layer_name = "blocks.3.norm"
        layer.collective_timeout = 2.0
        try:
            layer(torch.randn(4, 2))
            out["timeout"] = "no error"
        except RuntimeError as error:
            out["timeout"] = str(error)
    else:
        time.sleep(3.0)
    return out


def _three_rank_worker(rank, world_size):
    out = {}
    out["2d"] = _sync_case(rank, (3, 5, 1), (), seed=10)
    out["4d"] = _sync_case(rank, (2, 2, 3), (2, 2), seed=11)
    out["empty_2d"] = _sync_case(rank, (4, 0, 3), (), seed=12)
    out["empty_4d"] = _sync_case(rank, (0, 2, 1), (2, 3), seed=13)
    # subgroups: {0, 1} synchronise; {2} alone is plain batch norm
    groups = [dist.new_group([0, 1]), dist.new_group([2])]
    group = groups[0] if rank < 2 else groups[1]
    out["subgroup"] = _sync_case(rank, (3, 4, 5), (), seed=14, group=group)
    # misuse: a layer whose group does not hold this rank
    if rank == 2:
        try:
            SyncBatchNorm(3, process_group=groups[0])(torch.randn(4, 3))
            out["not_member"] = "no error"
        except RuntimeError as error:
            out["not_member"] = str(error)
    dist.barrier()
    return out


def _nccl_worker(rank, world_size):
    torch.cuda.set_device(rank)
    sizes, tail, seed = (3, 5), (2, 2), 20
    x, grad = _case_data(sizes, tail, seed)
    part = _rank_slice(sizes, rank)
    layer = SyncBatchNorm(3).double().cuda()
    result = _run_layer(layer, x[part].cuda(), grad[part].cuda())
    return {k: v.cpu() if torch.is_tensor(v) else v for k, v in result.items()}


# ---------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------


def _assert_matches_reference(results, sizes, tail, seed, momentum=0.1, ranks=None):
    """Each rank's output and input gradient are its slice of single-process BN's; the summed
    parameter gradients are single-process BN's; running statistics are equal on all ranks.
    ``ranks``: the ranks (a leading part of ``sizes``) whose batches BN runs over."""
    ranks = list(range(len(sizes))) if ranks is None else ranks
    rows = slice(0, sum(sizes[rank] for rank in ranks))
    reference = _reference_case(sizes, tail, seed, momentum=momentum, rows=rows)
    for rank in ranks:
        part = _rank_slice(sizes, rank)
        got = results[rank]
        torch.testing.assert_close(got["y"], reference["y"][part], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got["dx"], reference["dx"][part], rtol=1e-9, atol=1e-10)
        for key in ("running_mean", "running_var"):
            torch.testing.assert_close(got[key], reference[key], rtol=1e-12, atol=1e-12)
        assert got["tracked"] == reference["tracked"] == 2
    for key in ("dw", "db"):
        summed = sum(results[rank][key] for rank in ranks)
        torch.testing.assert_close(summed, reference[key], rtol=1e-9, atol=1e-10)


@pytest.fixture(scope="module")
def two_ranks():
    return launch(_two_rank_worker, 2, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def three_ranks():
    return launch(_three_rank_worker, 3, timeout=TIMEOUT)


@pytest.mark.parametrize(
    "case, sizes, tail, seed, momentum",
    [
        ("2d", (4, 4), (), 0, 0.1),
        ("4d", (2, 3), (3, 2), 1, 0.1),
        ("momentum_none", (5, 2), (), 2, None),
        ("3d", (2, 2), (4,), 3, 0.1),
    ],
)
def test_two_ranks_equal_batch_norm_on_the_global_batch(
    two_ranks, case, sizes, tail, seed, momentum
):
    results = [rank_out[case] for rank_out in two_ranks]
    _assert_matches_reference(results, sizes, tail, seed, momentum=momentum)


@pytest.mark.parametrize(
    "case, sizes, tail, seed",
    [
        ("2d", (3, 5, 1), (), 10),
        ("4d", (2, 2, 3), (2, 2), 11),
        ("empty_2d", (4, 0, 3), (), 12),
        ("empty_4d", (0, 2, 1), (2, 3), 13),
    ],
)
def test_three_ranks_unequal_and_empty_batches(three_ranks, case, sizes, tail, seed):
    results = [rank_out[case] for rank_out in three_ranks]
    _assert_matches_reference(results, sizes, tail, seed)
    empty = [r for r, n in enumerate(sizes) if n == 0]
    for rank in empty:  # the empty rank holds no data but the same statistics
        assert results[rank]["y"].shape[0] == 0
        assert torch.count_nonzero(results[rank]["dw"]) == 0


def test_subgroup_synchronises_only_within_itself(three_ranks):
    results = [rank_out["subgroup"] for rank_out in three_ranks]
    sizes = (3, 4, 5)
    x, grad = _case_data(sizes, (), 14)
    # ranks 0 and 1: BN over their two batches (the first 7 examples)
    _assert_matches_reference(results, sizes, (), 14, ranks=[0, 1])
    # rank 2: BN over its own batch only
    part = _rank_slice(sizes, 2)
    local = nn.BatchNorm1d(3).double()
    with torch.no_grad():
        local.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
        local.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    expected = _run_layer(local, x[part], grad[part])
    torch.testing.assert_close(results[2]["y"], expected["y"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(results[2]["running_var"], expected["running_var"])
    assert not torch.allclose(results[2]["running_mean"], results[0]["running_mean"])


def test_a_rank_outside_the_layers_group_gets_a_clear_error(three_ranks):
    assert "not a member of the layer's process_group" in three_ranks[2]["not_member"]


def test_one_collective_forward_and_one_backward(two_ranks):
    for rank_out in two_ranks:
        assert rank_out["collectives"] == [("all_gather", 2 * 5 + 1), ("all_reduce", 2 * 5)]


def test_bfloat16_input_keeps_its_dtype_and_float32_statistics(two_ranks):
    x, grad = _case_data((4, 4), (2, 2), seed=30, dtype=torch.float32)
    x = x.to(torch.bfloat16).float().requires_grad_()  # the values the ranks saw
    reference = nn.BatchNorm2d(3)
    y = reference(x)
    y.backward(grad.to(torch.bfloat16).float())
    for rank, rank_out in enumerate(two_ranks):
        got = rank_out["bfloat16"]
        part = _rank_slice((4, 4), rank)
        assert got["y"].dtype == got["dx"].dtype == torch.bfloat16
        assert got["running_var"].dtype == torch.float32
        torch.testing.assert_close(got["y"].float(), y.detach()[part], rtol=0.02, atol=0.02)
        torch.testing.assert_close(got["dx"].float(), x.grad[part], rtol=0.05, atol=0.02)
        torch.testing.assert_close(got["running_var"], reference.running_var, rtol=1e-4, atol=1e-5)


def test_eval_mode_does_not_communicate(two_ranks):
    assert two_ranks[0]["eval_gap"] < 1e-12


def test_one_value_per_channel_over_the_group_raises_on_every_rank(two_ranks):
    for rank_out in two_ranks:
        assert "Expected more than 1 value per channel" in rank_out["count_one"]


def test_collective_that_cannot_complete_names_the_layer(two_ranks):
    message = two_ranks[0]["timeout"]
    assert "'blocks.3.norm'" in message and "did not complete" in message


def test_convert_and_ddp_step_equal_single_process_training(two_ranks):
    assert two_ranks[0]["sync_layers"] == ["features.1", "features.4", "head.2"]
    model = _cnn_model()
    x, labels = _cnn_data()
    expected = _sgd_step(model, x, labels)
    for rank_out in two_ranks:
        got = rank_out["ddp_state"]
        assert set(got) == set(expected)
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-9, atol=1e-11, msg=key)


@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.device_count() >= 2 and dist.is_nccl_available()),
    reason="needs two CUDA GPUs and the NCCL backend",
)
def test_nccl_two_gpus_equal_batch_norm_on_the_global_batch():
    results = launch(_nccl_worker, 2, backend="nccl", timeout=TIMEOUT)
    _assert_matches_reference(results, (3, 5), (2, 2), 20)


# ---------------------------------------------------------------------------------------------
# One process: no process group
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 5), (4, 3, 2, 3), (2, 3, 2, 2, 2)])
def test_without_process_group_it_is_batch_norm(shape):
    assert not dist.is_initialized()
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    reference = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[
        len(shape)
    ](3).double()
    layer = SyncBatchNorm(3).double()
    for module in (reference, layer):
        with torch.no_grad():
            module.weight.copy_(torch.tensor([2.0, 0.5, -1.0]))
    for train in (True, False):
        reference.train(train)
        layer.train(train)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = reference(xa), layer(xb)
        ya.square().sum().backward()
        yb.square().sum().backward()
        torch.testing.assert_close(yb, ya)
        torch.testing.assert_close(xb.grad, xa.grad)
    assert set(layer.state_dict()) == set(nn.SyncBatchNorm(3).state_dict())
    torch.testing.assert_close(layer.running_var, reference.running_var)
    assert int(layer.num_batches_tracked) == 1


def test_bad_input_gets_torch_exception_types():
    layer = SyncBatchNorm(3)
    with pytest.raises(ValueError, match="expected at least 2D input"):
        layer(torch.randn(3))
    with pytest.raises(RuntimeError, match="expected 3 channels"):
        layer(torch.randn(4, 2))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer(torch.randn(1, 3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer([[1.0, 2.0, 3.0]])
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="num_features"):
        SyncBatchNorm(0)
    with pytest.raises(ValueError, match="eps"):
        SyncBatchNorm(3, eps=0.0)


def test_convert_keeps_parameters_buffers_and_flags_and_reverts():
    model = _cnn_model()
    model.features[1].weight.requires_grad_(False)
    model.eval()
    before = {name: p for name, p in model.named_parameters()}
    buffers = {name: b for name, b in model.named_buffers()}
    converted = SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted is model
    for name, parameter in converted.named_parameters():
        assert parameter is before[name], name
    for name, buffer in converted.named_buffers():
        assert buffer is buffers[name], name
    assert not converted.features[1].weight.requires_grad
    assert not converted.features[1].training
    assert converted.features[4].layer_name == "features.4"
    x, _ = _cnn_data()
    reference = _cnn_model()
    reference.features[1].weight.requires_grad_(False)
    reference.eval()
    torch.testing.assert_close(converted(x), reference(x))
    reverted = SyncBatchNorm.revert_sync_batchnorm(converted)
    assert type(reverted.features[1]) is nn.BatchNorm2d
    assert type(reverted.features[4]) is torch_bn.BatchNorm2d
    assert type(reverted.head[2]) is nn.BatchNorm1d
    assert reverted.features[1].weight is before["features.1.weight"]
    # the root itself may be a BN layer
    root = SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm1d(5))
    assert isinstance(root, SyncBatchNorm)
    with pytest.raises(ValueError, match="batch_norm_class"):
        SyncBatchNorm.revert_sync_batchnorm(SyncBatchNorm(2))
    assert isinstance(
        SyncBatchNorm.revert_sync_batchnorm(SyncBatchNorm(2), nn.BatchNorm1d), nn.BatchNorm1d
    )


def test_replace_batch_norms_visits_every_layer():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.BatchNorm1d(2), nn.ReLU()))
    names = []

    def build(layer, name):
        names.append(name)
        return nn.Identity() if isinstance(layer, nn.ReLU) else None

    replace_batch_norms(model, build)
    assert names == ["", "0", "1", "1.0", "1.1"]
    assert isinstance(model[1][1], nn.Identity)


def test_collective_numbers_and_free_port():
    numbers = collective_numbers(16, 2)
    assert numbers["forward_sent"] == numbers["minimum_forward"] == 33
    assert numbers["backward"] == numbers["minimum_backward"] == 32
    assert numbers["forward_received"] == 33
    assert 0 < find_free_port() < 65536


def _fails(rank, world_size):
    if rank == 1:
        raise KeyError("rank one broke")
    return rank


def test_launch_reports_a_failing_rank_quickly():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank one broke"):
        launch(_fails, 2, timeout=TIMEOUT)
    assert time.monotonic() - start < TIMEOUT
