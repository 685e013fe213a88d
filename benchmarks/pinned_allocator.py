"""Run a benchmark script under a pinned glibc allocator, so that page faults do not decide it.

Each forward and backward makes new full-size tensors. When glibc's allocator has handed a
freed block back to the operating system, the next block of that size costs a page fault per
4 KiB page the first time it is written: on a CPU as much as the arithmetic of a batch norm.
Whether it happens depends on the order and sizes of every allocation in the process, so it
shifts with the set of contenders and from run to run (PyTorch's native batch norm measured
2.6 to 4.3 ms at two threads on the same input). With both thresholds pinned, freed blocks
up to 32 MiB stay with the process, and every contender, native or ours, reuses its memory.
"""

from __future__ import annotations

import os
import sys

PINNED = {
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),  # glibc's ceiling: blocks below it come from the heap
    "MALLOC_TRIM_THRESHOLD_": str(1 << 32),  # and the heap is not given back
}


def pin_allocator(argv: list[str]) -> None:
    """Re-run this script (``argv``, ``sys.argv``) with :data:`PINNED` in its environment, unless
    it already has it or ``--unpinned-allocator`` is among the arguments (then remove that)."""
    if "--unpinned-allocator" in argv:
        argv.remove("--unpinned-allocator")
        return
    if all(os.environ.get(key) == value for key, value in PINNED.items()):
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *argv], {**os.environ, **PINNED})
