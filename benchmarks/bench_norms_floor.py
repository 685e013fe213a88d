"""How fast can a normalisation layer built from PyTorch operations be? A floor, against native.

``bench_norms.py`` times the package's layers. This script times the *fewest* full-size
PyTorch operations that a forward + backward of LayerNorm (32, 128, 768) and of GroupNorm(32,
64) on (32, 64, 32, 32) can be written with, as far as we found, against ``torch.nn``'s fused
kernels: no checks, no small per-row operations, no autograd, no memory for the results of
the reductions, random coefficients instead of the statistics. Any eager implementation made
of PyTorch operations does at least this work, so the ratio printed is a lower bound for it
(on the machine at hand). The operations:

* LayerNorm, rows of D = 768 with a scale and shift per column. Forward: the row sums and
  row norms (two reductions), ``y = x * a + c`` with per-row ``a``, ``c`` (one ``addcmul``),
  then ``y * weight + bias`` in place. Backward: the row sums of ``g * weight`` and of
  ``g * x * weight`` (two matrix-vector products and the product ``g * x``), the column sums
  for ``dweight`` (two transposed matrix-vector products) and ``dbias``, then ``dx`` from
  ``x``, ``g * weight`` and per-row coefficients (three passes).
* GroupNorm, statistics per (sample, group), scale per (sample, channel), rows of the 1,024
  positions. Forward: row sums and row norms, then one ``addcmul``. Backward: the row sums of
  ``g`` and of ``g * x`` (the product, then its sums), then ``dx`` in two passes.

Usage::

    python benchmarks/bench_norms_floor.py [--threads 2] [--repeats 40] [--unpinned-allocator]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from pinned_allocator import pinned_allocator  # (this script's folder)
from torch import nn


def median_ms(step: Callable[[], object], repeats: int) -> float:
    for _ in range(5):
        step()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        step()
        times.append(time.perf_counter() - begin)
    return 1e3 * statistics.median(times)


def layer_norm_steps() -> tuple[Callable[[], object], Callable[[], object]]:
    """(floor, native) for LayerNorm(768) on (32, 128, 768)."""
    rows, width = 32 * 128, 768
    x, g = torch.randn(rows, width), torch.randn(rows, width)
    weight, bias = torch.randn(width), torch.randn(width)
    a, c, per_row = torch.randn(rows, 1), torch.randn(rows, 1), torch.randn(rows)

    def floor() -> None:
        x.sum(1), torch.linalg.vector_norm(x, dim=1)
        y = torch.addcmul(c, x, a)
        torch.addcmul(bias, y, weight, out=y)
        product = g * x
        g @ weight, product @ weight  # row sums of g * w and g * x * w
        product.t() @ per_row, g.t() @ per_row, g.sum(0)  # dweight, dbias
        torch.mul(g, weight, out=product)
        dx = torch.addcmul(c, x, a)
        dx.addcmul_(product, a)

    module, xn = nn.LayerNorm(width), x.view(32, 128, width).clone().requires_grad_(True)
    gn = g.view(32, 128, width)

    def native() -> None:
        xn.grad = None
        module(xn).backward(gn)

    return floor, native


def group_norm_steps() -> tuple[Callable[[], object], Callable[[], object]]:
    """(floor, native) for GroupNorm(32, 64) on (32, 64, 32, 32)."""
    n, channels, groups, positions = 32, 64, 32, 32 * 32
    x, g = torch.randn(n * channels, positions), torch.randn(n * channels, positions)
    a, c = torch.randn(n * channels, 1), torch.randn(n * channels, 1)

    def floor() -> None:
        per_group = x.view(n * groups, -1)
        per_group.sum(1), torch.linalg.vector_norm(per_group, dim=1)
        torch.addcmul(c, x, a)
        g.sum(1)
        product = g * x
        product.sum(1)
        dx = torch.addcmul(c, x, a, out=product)
        dx.addcmul_(g, a)

    module = nn.GroupNorm(groups, channels)
    xn = x.view(n, channels, 32, 32).clone().requires_grad_(True)
    gn = g.view(n, channels, 32, 32)

    def native() -> None:
        xn.grad = None
        module(xn).backward(gn)

    return floor, native


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, cpu, {args.threads} thread(s), median ms, forward + backward"
    )
    print("| layer | floor of PyTorch operations | torch.nn | floor / native |")
    print("|---|---|---|---|")
    for name, steps in (
        ("LayerNorm(768)", layer_norm_steps),
        ("GroupNorm(32, 64)", group_norm_steps),
    ):
        floor, native = steps()
        floor_ms, native_ms = median_ms(floor, args.repeats), median_ms(native, args.repeats)
        print(f"| {name} | {floor_ms:.2f} | {native_ms:.2f} | {floor_ms / native_ms:.2f}x |")


if __name__ == "__main__":
    with pinned_allocator(sys.argv):
        main()
