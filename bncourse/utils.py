"""Small helpers that the rest of the package shares, each with one home.

* :func:`torch_threads`: run a block with a given number of PyTorch CPU threads, restored after.
* :func:`accuracy`: the fraction of correct predictions of a batch of logits.
* :func:`finite_difference_gradient`: the central-difference gradient of a scalar function,
  to check hand-derived backward passes.
* :func:`interleaved_times`: time several functions in turn, repeat after repeat, so that a
  burst of load on a shared machine hits them all alike.
* :func:`memory_policy`: run a block with glibc's allocator keeping freed memory, or handing
  every large block back to the operating system, so that page faults do not decide a timing.
* :class:`KernelChoice`: which kernels a module runs, a :mod:`contextvars` variable behind the
  ``use_kernels`` / ``kernels`` switches of :mod:`bncourse.torch_bn` and
  :mod:`bncourse.torch_norm`.
* :func:`signature_computed_once`: a class decorator that saves an autograd ``Function`` the
  signature look-up its ``apply`` makes on every call.

The device the book runs on is :func:`bncourse.get_device` (``get_device(device)`` also turns a
device string or ``None`` into a ``torch.device``).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import ctypes.util
import functools
import inspect
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

__all__ = [
    "torch_threads",
    "accuracy",
    "finite_difference_gradient",
    "interleaved_times",
    "memory_policy",
    "KernelChoice",
    "signature_computed_once",
]


@contextlib.contextmanager
def torch_threads(threads: int | None, device: torch.device | str | None = None) -> Iterator[None]:
    """Run the ``with`` block with ``torch.set_num_threads(threads)``, restoring it afterwards.

    One thread is the fastest for the book's small models, and it avoids the large slow-down of
    several intra-op threads on cores shared with other processes.

    Parameters
    ----------
    threads : int or None
        Threads for the block; None leaves the setting as it is.
    device : torch.device or str, optional
        When given and not a CPU device, the setting is left as it is (it only matters on the
        CPU).

    Raises
    ------
    ValueError
        ``threads`` is not a positive integer or None.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be a positive int or None, got {threads}")
    previous = torch.get_num_threads()
    on_cpu = device is None or torch.device(device).type == "cpu"
    if threads is not None and on_cpu:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of the rows of ``logits`` whose largest entry is at the row's label.

    Parameters
    ----------
    logits : Tensor, shape (N, num_classes)
    labels : Tensor, int, shape (N,)
        Moved to the device of ``logits``.

    Returns
    -------
    float
        In [0, 1]: the number of correct rows over N, computed exactly.
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"accuracy: logits must be (N, num_classes) and labels (N,), got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    correct = (logits.argmax(dim=1) == labels.to(logits.device)).sum()
    return int(correct) / len(labels)


def finite_difference_gradient(
    f: Callable[[np.ndarray], float], x: np.ndarray, h: float = 1e-6
) -> np.ndarray:
    """Central-difference gradient of a scalar function ``f`` at ``x``.

    Each entry is ``(f(x + h e_i) - f(x - h e_i)) / (2 h)``, with an error of order ``h**2``;
    use float64 inputs. Costs ``2 * x.size`` evaluations of ``f``.

    Parameters
    ----------
    f : callable
        Maps an array of the shape of ``x`` to a float.
    x : np.ndarray, float64, any shape
        Where to differentiate (not modified).
    h : float, default 1e-6
        Step size.

    Returns
    -------
    np.ndarray, float64, shape of ``x``
    """
    x = np.array(x, dtype=np.float64)
    grad = np.empty_like(x)
    flat, grad_flat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + h
        upper = f(x)
        flat[i] = saved - h
        lower = f(x)
        flat[i] = saved
        grad_flat[i] = (upper - lower) / (2.0 * h)
    return grad


def interleaved_times(
    functions: Mapping[str, Callable[[], object]],
    repeats: int = 15,
    number: int = 1,
    warmup: int = 1,
    clock: str = "cpu",
) -> dict[str, np.ndarray]:
    """Seconds per call of each function, timed in turn (A, B, C, A, B, C, ...).

    Quote the median over repeats: it ignores the occasional slow repeat. On a shared machine
    the process's CPU time (``clock="cpu"``) leaves out the time spent waiting for a core.

    Parameters
    ----------
    functions : dict of name to callable
        Each is called with no arguments.
    repeats : int, default 15
        Timed repeats of each function.
    number : int, default 1
        Calls per repeat (the time of a repeat is divided by it).
    warmup : int, default 1
        Untimed calls of each function first.
    clock : {"cpu", "wall"}, default "cpu"
        :func:`time.process_time` or :func:`time.perf_counter`.

    Returns
    -------
    dict of name to np.ndarray, shape (repeats,)
    """
    if repeats < 1 or number < 1 or warmup < 0:
        raise ValueError(
            f"need repeats, number >= 1 and warmup >= 0, got {repeats}, {number}, {warmup}"
        )
    clocks = {"cpu": time.process_time, "wall": time.perf_counter}
    if clock not in clocks:
        raise ValueError(f"clock must be 'cpu' or 'wall', got {clock!r}")
    now = clocks[clock]
    for function in functions.values():
        for _ in range(warmup):
            function()
    times = {name: np.empty(repeats) for name in functions}
    for repeat in range(repeats):
        for name, function in functions.items():
            start = now()
            for _ in range(number):
                function()
            times[name][repeat] = (now() - start) / number
    return times


# glibc's mallopt parameters and the defaults it starts from (64-bit)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_DEFAULT_THRESHOLD = 128 << 10
_POLICIES = {
    # freed blocks up to 32 MiB (glibc's ceiling) stay with the process and are never trimmed
    "keep": {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 1 << 30},
    # every block of 128 KiB or more is mapped on allocation and unmapped when freed
    "return": {_M_MMAP_THRESHOLD: _DEFAULT_THRESHOLD, _M_TRIM_THRESHOLD: _DEFAULT_THRESHOLD},
}
_policies_in_force: list[str] = []  # of the memory_policy blocks entered, innermost last


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has ``mallopt``), else None (looked up once)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _set_policy(libc: ctypes.CDLL, policy: str | None) -> None:
    """Set ``policy``'s thresholds, or for None glibc's defaults (those of ``"return"``) and
    give back the freed memory the process holds."""
    for parameter, value in _POLICIES[policy or "return"].items():
        libc.mallopt(parameter, value)
    if policy is None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def memory_policy(policy: str) -> Iterator[bool]:
    """Run the ``with`` block with a fixed policy for the memory of large arrays and tensors.

    A freed block of memory either stays with the process, and the next array of that size
    reuses it, or goes back to the operating system, and the next one costs a page fault per
    4 KiB page the first time it is written: for a batch norm step on a CPU, as much time as
    its arithmetic. By default glibc decides between the two by the sizes of past allocations,
    so a timing can swing by a factor of two with what ran before it. This pins the choice.
    Blocks nest: leaving one restores the policy of the block around it.

    Parameters
    ----------
    policy : {"keep", "return"}
        ``"keep"``: freed blocks up to 32 MiB stay with the process (no page faults once every
        size has been allocated once). ``"return"``: blocks of 128 KiB or more go back to the
        operating system when freed, and new ones come from it (page faults on every new
        array), except where free memory the process held before the block can serve them.

    Yields
    ------
    bool
        True when the policy is in force; False where the C library is not glibc (macOS,
        Windows, musl), where the block runs with the allocator as it is.

    Notes
    -----
    Leaving the outermost block gives back the freed memory the process holds and sets
    glibc's default thresholds (128 KiB) again; they then stay fixed instead of adapting to
    past allocations as they do in a new process.
    """
    if policy not in _POLICIES:
        raise ValueError(f"policy must be 'keep' or 'return', got {policy!r}")
    libc = _glibc()
    if libc is None:
        yield False
        return
    _policies_in_force.append(policy)
    _set_policy(libc, policy)
    try:
        yield True
    finally:
        _policies_in_force.pop()
        _set_policy(libc, _policies_in_force[-1] if _policies_in_force else None)


class KernelChoice:
    """A choice among named kernels, held in a :mod:`contextvars` variable: it holds in the
    current thread (and asyncio task) and is inherited by contexts created from it.

    Parameters
    ----------
    name : str
        Name of the context variable.
    choices : tuple of str
        The kernels one can choose.
    default : str, default "fast"
        The choice until one is made.
    """

    def __init__(self, name: str, choices: tuple[str, ...], default: str = "fast") -> None:
        self.choices, self.default = choices, default
        self._choice: contextvars.ContextVar[str] = contextvars.ContextVar(name)

    def check(self, name: Any) -> str:
        """``name``, or a ``ValueError`` that lists the choices."""
        if name not in self.choices:
            listed = ", ".join(map(repr, self.choices))
            raise ValueError(f"kernels must be one of {listed}, got {name!r}")
        return name

    def get(self) -> str:
        """The current choice."""
        return self._choice.get(self.default)

    def set(self, name: str) -> str:
        """Choose ``name``; returns the previous choice."""
        previous = self.get()
        self._choice.set(self.check(name))
        return previous

    @contextlib.contextmanager
    def scoped(self, name: str) -> Iterator[None]:
        """``name`` inside the ``with`` block, the previous choice after it (also on error)."""
        token = self._choice.set(self.check(name))
        try:
            yield
        finally:
            self._choice.reset(token)


FunctionClass = Any  # a subclass of torch.autograd.Function


def signature_computed_once(function_class: FunctionClass) -> FunctionClass:
    """Class decorator for a :class:`torch.autograd.Function` with a ``setup_context``: store the
    signature of its ``forward`` on the function, once.

    ``Function.apply`` binds its arguments to ``forward``'s signature on every call, and
    :func:`inspect.signature` builds that signature anew each time (about 40 microseconds, as
    much as a small tensor operation) unless the function carries a ``__signature__``.
    """
    forward = function_class.forward
    forward.__signature__ = inspect.signature(forward)
    return function_class
