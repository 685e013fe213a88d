"""Speed of ``bncourse.numpy_bn.BatchNorm`` against ``torch.nn.BatchNorm2d``, forward + backward.

Both run in the same process, in training mode, on the same float32 input, one thread each
(NumPy's BLAS and PyTorch's intra-op pool are limited to ``--threads``, default 1), alternating
(ours, native, ours, native, ...) so that slow drifts of the machine hit both alike. Each
repetition times ``y = bn(x)`` then the gradient with respect to the input, the weight and the
bias for an upstream gradient ``dy``; the script prints the median and the spread of each and
the ratio of the medians ours / native, in wall-clock time and in the process's CPU time (on a
busy machine, CPU time leaves out the time the process waits for a core). The functional pair
``batch_norm_forward`` + ``batch_norm_backward`` is timed as well.

With ``--device cuda`` the native module runs on the GPU (NumPy stays on the CPU; the ratio is
then printed for information only) and the script prints the achieved memory bandwidth of each
CUDA run: ``5 B`` bytes per step (forward: read x, write y; backward: read x and dy, write dx,
with ``B`` the bytes of one input-sized tensor) divided by the median time, as a fraction of a
copy bandwidth measured in the same process (``y.copy_(x)`` on a 256 MiB tensor: read + write).

Examples
--------
``python benchmarks/bench_numpy_bn.py``                     CPU, 1 thread, (32, 64, 32, 32)
``python benchmarks/bench_numpy_bn.py --repeats 100 --shape 64 32 16 16``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[32, 64, 32, 32], metavar="N C *")
    parser.add_argument("--threads", type=int, default=1, help="threads for NumPy's BLAS and torch")
    parser.add_argument("--device", default="cpu", help="device of the native module: cpu or cuda")
    parser.add_argument("--repeats", type=int, default=50, help="timed repetitions (>= 30)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed repetitions first")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


args = parse_args()
# the BLAS thread count must be set before NumPy is imported
for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[variable] = str(args.threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bncourse.numpy_bn import BatchNorm, batch_norm_backward, batch_norm_forward  # noqa: E402


def copy_bandwidth(device: torch.device, mebibytes: int = 256) -> float:
    """Bytes per second of ``y.copy_(x)`` (one read and one write), median of 20."""
    x = torch.empty(mebibytes << 18, device=device)  # float32
    y = torch.empty_like(x)
    times = []
    for _ in range(25):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        y.copy_(x)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
    return 2 * x.numel() * x.element_size() / statistics.median(times[5:])


def main() -> None:
    if args.repeats < 30:
        raise SystemExit("--repeats must be at least 30")
    if len(args.shape) < 2:
        raise SystemExit("--shape needs at least N and C")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    rng = np.random.default_rng(args.seed)
    shape = tuple(args.shape)
    channels = shape[1]
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    ours = BatchNorm(channels)
    gamma, beta = np.ones(channels), np.zeros(channels)

    native = {
        2: torch.nn.BatchNorm1d,
        3: torch.nn.BatchNorm1d,
        4: torch.nn.BatchNorm2d,
        5: torch.nn.BatchNorm3d,
    }[len(shape)](channels, device=device)
    x_native = torch.from_numpy(x).to(device).requires_grad_(True)
    dy_native = torch.from_numpy(dy).to(device)

    def step_ours() -> None:
        ours(x)
        ours.backward(dy)

    def step_functional() -> None:
        _, cache = batch_norm_forward(x, gamma, beta)
        batch_norm_backward(dy, cache)

    def step_native() -> None:
        x_native.grad = None
        native.weight.grad = native.bias.grad = None
        native(x_native).backward(dy_native)

    def timed(step) -> tuple[float, float]:
        """Wall-clock and CPU seconds of one call of ``step``."""
        if cuda:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu

    steps = {
        "numpy_bn.BatchNorm": step_ours,
        "forward+backward fn": step_functional,
        "torch native": step_native,
    }
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu_times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            wall, cpu = timed(step)
            times[name].append(wall)
            cpu_times[name].append(cpu)

    load = os.getloadavg()
    print(
        f"batch norm forward+backward, training, input {shape} float32, NumPy {np.__version__} "
        f"and torch {torch.__version__}, {args.threads} thread(s), native on {device}, median of "
        f"{args.repeats} interleaved repetitions after {args.warmup} warm-up; load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs"
    )
    medians = {}
    for name, values in times.items():
        medians[name] = statistics.median(values)
        quartiles = statistics.quantiles(values, n=4)
        print(
            f"  {name:20s} median {medians[name] * 1e3:8.3f} ms   "
            f"(quartiles {quartiles[0] * 1e3:.3f} .. {quartiles[2] * 1e3:.3f} ms, "
            f"min {min(values) * 1e3:.3f} ms; CPU time median "
            f"{statistics.median(cpu_times[name]) * 1e3:.3f} ms)"
        )
    note = " (NumPy on the CPU, native on CUDA: for information)" if cuda else ""
    for name in ("numpy_bn.BatchNorm", "forward+backward fn"):
        ratio = medians[name] / medians["torch native"]
        cpu_ratio = statistics.median(cpu_times[name]) / statistics.median(
            cpu_times["torch native"]
        )
        print(f"  ratio {name} / native = {ratio:.3f} wall clock, {cpu_ratio:.3f} CPU time{note}")
    if cuda:
        bandwidth = copy_bandwidth(device)
        moved = 5 * x.nbytes
        achieved = moved / medians["torch native"]
        print(
            f"  native on {torch.cuda.get_device_name(device)}: {moved / 1e6:.1f} MB moved "
            f"(5 x input) in {medians['torch native'] * 1e3:.3f} ms = {achieved / 1e9:.1f} GB/s, "
            f"{achieved / bandwidth:.1%} of the measured copy bandwidth {bandwidth / 1e9:.0f} GB/s"
        )


if __name__ == "__main__":
    main()
