"""Cost of ``bncourse.distributed.SyncBatchNorm`` on 2 local gloo processes (CPU).

For each channel count ``C`` the script starts ``--ranks`` processes (default 2) joined by gloo on
127.0.0.1, and in each times ``y = bn(x); y.backward(dy)`` on an (N, C, H, W) float32 batch per
rank, alternating the contenders so that slow drifts of the machine hit all alike:

* ``sync``: our :class:`SyncBatchNorm`, synchronised over the ranks (one ``all_gather`` forward,
  one ``all_reduce`` backward);
* ``local``: the same layer with a one-process group, i.e. ``torch.nn.functional.batch_norm``
  (what an unsynchronised ``torch.nn.BatchNorm2d`` costs);
* ``collectives``: the two collectives alone, with tensors of the sizes the layer sends.

It also counts the bytes the layer hands to ``torch.distributed`` per training step (by wrapping
``all_gather`` and ``all_reduce``), against the minimum for exact global statistics: ``2C + 1``
numbers forward (a count, C means, C centred sums of squares) and ``2C`` backward (the sums of
``dy`` and ``dy * x_hat``), 4 bytes each in float32. ``all_gather`` also *receives* ``2C + 1``
numbers from each other rank; that is printed apart.

Medians over ``--repeats`` repetitions of rank 0 are printed (milliseconds), with the load average:
on a shared machine the absolute times vary a lot between runs, the byte counts do not.

Measured on 2026-12-05 (torch 2.13 CPU, 2 ranks on a shared 2-core machine, load average 8.6;
32 x C x 16 x 16 float32 per rank, medians of 30)::

        C   sync ms  local ms  coll. ms  fwd bytes    min  bwd bytes    min  fwd received
       16     5.029     0.711     0.865        132    132        128    128           132
       64     9.505     2.588     0.510        516    516        512    512           516
      256    55.280    16.005     2.225       2052   2052       2048   2048          2052

The bytes sent are the minimum for every C. The times say little on so loaded a machine beyond
their order: the synchronised step costs a few times the unsynchronised one, mostly arithmetic
(our layer runs plain tensor operations where ``F.batch_norm`` runs one kernel) and the rest
waiting in the two collectives.

Examples
--------
``python benchmarks/bench_sync_bn.py``
``python benchmarks/bench_sync_bn.py --channels 32 256 --batch 16 --size 32 --repeats 50``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bncourse.distributed import SyncBatchNorm, launch  # noqa: E402


def _count_bytes(layer: SyncBatchNorm, x: torch.Tensor, dy: torch.Tensor) -> dict[str, int]:
    """Bytes handed to the collectives in one training step of ``layer``."""
    sent = {"all_gather": 0, "all_reduce": 0}
    originals = dist.all_gather, dist.all_reduce

    def all_gather(outputs, tensor, *args, **kwargs):
        sent["all_gather"] += tensor.numel() * tensor.element_size()
        return originals[0](outputs, tensor, *args, **kwargs)

    def all_reduce(tensor, *args, **kwargs):
        sent["all_reduce"] += tensor.numel() * tensor.element_size()
        return originals[1](tensor, *args, **kwargs)

    dist.all_gather, dist.all_reduce = all_gather, all_reduce
    try:
        layer(x).backward(dy)
    finally:
        dist.all_gather, dist.all_reduce = originals
    return sent


def _worker(rank: int, world_size: int, channels: int, batch: int, size: int, repeats: int):
    torch.manual_seed(rank)
    x = torch.randn(batch, channels, size, size, requires_grad=True)
    dy = torch.randn_like(x)
    sync = SyncBatchNorm(channels)
    # every rank must create every group, in the same order
    alone = [dist.new_group([r]) for r in range(world_size)]
    local = SyncBatchNorm(channels, process_group=alone[rank])
    gathered = [torch.empty(2 * channels + 1) for _ in range(world_size)]

    def collectives() -> None:
        dist.all_gather(gathered, torch.ones(2 * channels + 1))
        dist.all_reduce(torch.ones(2 * channels))

    contenders = {
        "sync": lambda: sync(x).backward(dy),
        "local": lambda: local(x).backward(dy),
        "collectives": collectives,
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for step in contenders.values():  # warm-up
        step()
    for _ in range(repeats):
        for name, step in contenders.items():
            dist.barrier()
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"medians": medians, "bytes": _count_bytes(sync, x, dy)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--batch", type=int, default=32, help="examples per rank")
    parser.add_argument("--size", type=int, default=16, help="H = W")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {args.ranks} ranks (gloo, CPU, 1 thread each), "
        f"{args.batch} x C x {args.size} x {args.size} float32 per rank, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    header = (
        f"{'C':>5} {'sync ms':>9} {'local ms':>9} {'coll. ms':>9} "
        f"{'fwd bytes':>10} {'min':>6} {'bwd bytes':>10} {'min':>6} {'fwd received':>13}"
    )
    print(header)
    for channels in args.channels:
        results = launch(
            _worker,
            args.ranks,
            (channels, args.batch, args.size, args.repeats),
            timeout=600.0,
        )
        medians, sent = results[0]["medians"], results[0]["bytes"]
        minimum_forward, minimum_backward = 4 * (2 * channels + 1), 4 * 2 * channels
        received = (args.ranks - 1) * sent["all_gather"]
        print(
            f"{channels:>5} {1e3 * medians['sync']:>9.3f} {1e3 * medians['local']:>9.3f} "
            f"{1e3 * medians['collectives']:>9.3f} {sent['all_gather']:>10} {minimum_forward:>6} "
            f"{sent['all_reduce']:>10} {minimum_backward:>6} {received:>13}"
        )


if __name__ == "__main__":
    main()
