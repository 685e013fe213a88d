"""Speed of ``bncourse.torch_bn.BatchNorm2d`` against ``torch.nn.BatchNorm2d``, forward + backward.

Three contenders run in the same process, in training mode, on the same input, alternating
(ours, compiled, native, ours, ...) so that slow drifts of the machine hit all alike:

* ``ours``: :class:`bncourse.torch_bn.BatchNorm2d` as it comes, plain tensor operations;
* ``compiled``: the same module with ``use_compiled_kernels(True)``, the same formulas fused by
  ``torch.compile`` (the first call compiles; its time is printed apart; ``--no-compiled``
  leaves this contender out);
* ``native``: ``torch.nn.BatchNorm2d``.

Each repetition times ``y = bn(x); y.backward(dy)``; the script prints the median and the spread
of each and the ratios of the medians to native. On the CPU it also times separate interleaved
repetitions in the process's CPU time, which leaves out the time spent waiting for a core on a
busy machine.

On CUDA it times with CUDA events around each repetition (after a synchronisation) and also prints
the achieved memory bandwidth under a minimum-traffic model, as a fraction of the copy bandwidth
measured in the same process (``y.copy_(x)`` on a 256 MiB tensor, one read and one write per
byte; ``--peak-gbps`` replaces the measurement with a given figure). With ``B`` bytes per tensor of
the input's size (``B = N*C*H*W*element_size``), an ideal batch norm moves ``5 B``:

* forward: read ``x`` once (the statistics and the normalisation in one pass over x, with x kept
  on chip) and write ``y``: ``2 B``;
* backward: read ``x`` (or a saved copy) and ``dy`` once (the per-channel sums and ``dx`` in one
  pass) and write ``dx``: ``3 B``.

Per-channel vectors (C values) are left out. Real kernels read more than this (the plain path
makes twelve full-size passes), so the fraction says how far from the memory limit an implementation
is, not how many bytes it moved.

The CPU load average is printed with the results: on a shared machine timings with two threads
suffer most (an operation waits for both threads), and the plain path runs twelve operations to
native's three or four.

Examples
--------
``python benchmarks/bench_torch_bn.py``                      CPU, 2 threads
``python benchmarks/bench_torch_bn.py --threads 1 --channels-last``
``python benchmarks/bench_torch_bn.py --device cuda --repeats 200``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bncourse.torch_bn import BatchNorm2d, use_compiled_kernels  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[32, 64, 32, 32], metavar="NCHW")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory layout")
    parser.add_argument("--repeats", type=int, default=50, help="timed repetitions (>= 30)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed repetitions first")
    parser.add_argument(
        "--peak-gbps",
        type=float,
        default=None,
        help="reference bandwidth in GB/s (CUDA); default: measure a device-to-device copy",
    )
    parser.add_argument(
        "--no-compiled",
        action="store_true",
        help="skip the compiled kernels (use_compiled_kernels; compiling takes seconds to minutes)",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def copy_bandwidth(device: torch.device, mebibytes: int = 256) -> float:
    """Bytes per second of ``y.copy_(x)`` on ``device`` (one read and one write), median of 20."""
    x = torch.empty(mebibytes << 18, device=device)  # float32
    y = torch.empty_like(x)
    times = []
    for _ in range(25):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        y.copy_(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * x.numel() * x.element_size() / statistics.median(times[5:])


@contextlib.contextmanager
def kernels(compiled: bool):
    """bncourse's compiled kernels on or off inside the block, the previous setting after it."""
    previous = use_compiled_kernels(compiled)
    try:
        yield
    finally:
        use_compiled_kernels(previous)


def time_step(
    module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, cuda: bool, compiled: bool = False
) -> float:
    """Seconds for one ``y = module(x); y.backward(dy)``, with bncourse's compiled kernels on
    or off (switched outside the timed region)."""
    x.grad = None
    for parameter in module.parameters():
        parameter.grad = None
    with kernels(compiled):
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            module(x).backward(dy)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        module(x).backward(dy)
        return time.perf_counter() - begin


def cpu_time_step(
    module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, compiled: bool = False
) -> float:
    """CPU seconds (all threads of the process) for one ``y = module(x); y.backward(dy)``."""
    x.grad = None
    for parameter in module.parameters():
        parameter.grad = None
    with kernels(compiled):
        begin = time.process_time()
        module(x).backward(dy)
        return time.process_time() - begin


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.repeats < 30:
        raise SystemExit("--repeats must be at least 30")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    n, c, h, w = args.shape
    x = torch.randn(n, c, h, w, device=device).to(dtype=dtype, memory_format=memory_format)
    x.requires_grad_(True)
    dy = torch.randn(n, c, h, w, device=device).to(dtype=dtype, memory_format=memory_format)
    # name -> (module, compiled kernels on); the two bncourse modules are separate instances
    contenders = {"ours": (BatchNorm2d(c, device=device).train(), False)}
    if not args.no_compiled:
        contenders["compiled"] = (BatchNorm2d(c, device=device).train(), True)
    contenders["native"] = (torch.nn.BatchNorm2d(c, device=device).train(), False)

    if not args.no_compiled:  # the first call compiles: time it on its own
        begin = time.perf_counter()
        time_step(contenders["compiled"][0], x, dy, cuda, compiled=True)
        print(f"compiling the kernels (first call): {time.perf_counter() - begin:.1f} s")
    for _ in range(args.warmup):
        for module, compiled in contenders.values():
            time_step(module, x, dy, cuda, compiled)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    cpu_times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, (module, compiled) in contenders.items():
            times[name].append(time_step(module, x, dy, cuda, compiled))
        if not cuda:
            for name, (module, compiled) in contenders.items():
                cpu_times[name].append(cpu_time_step(module, x, dy, compiled))

    where = f"{device}" + ("" if cuda else f", {torch.get_num_threads()} threads")
    layout = "channels_last" if args.channels_last else "contiguous"
    load = os.getloadavg()
    print(
        f"BatchNorm2d forward+backward, training, input {tuple(x.shape)} {args.dtype} {layout}, "
        f"{where}, torch {torch.__version__}, median of {args.repeats} interleaved repetitions "
        f"after {args.warmup} warm-up; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
        f"on {os.cpu_count()} CPUs"
    )
    medians = {}
    for name, values in times.items():
        medians[name] = statistics.median(values)
        quartiles = statistics.quantiles(values, n=4)
        print(
            f"  {name:8s} median {medians[name] * 1e3:8.3f} ms   "
            f"(quartiles {quartiles[0] * 1e3:.3f} .. {quartiles[2] * 1e3:.3f} ms, "
            f"min {min(values) * 1e3:.3f} ms)"
        )
    for name in contenders:
        if name != "native":
            ratio = medians[name] / medians["native"]
            print(f"  ratio {name} / native = {ratio:.3f} (wall clock)")
    if not cuda:
        cpu = {name: statistics.median(values) for name, values in cpu_times.items()}
        listed = ", ".join(f"{name} {value * 1e3:.3f} ms" for name, value in cpu.items())
        ratios = ", ".join(
            f"{name} / native {cpu[name] / cpu['native']:.3f}" for name in cpu if name != "native"
        )
        print(
            f"  CPU time (all threads) median: {listed}; {ratios} (includes threads spinning at "
            "the end of each parallel region)"
        )

    if cuda:
        tensor_bytes = x.numel() * x.element_size()
        moved = 5 * tensor_bytes  # forward: read x, write y; backward: read x, dy, write dx
        if args.peak_gbps is None:
            reference, what = copy_bandwidth(device) / 1e9, "measured copy bandwidth"
        else:
            reference, what = args.peak_gbps, "given bandwidth"
        print(
            f"  bandwidth model: 5 x {tensor_bytes / 1e6:.1f} MB = {moved / 1e6:.1f} MB per step "
            f"(fwd read x + write y; bwd read x + dy, write dx); {what} {reference:.0f} GB/s on "
            f"{torch.cuda.get_device_name(device)}"
        )
        for name, median in medians.items():
            gbps = moved / median / 1e9
            print(f"  {name:7s} {gbps:8.1f} GB/s = {gbps / reference:6.1%} of the {what}")


if __name__ == "__main__":
    main()
