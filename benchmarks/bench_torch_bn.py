"""Speed of ``bncourse.torch_bn`` batch norm against ``torch.nn``, forward + backward, training.

Contenders, run in the same process on the same input, interleaved (one repetition of each in
turn, so that slow drifts of a shared machine hit all alike):

* ``fast``: :class:`bncourse.torch_bn.BatchNorm2d` (or 1d/3d) as it comes, the kernels of
  :mod:`bncourse.fast.torch_bn`;
* ``reference``: the same module with ``kernels="reference"`` (the code that reads like the book);
* ``compiled``: ``kernels="compiled"``, the reference formulas fused by ``torch.compile`` (the
  first call compiles; its time is printed apart; ``--no-compiled`` leaves it out);
* ``native``: ``torch.nn.BatchNorm2d`` (or 1d/3d).

Each repetition times ``y = bn(x); y.backward(dy)``. The script prints, per shape, the median
wall-clock time of each contender, the ratios of the medians to native, the median CPU time of
the process (all threads; on a busy machine this leaves out the time spent waiting for a core)
and the achieved memory bandwidth under a minimum-traffic model, as a fraction of the copy
bandwidth measured in the same process (``y.copy_(x)`` on a 256 MiB tensor, one read and one
write per byte). With ``B`` bytes per tensor of the input's size, an ideal batch norm moves
``5 B``: forward reads ``x`` and writes ``y``; backward reads ``x`` and ``dy`` and writes ``dx``.

Page faults. Each step makes new full-size tensors (``y``, ``dx``), and whether they cost a page
fault per 4 KiB page depends on every allocation in the process; the script therefore runs
with glibc's allocator pinned (:mod:`pinned_allocator`), so that every contender reuses
its memory. ``--unpinned-allocator`` times the default behaviour instead.

Examples
--------
``python benchmarks/bench_torch_bn.py``                       CPU, 2 threads, the four shapes
``python benchmarks/bench_torch_bn.py --threads 1 --shape 32 64 32 32``
``python benchmarks/bench_torch_bn.py --device cuda --repeats 200``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pinned_allocator import pinned_allocator  # noqa: E402  (this script's folder)

from bncourse import torch_bn  # noqa: E402

SHAPES = [(32, 64, 32, 32), (2, 64, 8, 8), (256, 512), (8, 256, 56, 56)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", action="append", help="N C [spatial]")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=40, help="timed repetitions (>= 10)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed repetitions first")
    parser.add_argument("--no-compiled", action="store_true", help="leave out compiled kernels")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, mebibytes: int = 256) -> float:
    """Bytes per second of ``y.copy_(x)`` (one read and one write), median of 15."""
    x = torch.empty(mebibytes << 18, device=device)  # float32
    y = torch.empty_like(x)
    times = []
    for _ in range(18):
        synchronize(device)
        begin = time.perf_counter()
        y.copy_(x)
        synchronize(device)
        times.append(time.perf_counter() - begin)
    return 2 * x.numel() * x.element_size() / statistics.median(times[3:])


def step(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one ``module(x).backward(dy)``."""
    x.grad = None
    for parameter in module.parameters():
        parameter.grad = None
    synchronize(x.device)
    wall, cpu = time.perf_counter(), time.process_time()
    module(x).backward(dy)
    synchronize(x.device)
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_shape(shape, args, device, dtype, bandwidth) -> dict[str, float]:
    """Print one shape's table; return the median wall-clock seconds of each contender."""
    rank = max(1, len(shape) - 2)
    ours_cls = getattr(torch_bn, f"BatchNorm{rank}d")
    native_cls = getattr(torch.nn, f"BatchNorm{rank}d")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.randn(shape, generator=gen, device=device).to(dtype).requires_grad_(True)
    dy = torch.randn(shape, generator=gen, device=device).to(dtype)
    channels = shape[1]
    contenders = {
        "fast": ours_cls(channels, device=device),
        "reference": ours_cls(channels, device=device, kernels="reference"),
    }
    if not args.no_compiled:
        contenders["compiled"] = ours_cls(channels, device=device, kernels="compiled")
        begin = time.perf_counter()
        step(contenders["compiled"], x, dy)
        print(f"  compiling the kernels for {shape}: {time.perf_counter() - begin:.1f} s")
    contenders["native"] = native_cls(channels, device=device)
    for _ in range(args.warmup):
        for module in contenders.values():
            step(module, x, dy)
    wall: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, module in contenders.items():
            seconds, cpu_seconds = step(module, x, dy)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)

    medians = {name: statistics.median(values) for name, values in wall.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu.items()}
    moved = 5 * x.numel() * x.element_size()
    print(f"input {tuple(shape)} {args.dtype}: {moved / 1e6:.1f} MB minimum traffic per step")
    print(
        f"  {'':10s} {'median ms':>10s} {'/ native':>9s} {'CPU ms':>9s} {'CPU / nat':>9s} "
        f"{'GB/s':>7s} {'of copy':>8s}"
    )
    for name in contenders:
        gbps = moved / medians[name] / 1e9
        print(
            f"  {name:10s} {medians[name] * 1e3:10.3f} {medians[name] / medians['native']:9.2f} "
            f"{cpu_medians[name] * 1e3:9.3f} {cpu_medians[name] / cpu_medians['native']:9.2f} "
            f"{gbps:7.1f} {gbps / bandwidth:8.1%}"
        )
    return medians


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.repeats < 10:
        raise SystemExit("--repeats must be at least 10")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    bandwidth = copy_bandwidth(device) / 1e9
    load = os.getloadavg()
    where = str(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"bncourse.torch_bn vs torch.nn batch norm, forward + backward, training; {where}; "
        f"torch {torch.__version__}; median of {args.repeats} interleaved repetitions after "
        f"{args.warmup} warm-up; measured copy bandwidth {bandwidth:.1f} GB/s; load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs"
    )
    for shape in args.shape or SHAPES:
        bench_shape(tuple(shape), args, device, dtype, bandwidth)


if __name__ == "__main__":
    with pinned_allocator(sys.argv):
        main()
