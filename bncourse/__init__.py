"""bncourse: the companion package of the batch-normalization textbook.

The package holds two batch-norm implementations that match ``torch.nn`` exactly:

* :mod:`bncourse.numpy_bn`: forward/backward pairs and a stateful layer in NumPy, written to read
  like the math of the book;
* :mod:`bncourse.torch_bn`: ``batch_norm`` with a hand-derived backward, and drop-in
  ``BatchNorm1d/2d/3d`` modules that run on CPU and CUDA;

and the data, models, training loops, experiments, plots and exercise checks the chapters use.
"""

from __future__ import annotations

import random

import numpy as np

__version__ = "0.1.0"

__all__ = ["get_device", "set_seed", "__version__"]


def get_device(prefer: str | None = None):
    """Return the device the book runs on: CUDA when present, else the CPU.

    Parameters
    ----------
    prefer : str, optional
        A device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``) that overrides the automatic choice.

    Returns
    -------
    torch.device
    """
    import torch

    if prefer is not None:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's random generators (CPU and CUDA)."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
