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

__all__ = [
    "HiddenBlock",
    "MLP",
    "make_mlp",
    "count_parameters",
    "ACTIVATIONS",
    "NORMS",
    "ConvBlock",
    "CNN",
    "make_cnn",
]

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


def _batch_norm_class(bn_impl: str, dims: int = 1) -> type[nn.Module]:
    """``BatchNorm{dims}d`` of ``torch.nn`` (``bn_impl="torch"``) or of
    :mod:`bncourse.torch_bn` (``"bncourse"``)."""
    if bn_impl == "torch":
        return getattr(nn, f"BatchNorm{dims}d")
    if bn_impl == "bncourse":
        # Imported here so that this module imports even where torch_bn is not available.
        from bncourse import torch_bn

        return getattr(torch_bn, f"BatchNorm{dims}d")
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


# ---------------------------------------------------------------------------------------------
# Convolutional networks (chapter 5)


class ConvBlock(nn.Module):
    """One convolutional block: ``pool(activation(norm(conv(x))))``.

    Attributes
    ----------
    conv : nn.Conv2d
        A 3x3 convolution with padding 1 (the spatial size is kept), weight of shape
        (out_channels, in_channels, 3, 3).
    norm : nn.Module or None
        A ``BatchNorm2d(out_channels)`` (statistics per channel over batch and positions) or None.
    activation : nn.Module
        The elementwise nonlinearity.
    pool : nn.Module
        ``nn.MaxPool2d(2)`` (halves height and width) or ``nn.Identity()``.
    """

    def __init__(
        self, conv: nn.Conv2d, norm: nn.Module | None, activation: nn.Module, pool: nn.Module
    ):
        super().__init__()
        self.conv = conv
        self.norm = norm
        self.activation = activation
        self.pool = pool

    def preactivation(self, x: torch.Tensor) -> torch.Tensor:
        """Input of the nonlinearity, ``norm(conv(x))``: (N, C_in, H, W) -> (N, C_out, H, W)."""
        z = self.conv(x)
        return z if self.norm is None else self.norm(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block: (N, C_in, H, W) -> (N, C_out, H', W') (H' = H // 2 when pooling)."""
        return self.pool(self.activation(self.preactivation(x)))


class CNN(nn.Module):
    """A small convolutional classifier (build it with :func:`make_cnn`).

    Flat inputs of shape (N, in_channels * H * W), such as the digits from
    ``load_digits(flatten=True)``, are reshaped to images (N, in_channels, H, W) first; image
    batches are used as they are.

    Attributes
    ----------
    blocks : nn.ModuleList of ConvBlock
        The convolutional blocks, first to last; each has ``.conv``, ``.norm`` (or None),
        ``.activation`` and ``.pool``.
    output : nn.Linear
        The classifier on the flattened last feature maps, producing the logits.
    input_shape : tuple of int
        (in_channels, H, W).
    num_classes : int
    norm_name : str or None
        The ``norm`` passed to :func:`make_cnn`.
    """

    def __init__(
        self,
        blocks: list[ConvBlock],
        output: nn.Linear,
        input_shape: tuple[int, int, int],
        *,
        norm: str | None = None,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.output = output
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = output.out_features
        self.norm_name = norm

    def _as_images(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            return x.reshape(x.shape[0], *self.input_shape)
        if x.ndim != 4:
            raise ValueError(
                f"CNN expects inputs of shape (N, {int(torch.tensor(self.input_shape).prod())}) "
                f"or (N, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}"
            )
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the batch: (N, C*H*W) or (N, C, H, W) -> (N, num_classes)."""
        x = self._as_images(x)
        for block in self.blocks:
            x = block(x)
        return self.output(x.flatten(1))

    def forward_with_preactivations(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and every block's pre-activation ``norm(conv(x))``, shape (N, C_k, H_k, W_k)."""
        x = self._as_images(x)
        preactivations = []
        for block in self.blocks:
            z = block.preactivation(x)
            preactivations.append(z)
            x = block.pool(block.activation(z))
        return self.output(x.flatten(1)), preactivations

    def extra_repr(self) -> str:
        return f"input_shape={self.input_shape}, norm={self.norm_name!r}"


CNN_NORMS: tuple[str | None, ...] = (None, "bn")
"""The values of ``norm`` that :func:`make_cnn` accepts."""


def make_cnn(
    num_classes: int = 10,
    channels: tuple[int, ...] = (16, 32, 64),
    norm: str | None = None,
    bias: bool | None = None,
    bn_impl: str = "bncourse",
    activation: str = "relu",
    input_shape: tuple[int, int, int] = (1, 8, 8),
    pool: bool = True,
    seed: int | None = None,
) -> CNN:
    """Build a small CNN for 8x8 digits: conv blocks, then a linear classifier.

    Each block is ``Conv2d(3x3, padding 1) -> [BatchNorm2d] -> activation -> [MaxPool2d(2)]``;
    the last block's feature maps are flattened into a ``Linear`` layer that gives the logits.
    With the defaults the feature maps are 16 x 8 x 8, 32 x 4 x 4 and 64 x 2 x 2 (before each
    pooling), and the classifier sees the 64 values left after the last pooling.

    Initialisation is PyTorch's default for ``nn.Conv2d`` and ``nn.Linear``; BN layers start at
    gamma = 1, beta = 0, running mean 0 and running variance 1.

    Parameters
    ----------
    num_classes : int, default 10
        Number of logits.
    channels : tuple of int, default (16, 32, 64)
        Output channels of the blocks, one entry per block.
    norm : {None, "bn"}, default None
        No normalisation, or ``BatchNorm2d`` after every convolution (one gamma and beta per
        channel).
    bias : bool, optional
        Whether the convolutions have a bias. None (automatic) means no bias when BN follows
        (the batch mean would cancel it) and a bias otherwise. The output layer has a bias.
    bn_impl : {"bncourse", "torch"}, default "bncourse"
        :class:`bncourse.torch_bn.BatchNorm2d` or :class:`torch.nn.BatchNorm2d`.
    activation : {"relu", "sigmoid", "tanh", "identity"}, default "relu"
    input_shape : tuple (in_channels, H, W), default (1, 8, 8)
        Shape of one image; with pooling H and W must be divisible by ``2 ** len(channels)``.
    pool : bool, default True
        Max-pool by 2 after every block.
    seed : int, optional
        If given, initialise from ``torch.manual_seed(seed)`` without disturbing the global
        random state; if None, draw from the global generator.

    Returns
    -------
    CNN
        The model, on the CPU, in training mode.

    Examples
    --------
    >>> model = make_cnn(norm="bn", seed=0)
    >>> model(torch.randn(5, 64)).shape
    torch.Size([5, 10])
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    channels = tuple(channels)
    if not channels or not all(isinstance(c, int) and c >= 1 for c in channels):
        raise ValueError(f"channels must be a non-empty tuple of positive ints, got {channels!r}")
    if norm not in CNN_NORMS:
        raise ValueError(f"norm must be one of {CNN_NORMS}, got {norm!r}")
    if bias not in (None, True, False):
        raise ValueError(f"bias must be None (automatic), True or False, got {bias!r}")
    if bn_impl not in BN_IMPLS:
        raise ValueError(f"bn_impl must be one of {BN_IMPLS}, got {bn_impl!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or not all(isinstance(s, int) and s >= 1 for s in input_shape):
        raise ValueError(f"input_shape must be (in_channels, H, W), got {input_shape!r}")
    factor = 2 ** len(channels) if pool else 1
    if input_shape[1] % factor or input_shape[2] % factor:
        raise ValueError(
            f"with pool=True, H and W of input_shape {input_shape} must be divisible by "
            f"2 ** len(channels) = {factor}"
        )

    batch_norm = _batch_norm_class(bn_impl, dims=2) if norm is not None else None
    conv_bias = (norm is None) if bias is None else bias

    def build() -> CNN:
        blocks = []
        in_channels, height, width = input_shape
        for out_channels in channels:
            conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=conv_bias)
            bn = None if batch_norm is None else batch_norm(out_channels)
            blocks.append(
                ConvBlock(
                    conv, bn, ACTIVATIONS[activation](), nn.MaxPool2d(2) if pool else nn.Identity()
                )
            )
            in_channels = out_channels
            if pool:
                height, width = height // 2, width // 2
        output = nn.Linear(in_channels * height * width, num_classes)
        return CNN(blocks, output, input_shape, norm=norm)

    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
