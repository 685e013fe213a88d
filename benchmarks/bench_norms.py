"""Speed of the normalization family in bncourse.torch_norm against PyTorch's native layers.

Times forward + backward (a full-size upstream gradient) of GroupNorm and InstanceNorm2d on
(32, 64, 32, 32) and of LayerNorm and RMSNorm on (32, 128, 768), for:

* ``bncourse``: the package's modules in eager mode (one autograd Function with the
  hand-derived backward; by default the fast kernels of :mod:`bncourse.fast.torch_norm`, on a
  CPU one fused C loop per row, ``--no-native`` for their PyTorch operations on chunks of rows
  instead; ``--kernels reference`` times the reference kernels);
* ``bncourse compiled``: the same modules through ``torch.compile`` (Inductor fuses the
  operations of the forward and of the hand-derived backward);
* ``torch``: ``torch.nn``'s modules in eager mode (fused native kernels), and
  ``torch compiled`` for reference.

The calls are interleaved (one of each variant per round) and the median per variant is
reported, in CPU time (``time.process_time``) so that other processes on a shared machine
count less (``--clock wall`` for wall time: with several threads CPU time also counts the time
threads spend waiting for each other); on CUDA, wall time after synchronisation. The
targets: ``bncourse`` at most 1.5x native eager, ``bncourse compiled`` at most 1.0x native eager.
The script runs with glibc's allocator pinned (:mod:`pinned_allocator`: no page
faults decide the result); ``--unpinned-allocator`` times the default behaviour instead.

Usage::

    python benchmarks/bench_norms.py [--repeats 15] [--threads 1] [--no-compile] [--device cpu]
        [--clock cpu|wall] [--kernels fast|reference] [--no-native] [--unpinned-allocator]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from pinned_allocator import pinned_allocator  # (this script's folder)
from torch import nn

from bncourse import torch_norm
from bncourse.fast import native

CASES = {
    "GroupNorm(32, 64)": (
        lambda: torch_norm.GroupNorm(32, 64),
        lambda: nn.GroupNorm(32, 64),
        (32, 64, 32, 32),
    ),
    "InstanceNorm2d(64, affine)": (
        lambda: torch_norm.InstanceNorm2d(64, affine=True),
        lambda: nn.InstanceNorm2d(64, affine=True),
        (32, 64, 32, 32),
    ),
    "LayerNorm(768)": (
        lambda: torch_norm.LayerNorm(768),
        lambda: nn.LayerNorm(768),
        (32, 128, 768),
    ),
    "RMSNorm(768)": (
        lambda: torch_norm.RMSNorm(768),
        lambda: nn.RMSNorm(768),
        (32, 128, 768),
    ),
}


def _timer(device: torch.device, clock: str = "cpu"):
    if device.type == "cuda":

        def now() -> float:
            torch.cuda.synchronize()
            return time.perf_counter()

        return now
    return time.process_time if clock == "cpu" else time.perf_counter


def bench_case(
    name: str, device: torch.device, repeats: int, compile_: bool, clock: str = "cpu"
) -> dict[str, float]:
    """Median forward + backward time (ms) of each variant of one case."""
    ours_factory, theirs_factory, shape = CASES[name]
    x = torch.randn(shape, device=device, requires_grad=True)
    dy = torch.randn(shape, device=device)
    variants = {"bncourse": ours_factory().to(device), "torch": theirs_factory().to(device)}
    if compile_:
        # each case compiles from a fresh start, as one user's program would: otherwise the
        # earlier cases' shapes make torch.compile recompile with dynamic shapes (slower code)
        torch._dynamo.reset()
        variants["bncourse compiled"] = torch.compile(ours_factory().to(device))
        variants["torch compiled"] = torch.compile(theirs_factory().to(device))
    now = _timer(device, clock)
    times: dict[str, list[float]] = {key: [] for key in variants}
    for round_ in range(repeats + 3):  # three warm-up rounds (compilation included)
        for key, module in variants.items():
            x.grad = None
            start = now()
            module(x).backward(dy)
            elapsed = now() - start
            if round_ >= 3:
                times[key].append(elapsed)
    return {key: 1e3 * statistics.median(t) for key, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--kernels", choices=list(torch_norm.KERNELS), default="fast")
    parser.add_argument("--no-native", action="store_true", help="no C kernels")
    args = parser.parse_args()
    torch_norm.use_kernels(args.kernels)
    native.use_native(not args.no_native)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.threads)
    implementation = "C" if native.library() is not None else "PyTorch operations"
    print(
        f"torch {torch.__version__}, {device}, {args.threads} thread(s), {args.kernels} kernels "
        f"({implementation} where fast), "
        f"median of {args.repeats} interleaved rounds, forward + backward, ms of {args.clock} time"
    )
    header = "| case | bncourse | torch | ratio | bncourse compiled | ratio | torch compiled |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name in args.cases:
        t = bench_case(name, device, args.repeats, not args.no_compile, args.clock)
        ours, theirs = t["bncourse"], t["torch"]
        compiled = t.get("bncourse compiled", float("nan"))
        theirs_compiled = t.get("torch compiled", float("nan"))
        print(
            f"| {name} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f}x | {compiled:.2f} | "
            f"{compiled / theirs:.2f}x | {theirs_compiled:.2f} |"
        )


if __name__ == "__main__":
    with pinned_allocator(sys.argv):
        main()
