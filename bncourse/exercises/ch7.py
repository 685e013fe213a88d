"""Checks for the coding exercises of chapter 7 (the normalization family).

* :func:`check_group_norm` (ex-7-2): GroupNorm written with the general function
  :func:`bncourse.numpy_norm.normalize_forward`.
* :func:`check_running_statistics` (ex-7-3): which layers keep running statistics, decided by
  code.
* :func:`check_rms_norm_backward` (ex-7-4): RMSNorm's input gradient derived by hand.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bncourse import torch_bn, torch_norm
from bncourse.exercises._common import assert_close, exercise_check

__all__ = ["check_group_norm", "check_running_statistics", "check_rms_norm_backward"]


@exercise_check("ex-7-2")
def check_group_norm(group_norm):
    """``group_norm(x, num_groups, gamma, beta, eps)`` matches ``F.group_norm``."""
    rng = np.random.default_rng(7)
    cases = [((4, 6, 5), 3), ((2, 8, 3, 3), 2), ((3, 4, 2, 2), 4), ((3, 4, 2, 2), 1), ((2, 6), 2)]
    for shape, groups in cases:
        x = rng.normal(1.0, 3.0, shape)
        gamma, beta = rng.normal(1.0, 0.5, shape[1]), rng.normal(0.0, 1.0, shape[1])
        expected = F.group_norm(
            torch.tensor(x), groups, torch.tensor(gamma), torch.tensor(beta), eps=1e-5
        )
        actual = group_norm(x, groups, gamma, beta, 1e-5)
        assert actual is not None, "group_norm returned None; return the output array"
        what = f"group_norm on input of shape {shape} with {groups} groups"
        assert_close(np.asarray(actual), expected.numpy(), what, rtol=1e-6, atol=1e-8)


def _layers() -> list[tuple[str, nn.Module, bool]]:
    """(description, layer, keeps running statistics)."""
    return [
        ("BatchNorm1d(4)", torch_bn.BatchNorm1d(4), True),
        (
            "nn.BatchNorm1d(4, track_running_stats=False)",
            nn.BatchNorm1d(4, track_running_stats=False),
            False,
        ),
        ("LayerNorm(6)", torch_norm.LayerNorm(6), False),
        ("GroupNorm(2, 4)", torch_norm.GroupNorm(2, 4), False),
        ("InstanceNorm1d(4)", torch_norm.InstanceNorm1d(4), False),
        (
            "nn.InstanceNorm1d(4, track_running_stats=True)",
            nn.InstanceNorm1d(4, track_running_stats=True),
            True,
        ),
        ("RMSNorm(6)", torch_norm.RMSNorm(6), False),
        ("nn.BatchNorm2d(4)", nn.BatchNorm2d(4), True),
        ("nn.GroupNorm(1, 4)", nn.GroupNorm(1, 4), False),
    ]


@exercise_check("ex-7-3")
def check_running_statistics(keeps_running_statistics):
    """``keeps_running_statistics(layer)`` says which layers keep running statistics."""
    for description, layer, expected in _layers():
        answer = keeps_running_statistics(layer)
        assert answer is not None, "keeps_running_statistics returned None; return True or False"
        assert bool(answer) == expected, (
            f"{description}: you said {bool(answer)}, but it "
            f"{'does' if expected else 'does not'} keep running statistics"
        )


@exercise_check("ex-7-4")
def check_rms_norm_backward(rms_norm_backward):
    """``rms_norm_backward(dy, x, gamma, eps)`` gives RMSNorm's input gradient (last axis)."""
    rng = np.random.default_rng(11)
    for shape, eps in [((5, 8), 1e-6), ((2, 3, 16), 1e-3), ((1, 4), 0.5)]:
        x = rng.normal(0.5, 2.0, shape)
        gamma = rng.normal(1.0, 0.5, shape[-1])
        dy = rng.normal(size=shape)
        xt = torch.tensor(x, requires_grad=True)
        F.rms_norm(xt, (shape[-1],), torch.tensor(gamma), eps=eps).backward(torch.tensor(dy))
        actual = rms_norm_backward(dy, x, gamma, eps)
        assert actual is not None, "rms_norm_backward returned None; return dx"
        what = f"dx for input of shape {shape} with eps={eps}"
        assert_close(np.asarray(actual), xt.grad.numpy(), what, rtol=1e-6, atol=1e-9)
