"""Speed of the NumPy batch-norm layers against ``torch.nn.BatchNorm*d``, forward + backward.

Three layers run in the same process, in training mode, on the same float32 input, one thread
each (NumPy's BLAS and PyTorch's intra-op pool are limited to ``--threads``, default 1):

* ``reference``: ``bncourse.numpy_bn.BatchNorm(C, kernels="reference")``, the code that reads
  like chapter 2;
* ``fast``: ``bncourse.numpy_bn.BatchNorm(C)``, the kernels of ``bncourse.fast.numpy_bn``;
* ``native``: ``torch.nn.BatchNorm1d/2d/3d`` on the CPU.

Each repetition times ``number`` steps of ``y = bn(x)`` then the gradients with respect to the
input, the weight and the bias for an upstream gradient ``dy``, for each layer in turn
(reference, fast, native, reference, ...), so that slow drifts of a shared machine hit all three
alike. The script prints, per shape, the median time of a step in the process's CPU time (on a
busy machine CPU time leaves out the time the process waits for a core) and in wall-clock time,
the ratios of the medians to native, and the achieved memory bandwidth of each layer:
``5 B`` bytes per step (forward: read x, write y; backward: read x (or x_hat) and dy, write dx;
``B`` the bytes of one input-sized array) divided by the median CPU time, as a fraction of the
copy bandwidth measured in the same process (``np.copyto`` of 256 MiB, one read and one write).

The ``fast`` layer runs its C kernels (:mod:`bncourse.fast.native`) on C-contiguous input of
at least 16 positions where a C compiler built them; ``--no-native`` times its NumPy operations
instead. The script runs with glibc's allocator pinned (:mod:`pinned_allocator`);
``--unpinned-allocator`` times the default behaviour.

Examples
--------
``python benchmarks/bench_numpy_bn.py``                 the four shapes of the note, 1 thread
``python benchmarks/bench_numpy_bn.py --shapes 32,64,32,32 --repeats 60``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

DEFAULT_SHAPES = ["32,64,32,32", "2,64,8,8", "256,512", "8,256,56,56"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, metavar="N,C,...")
    parser.add_argument("--threads", type=int, default=1, help="threads for NumPy's BLAS and torch")
    parser.add_argument("--repeats", type=int, default=30, help="timed repetitions (>= 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-native", action="store_true", help="fast: NumPy operations only")
    parser.add_argument("--unpinned-allocator", action="store_true", help="glibc's default")
    return parser.parse_args(argv)


args = parse_args()
# the BLAS thread count must be set before NumPy is imported
for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[variable] = str(args.threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pinned_allocator import pinned_allocator  # noqa: E402  (this script's folder)

from bncourse.fast import native as c_kernels  # noqa: E402
from bncourse.numpy_bn import BatchNorm  # noqa: E402

NATIVE = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}
NATIVE[5] = torch.nn.BatchNorm3d


def copy_bandwidth(mebibytes: int = 256) -> float:
    """Bytes per second of ``np.copyto`` (one read and one write), median of 10 after 2."""
    source = np.ones(mebibytes << 18, dtype=np.float32)
    target = np.empty_like(source)
    times = []
    for _ in range(12):
        begin = time.process_time()
        np.copyto(target, source)
        times.append(time.process_time() - begin)
    return 2 * source.nbytes / statistics.median(times[2:])


def steps_for(shape: tuple[int, ...], rng: np.random.Generator) -> dict:
    """The three layers' forward + backward steps on one input of ``shape``."""
    channels = shape[1]
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    reference, fast = BatchNorm(channels, kernels="reference"), BatchNorm(channels)
    native = NATIVE[len(shape)](channels)
    x_native = torch.from_numpy(x).requires_grad_(True)
    dy_native = torch.from_numpy(dy)

    def numpy_step(layer: BatchNorm):
        def step() -> None:
            layer(x)
            layer.backward(dy)

        return step

    def native_step() -> None:
        x_native.grad = None
        native.weight.grad = native.bias.grad = None
        native(x_native).backward(dy_native)

    return {"reference": numpy_step(reference), "fast": numpy_step(fast), "native": native_step}


def measure(shape: tuple[int, ...], rng: np.random.Generator) -> dict[str, tuple[float, float]]:
    """Median (CPU, wall) seconds of one step of each layer, interleaved repetitions."""
    steps = steps_for(shape, rng)
    begin = time.perf_counter()
    steps["native"]()
    number = max(1, int(2e-3 / max(time.perf_counter() - begin, 1e-7)))  # >= ~2 ms per timing
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    wall: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            begin_wall, begin_cpu = time.perf_counter(), time.process_time()
            for _ in range(number):
                step()
            cpu[name].append((time.process_time() - begin_cpu) / number)
            wall[name].append((time.perf_counter() - begin_wall) / number)
    return {name: (statistics.median(cpu[name]), statistics.median(wall[name])) for name in steps}


def main() -> None:
    if args.repeats < 10:
        raise SystemExit("--repeats must be at least 10")
    torch.set_num_threads(args.threads)
    c_kernels.use_native(not args.no_native)
    rng = np.random.default_rng(args.seed)
    bandwidth = copy_bandwidth()
    load = os.getloadavg()
    print(
        f"batch norm forward+backward, training, float32, NumPy {np.__version__}, torch "
        f"{torch.__version__}, {args.threads} thread(s); median of {args.repeats} interleaved "
        f"repetitions; load average {load[0]:.2f} on {os.cpu_count()} CPUs; measured copy "
        f"bandwidth {bandwidth / 1e9:.1f} GB/s (np.copyto, 256 MiB, read + write)\n"
    )
    print(
        "| shape | native ms | reference ms (x native) | fast ms (x native) "
        "| bandwidth native / reference / fast, % of copy |"
    )
    print("|---|---|---|---|---|")
    for text in args.shapes:
        shape = tuple(int(size) for size in text.split(","))
        times = measure(shape, rng)
        native = times["native"][0]
        moved = 5 * 4 * int(np.prod(shape))
        order = ("native", "reference", "fast")
        share = " / ".join(f"{moved / times[k][0] / bandwidth:.0%}" for k in order)
        cells = [
            f"{times[k][0] * 1e3:.3f} ({times[k][0] / native:.2f}x; wall "
            f"{times[k][1] / times['native'][1]:.2f}x)"
            for k in ("reference", "fast")
        ]
        print(f"| {shape} | {native * 1e3:.3f} | {cells[0]} | {cells[1]} | {share} |")
    print("\nTimes are CPU time per step; the ratios in brackets also give the wall-clock ratio.")


if __name__ == "__main__":
    with pinned_allocator(sys.argv):
        main()
