"""Run a benchmark with glibc's allocator keeping freed memory: no page faults decide it.

Each forward and backward makes new full-size tensors. When glibc's allocator has handed a
freed block back to the operating system, the next block of that size costs a page fault per
4 KiB page the first time it is written: on a CPU as much as the arithmetic of a batch norm.
Whether it happens depends on the order and sizes of every allocation in the process, so it
shifts with the set of contenders and from run to run (PyTorch's native batch norm measured
2.6 to 4.3 ms at two threads on the same input). Under :func:`bncourse.utils.memory_policy`
``("keep")`` freed blocks up to 32 MiB stay with the process, and every contender, native or
ours, reuses its memory.
"""

from __future__ import annotations

import contextlib

from bncourse.utils import memory_policy


def pinned_allocator(argv: list[str]) -> contextlib.AbstractContextManager[object]:
    """``memory_policy("keep")``, or nothing when ``--unpinned-allocator`` is in ``argv``
    (``sys.argv``; the flag is then removed, so that the script's parser need not know it)."""
    if "--unpinned-allocator" in argv:
        argv.remove("--unpinned-allocator")
        return contextlib.nullcontext()
    return memory_policy("keep")
