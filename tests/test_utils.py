"""Tests of bncourse.utils: thread control, accuracy, finite differences, timing."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from bncourse.utils import (
    accuracy,
    finite_difference_gradient,
    interleaved_times,
    memory_policy,
    torch_threads,
)


def test_torch_threads_sets_and_restores_even_on_error():
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with torch_threads(target):
        assert torch.get_num_threads() == target
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="inside"):
        with torch_threads(target):
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before


def test_torch_threads_leaves_the_setting_for_none_and_other_devices():
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with torch_threads(None):
        assert torch.get_num_threads() == before
    with torch_threads(target, device="cuda"):
        assert torch.get_num_threads() == before
    with torch_threads(target, device="cpu"):
        assert torch.get_num_threads() == target
    with pytest.raises(ValueError, match="threads must be a positive int"):
        with torch_threads(0):
            pass


def test_accuracy_counts_correct_rows():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [4.0, 0.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 2, 0])) == 1.0
    assert accuracy(logits, torch.tensor([0, 1, 0, 1])) == 0.5
    assert accuracy(logits[:3], torch.tensor([1, 0, 0])) == 0.0
    with pytest.raises(ValueError, match="labels"):
        accuracy(logits, torch.tensor([0, 1]))


def test_finite_difference_gradient_of_known_functions():
    x = np.array([[0.5, -1.0], [2.0, 3.0]])
    grad = finite_difference_gradient(lambda v: float(np.sum(v**3)), x, h=1e-5)
    np.testing.assert_allclose(grad, 3 * x**2, rtol=1e-8)
    weights = np.array([[1.0, -2.0], [0.5, 4.0]])
    grad = finite_difference_gradient(lambda v: float(np.sum(weights * np.sin(v))), x)
    np.testing.assert_allclose(grad, weights * np.cos(x), rtol=1e-7, atol=1e-9)
    np.testing.assert_array_equal(x, [[0.5, -1.0], [2.0, 3.0]])  # not modified


def test_interleaved_times_alternates_and_measures():
    calls = []
    spin = lambda: sum(range(20000))  # noqa: E731
    times = interleaved_times(
        {"a": lambda: calls.append("a"), "b": lambda: (calls.append("b"), spin())},
        repeats=3, number=2, warmup=1,
    )  # fmt: skip
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3
    assert times["a"].shape == times["b"].shape == (3,)
    assert np.median(times["b"]) > np.median(times["a"])
    wall = interleaved_times({"spin": spin}, repeats=2, clock="wall")
    assert np.all(wall["spin"] > 0)
    with pytest.raises(ValueError, match="clock"):
        interleaved_times({"spin": spin}, clock="gpu")


_PAGE_FAULTS = """
import resource, sys
import numpy as np
from bncourse.utils import memory_policy


def faults(count=20):
    np.ones(1 << 21, dtype=np.float32)  # once, so that "keep" has the block
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(count):
        np.ones(1 << 21, dtype=np.float32)  # a new 8 MiB array, filled
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


with memory_policy("keep") as pinned:
    kept = faults()
with memory_policy("return"):
    returned = faults()
print(pinned, kept, returned)
"""


def test_memory_policy_decides_the_page_faults_of_new_arrays():
    # in a new process: free memory this one holds from earlier tests could serve the arrays
    result = subprocess.run(
        [sys.executable, "-c", _PAGE_FAULTS], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    pinned, kept, returned = result.stdout.split()
    if pinned != "True":
        pytest.skip("the C library is not glibc")
    # new memory each time: at least four faults an array (2 MiB huge pages; 2048 pages of
    # 4 KiB without them), none once the memory is kept
    assert int(returned) >= 4 * 20
    assert int(kept) < 20
    with pytest.raises(ValueError, match="policy"):
        with memory_policy("free"):
            pass
