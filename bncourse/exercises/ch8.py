"""Checks for the coding exercises of chapter 8 (small batches and many devices).

* :func:`check_merge_statistics` (ex-8-1): merging per-device counts, means and centred sums of
  squares into the global ones (Chan et al.'s parallel formula).
* :func:`check_sync_backward` (ex-8-2): the input gradient of synchronised batch norm on each
  device from the all-reduced sums of ``dy`` and ``dy * x_hat``.
"""

from __future__ import annotations

import numpy as np
import torch

from bncourse.exercises._common import assert_close, exercise_check

__all__ = ["check_merge_statistics", "check_sync_backward"]


def _device_batches(rng: np.random.Generator, sizes, channels: int, offset: float):
    return [rng.normal(offset, 2.0, (n, channels)) for n in sizes]


@exercise_check("ex-8-1")
def check_merge_statistics(merge_statistics):
    """``merge_statistics(counts, means, m2s) -> (count, mean, m2)`` with ``counts`` (K,),
    ``means`` and ``m2s`` (K, C): the global count, mean (C,) and centred sum of squares (C,)."""
    rng = np.random.default_rng(8)
    cases = [((4, 4), 0.0), ((3, 5, 1), 1.0), ((6, 0, 2), -3.0), ((2, 7), 1e8), ((5,), 2.0)]
    for sizes, offset in cases:
        batches = _device_batches(rng, sizes, 3, offset)
        counts = np.array(sizes, dtype=np.float64)
        means = np.stack([b.mean(0) if len(b) else np.zeros(3) for b in batches])
        m2s = np.stack([((b - b.mean(0)) ** 2).sum(0) if len(b) else np.zeros(3) for b in batches])
        everything = np.concatenate(batches)
        result = merge_statistics(counts, means, m2s)
        assert result is not None, "merge_statistics returned None; return (count, mean, m2)"
        count, mean, m2 = result
        what = f"for device batch sizes {sizes} and values around {offset:g}"
        assert_close(count, len(everything), f"the count {what}")
        assert_close(mean, everything.mean(0), f"the mean {what}", rtol=1e-12, atol=1e-9)
        expected_m2 = ((everything - everything.mean(0)) ** 2).sum(0)
        assert_close(m2, expected_m2, f"the centred sum of squares {what}", rtol=1e-7, atol=1e-9)


@exercise_check("ex-8-2")
def check_sync_backward(sync_backward):
    """``sync_backward(dy, x_hat, invstd, gamma, sum_dy, sum_dy_xhat, count) -> dx`` for one
    device's (n, C) batch, given the sums over all devices; compared with autograd of
    ``torch.nn.functional.batch_norm`` on the global batch."""
    rng = np.random.default_rng(80)
    for sizes in ((4, 4), (3, 5, 1), (2, 0, 6)):
        x = torch.from_numpy(rng.normal(1.0, 3.0, (sum(sizes), 4))).requires_grad_()
        gamma = torch.from_numpy(rng.normal(1.0, 0.5, 4))
        dy = torch.from_numpy(rng.normal(size=x.shape))
        y = torch.nn.functional.batch_norm(x, None, None, gamma, None, training=True, eps=1e-5)
        (expected,) = torch.autograd.grad((y * dy).sum(), x)
        with torch.no_grad():
            var, mean = torch.var_mean(x, 0, correction=0)
            invstd = 1.0 / torch.sqrt(var + 1e-5)
            x_hat = (x - mean) * invstd
        sum_dy, sum_dy_xhat = dy.sum(0), (dy * x_hat).sum(0)
        start = 0
        for device, n in enumerate(sizes):
            part = slice(start, start + n)
            start += n
            args = (dy[part].numpy(), x_hat[part].numpy(), invstd.numpy(), gamma.numpy())
            dx = sync_backward(*args, sum_dy.numpy(), sum_dy_xhat.numpy(), float(len(x)))
            assert dx is not None, "sync_backward returned None; return the input gradient"
            assert_close(
                dx,
                expected[part],
                f"the input gradient of device {device} (batch sizes {sizes})",
                rtol=1e-8,
                atol=1e-10,
            )
