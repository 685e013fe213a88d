"""Model builders for the book's experiments.

:func:`make_mlp` builds the fully connected networks of the chapters (the sigmoid MLP of Ioffe &
Szegedy's Figure 1, depth and init-scale sweeps, with or without batch norm) as an :class:`MLP`
whose hidden layers are easy to look inside: ``model.hidden[i].linear``, ``.norm``,
``.activation``, and :meth:`MLP.forward_with_preactivations` returns the inputs of every hidden
nonlinearity together with the logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["HiddenBlock", "MLP", "make_mlp", "count_parameters", "ACTIVATIONS", "NORMS"]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "identity": nn.Identity,
}
"""The activation names :func:`make_mlp` accepts, mapped to their module classes."""

NORMS: tuple[str | None, ...] = (None, "bn", "bn_no_affine")
"""The values of ``norm`` that :func:`make_mlp` accepts."""

BN_IMPLS: tuple[str, ...] = ("bncourse", "torch")
"""The batch-norm implementations :func:`make_mlp` can use."""


class HiddenBlock(nn.Module):
    """One hidden layer: ``activation(norm(linear(x)))``, or ``activation(linear(x))`` without BN.

    Attributes
    ----------
    linear : nn.Linear
        The affine map, weight of shape (out_features, in_features).
    norm : nn.Module or None
        A ``BatchNorm1d(out_features)`` or None.
    activation : nn.Module
        The elementwise nonlinearity.
    """

    def __init__(self, linear: nn.Linear, norm: nn.Module | None, activation: nn.Module):
        super().__init__()
        self.linear = linear
        self.norm = norm
        self.activation = activation

    def preactivation(self, x: torch.Tensor) -> torch.Tensor:
        """Input of the nonlinearity: ``norm(linear(x))`` (after BN when BN is on).

        Parameters
        ----------
        x : torch.Tensor, shape (N, in_features)

        Returns
        -------
        torch.Tensor, shape (N, out_features)
        """
        z = self.linear(x)
        return z if self.norm is None else self.norm(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block: (N, in_features) -> (N, out_features)."""
        return self.activation(self.preactivation(x))


class MLP(nn.Module):
    """A multilayer perceptron with introspectable hidden layers (build it with :func:`make_mlp`).

    Inputs of shape (N, d1, d2, ...) are flattened to (N, d1*d2*...) first, so image batches
    such as (N, 1, 8, 8) can be fed directly.

    Attributes
    ----------
    hidden : nn.ModuleList of HiddenBlock
        The hidden layers, first to last; each has ``.linear``, ``.norm`` (or None) and
        ``.activation``.
    output : nn.Linear
        The final layer producing the logits, shape (num_classes, width).
    in_features, num_classes, depth, width : int
        The sizes the model was built with.
    activation_name : str
        The ``activation`` passed to :func:`make_mlp`.
    norm_name : str or None
        The ``norm`` passed to :func:`make_mlp`.
    """

    def __init__(
        self,
        hidden: list[HiddenBlock],
        output: nn.Linear,
        *,
        activation: str = "",
        norm: str | None = None,
    ):
        super().__init__()
        self.hidden = nn.ModuleList(hidden)
        self.output = output
        self.in_features = hidden[0].linear.in_features if hidden else output.in_features
        self.num_classes = output.out_features
        self.depth = len(hidden)
        self.width = hidden[0].linear.out_features if hidden else 0
        self.activation_name = activation
        self.norm_name = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the batch.

        Parameters
        ----------
        x : torch.Tensor, shape (N, in_features) or (N, *input_shape)

        Returns
        -------
        torch.Tensor, shape (N, num_classes)
        """
        x = x.flatten(1)
        for block in self.hidden:
            x = block(x)
        return self.output(x)

    def forward_with_preactivations(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and the input of every hidden nonlinearity, from one forward pass.

        The pre-activations are taken after batch norm when the model has it (they are what the
        sigmoid sees), and are part of the autograd graph (call ``.detach()`` to store them).
        In training mode this pass updates BN's running statistics exactly like ``forward``.

        Parameters
        ----------
        x : torch.Tensor, shape (N, in_features) or (N, *input_shape)

        Returns
        -------
        logits : torch.Tensor, shape (N, num_classes)
        preactivations : list of torch.Tensor, ``depth`` tensors of shape (N, width)
            ``preactivations[i]`` is the input of ``hidden[i].activation``.
        """
        x = x.flatten(1)
        preactivations = []
        for block in self.hidden:
            z = block.preactivation(x)
            preactivations.append(z)
            x = block.activation(z)
        return self.output(x), preactivations

    def extra_repr(self) -> str:
        return f"activation={self.activation_name!r}, norm={self.norm_name!r}"


def _batch_norm_class(bn_impl: str) -> type[nn.Module]:
    if bn_impl == "torch":
        return nn.BatchNorm1d
    if bn_impl == "bncourse":
        # Imported here so that this module imports even where torch_bn is not available.
        from bncourse.torch_bn import BatchNorm1d

        return BatchNorm1d
    raise ValueError(f"bn_impl must be one of {BN_IMPLS}, got {bn_impl!r}")


def make_mlp(
    in_features: int,
    num_classes: int,
    depth: int = 3,
    width: int = 100,
    activation: str = "sigmoid",
    norm: str | None = None,
    bias: bool | None = None,
    bn_impl: str = "bncourse",
    init_scale: float = 1.0,
    seed: int | None = None,
) -> MLP:
    """Build an MLP: ``depth`` hidden layers of ``width`` units, then a linear output layer.

    Each hidden layer is ``Linear -> [BatchNorm1d] -> activation``; the output layer is a plain
    ``Linear`` producing logits (no softmax: use a cross-entropy loss on them).

    Initialisation: PyTorch's default for ``nn.Linear``, i.e. weights and biases drawn from
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (a standard deviation of 1/sqrt(3 fan_in)). The weights
    of the *hidden* layers are then multiplied by ``init_scale``; the output layer keeps the
    default, so that with BN the network's function does not depend on ``init_scale`` at all
    (BN(a W u) = BN(W u)). BN layers start at gamma = 1, beta = 0, running mean 0, running var 1.

    Parameters
    ----------
    in_features : int
        Input size (64 for flattened digits).
    num_classes : int
        Number of logits.
    depth : int, default 3
        Number of hidden layers (0 gives a linear classifier).
    width : int, default 100
        Units per hidden layer.
    activation : {"sigmoid", "tanh", "relu", "identity"}, default "sigmoid"
        The nonlinearity of the hidden layers.
    norm : {None, "bn", "bn_no_affine"}, default None
        No normalisation, batch norm with learned gamma/beta, or batch norm without them
        (``affine=False``).
    bias : bool, optional
        Whether hidden ``Linear`` layers have a bias. None (automatic) means no bias when BN
        follows (BN subtracts the mean, which cancels any bias exactly) and a bias otherwise.
        The output layer always has a bias.
    bn_impl : {"bncourse", "torch"}, default "bncourse"
        Use :class:`bncourse.torch_bn.BatchNorm1d` (the book's implementation) or
        :class:`torch.nn.BatchNorm1d`.
    init_scale : float, default 1.0
        Factor applied to the default initial weights of the hidden layers.
    seed : int, optional
        If given, initialise the parameters from ``torch.manual_seed(seed)`` without disturbing
        the global random state; if None, draw from the global generator.

    Returns
    -------
    MLP
        The model, on the CPU, in training mode.

    Examples
    --------
    >>> model = make_mlp(64, 10, depth=3, width=100, norm="bn", bn_impl="torch", seed=0)
    >>> logits, preactivations = model.forward_with_preactivations(torch.randn(32, 64))
    >>> logits.shape, len(preactivations), preactivations[0].shape
    (torch.Size([32, 10]), 3, torch.Size([32, 100]))
    """
    for name, value in (("in_features", in_features), ("num_classes", num_classes)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be an int >= 0 (number of hidden layers), got {depth!r}")
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if bias not in (None, True, False):
        raise ValueError(f"bias must be None (automatic), True or False, got {bias!r}")
    if bn_impl not in BN_IMPLS:
        raise ValueError(f"bn_impl must be one of {BN_IMPLS}, got {bn_impl!r}")
    if not init_scale > 0:
        raise ValueError(f"init_scale must be positive, got {init_scale!r}")

    batch_norm = _batch_norm_class(bn_impl) if norm is not None else None
    hidden_bias = (norm is None) if bias is None else bias

    def build() -> MLP:
        blocks = []
        fan_in = in_features
        for _ in range(depth):
            linear = nn.Linear(fan_in, width, bias=hidden_bias)
            if init_scale != 1.0:
                with torch.no_grad():
                    linear.weight.mul_(init_scale)
            bn = None if batch_norm is None else batch_norm(width, affine=(norm == "bn"))
            blocks.append(HiddenBlock(linear, bn, ACTIVATIONS[activation]()))
            fan_in = width
        output = nn.Linear(fan_in, num_classes)
        return MLP(blocks, output, activation=activation, norm=norm)

    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of scalar parameters of ``model`` (only those with ``requires_grad`` by default).

    Buffers such as BN's running statistics are not parameters and are not counted.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
