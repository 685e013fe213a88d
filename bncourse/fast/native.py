"""The C kernels of :mod:`bncourse.fast.torch_norm`, :mod:`bncourse.fast.torch_bn` and
:mod:`bncourse.fast.numpy_bn` on the CPU: built on first use, or absent.

A normalisation layer is a few operations per value, and PyTorch runs each operation as its own
pass over memory, while ``torch.nn``'s layers are one fused C++ loop per row: even the fewest
PyTorch operations a LayerNorm or GroupNorm can be written with take 2 to 3 times ``torch.nn``'s
time (``benchmarks/bench_norms_floor.py``). ``norm_rows.c``, next to this file, is that fused
loop: per row (per channel, for batch norm), the statistics, then the output while the values
are still in the cache, and the same for the backward pass.

:func:`library` compiles it the first time it is needed, with the C compiler of the machine
(``cc``, or ``$CC``; about a second) into a cache folder (``$BNCOURSE_CACHE`` or
``~/.cache/bncourse``), and loads it with :mod:`ctypes`. Without a compiler, or when the
environment variable ``BNCOURSE_NATIVE`` is ``0``, it returns None, and the fast kernels use
NumPy or PyTorch operations instead. :func:`use_native` turns the C kernels off and on at run time.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "library",
    "built",
    "call",
    "threads",
    "use_native",
    "native_kernels",
    "unavailable_reason",
]

SOURCE = Path(__file__).with_name("norm_rows.c")
FLAGS = [
    "-O3",
    "-march=native",
    "-fopenmp",  # (the source marks the sums that may be regrouped: no -ffast-math)
    "-fPIC",
    "-shared",
]

if platform.machine().lower() in ("x86_64", "amd64"):
    FLAGS.append("-mprefer-vector-width=512")  # (where the CPU has AVX-512; GCC's default is 256)

# the kernels of norm_rows.c (each as name_f32 and name_f64): how many pointers, then how many
# int64 sizes, then the other arguments (int flags and thread counts, double eps)
_SIGNATURES = {
    "norm_forward": (6, 4, [ctypes.c_int, ctypes.c_double, ctypes.c_int]),
    "norm_backward": (10, 4, [ctypes.c_int, ctypes.c_int]),
    "bn_forward": (6, 3, [ctypes.c_double, ctypes.c_int]),
    "bn_backward": (8, 3, [ctypes.c_int]),
    "bn_forward_xhat": (7, 3, [ctypes.c_double, ctypes.c_int]),
    "bn_backward_xhat": (7, 3, [ctypes.c_int]),
}

_state: dict[str, object] = {"enabled": os.environ.get("BNCOURSE_NATIVE", "1") != "0"}


def _cpu_signature() -> str:
    """The CPU's model and flags: a library built with ``-march=native`` runs where it was built."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _cache_folder() -> Path:
    root = os.environ.get("BNCOURSE_CACHE") or Path.home() / ".cache" / "bncourse"
    return Path(root)


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc, gcc or $CC) on this machine")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode(), _cpu_signature().encode()])
    ).hexdigest()[:16]
    target = _cache_folder() / f"norm_rows-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # build beside the target, then rename: processes building at once do not collide
        handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(handle)
        try:
            result = subprocess.run(
                [compiler, *FLAGS, "-o", partial, str(SOURCE)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if result.returncode != 0:
                raise OSError(f"{compiler} failed: {result.stderr.strip()[:500]}")
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    lib = ctypes.CDLL(str(target))
    for name, (pointers, sizes, rest) in _SIGNATURES.items():
        for suffix in ("f32", "f64"):
            function = getattr(lib, f"{name}_{suffix}")
            function.argtypes = [ctypes.c_void_p] * pointers + [ctypes.c_int64] * sizes + rest
            function.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The C kernels, compiled and loaded on first use (then cached on disk and in memory).

    Returns
    -------
    ctypes.CDLL or None
        None when turned off (:func:`use_native`, ``BNCOURSE_NATIVE=0``), on Windows, or when
        building failed; :func:`unavailable_reason` says why.
    """
    if not _state["enabled"] or sys.platform == "win32":
        return None
    if "library" not in _state:
        try:
            _state["library"] = _build()
        except (OSError, subprocess.SubprocessError) as error:
            _state["library"] = None
            _state["reason"] = f"{type(error).__name__}: {error}"
    return _state["library"]  # type: ignore[return-value]


def call(lib: ctypes.CDLL, name: str, *args: object) -> None:
    """Run the kernel ``name`` of ``lib`` on ``args``.

    Parameters
    ----------
    lib : ctypes.CDLL
        From :func:`library`.
    name : str
        A kernel of ``norm_rows.c`` without its suffix, e.g. ``"bn_forward"``.
    *args : Tensor, np.ndarray, None, int or float
        In the kernel's order. Tensors and arrays pass a pointer to their data (the first one's
        element size picks the ``_f32`` or ``_f64`` kernel; ``args`` keeps them alive for the
        call), None a null pointer, numbers themselves.
    """
    values, element_size = [], None
    for arg in args:
        if isinstance(arg, np.ndarray):
            element_size = element_size or arg.itemsize
            arg = arg.ctypes.data
        elif hasattr(arg, "data_ptr"):  # a torch.Tensor
            element_size = element_size or arg.element_size()
            arg = arg.data_ptr()
        values.append(arg)
    getattr(lib, f"{name}_{'f32' if element_size == 4 else 'f64'}")(*values)


def built() -> ctypes.CDLL | None:
    """The loaded library if :func:`library` has built it (whether turned on now or not), else
    None; builds nothing."""
    return _state.get("library")  # type: ignore[return-value]


def unavailable_reason() -> str | None:
    """Why :func:`library` returns None, or None when it does not.

    Returns
    -------
    str or None
        ``"turned off ..."``, ``"not built on Windows"``, or the build's error (for example no
        compiler, or one without OpenMP); None when the C kernels are available.
    """
    if not _state["enabled"]:
        return "turned off (use_native(False) or BNCOURSE_NATIVE=0)"
    if sys.platform == "win32":
        return "not built on Windows"
    library()
    return _state.get("reason")  # type: ignore[return-value]


def threads(work_items: int) -> int:
    """The number of threads the C kernels use for ``work_items`` rows or channels.

    PyTorch's thread count (``torch.set_num_threads``; for the NumPy layer too), or
    ``work_items`` when that is fewer, and at least 1.
    """
    return max(1, min(torch.get_num_threads(), work_items))


def use_native(enabled: bool) -> bool:
    """Turn the C kernels on or off for the fast kernels.

    Off, :mod:`bncourse.fast.torch_norm`, :mod:`bncourse.fast.torch_bn` and
    :mod:`bncourse.fast.numpy_bn` run their PyTorch or NumPy operations (same results within
    rounding). A process-wide setting, like the environment variable ``BNCOURSE_NATIVE=0``.

    Parameters
    ----------
    enabled : bool

    Returns
    -------
    bool
        The previous setting: ``previous = use_native(False); ...; use_native(previous)``.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"use_native: enabled must be a bool, got {enabled!r}")
    previous = bool(_state["enabled"])
    _state["enabled"] = enabled
    return previous


@contextlib.contextmanager
def native_kernels(enabled: bool) -> Iterator[None]:
    """Context manager: :func:`use_native` ``(enabled)`` inside the block, the previous setting
    after it (also when the block raises): ``with native_kernels(False): ...``."""
    previous = use_native(enabled)
    try:
        yield
    finally:
        use_native(previous)
