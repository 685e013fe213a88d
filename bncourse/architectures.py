"""The architectures of chapter 7: where normalisation sits in modern networks.

* :class:`SequenceClassifier`: a small pre-norm transformer for padded, variable-length
  sequences, with batch norm over (batch, time) (padding included, or masked out), LayerNorm or
  RMSNorm in its blocks (:data:`SEQUENCE_NORMS`).
* :class:`PlacementNet`: the book's digits MLP or CNN with batch norm before the nonlinearity
  (as in Ioffe & Szegedy 2015) or after it.
* :class:`ResNet`: a small residual network for 8x8 images with post-activation (He et al.
  2016a) or pre-activation (He et al. 2016b) blocks and the ways of normalising or not
  normalising them (:data:`RESNET_NORMS`): batch norm (optionally with the last gamma of each
  block at zero, Goyal et al. 2017), GroupNorm with weight standardisation (Qiao et al. 2019),
  none, SkipInit (De & Smith 2020), Fixup (Zhang et al. 2019), and the normaliser-free blocks
  with scaled weight standardisation of NF-ResNets (Brock et al. 2021).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bncourse.models import CNN, MLP
from bncourse.torch_bn import BatchNorm1d, BatchNorm2d
from bncourse.torch_norm import GroupNorm, LayerNorm, RMSNorm

__all__ = [
    "PAD",
    "SEQUENCE_NORMS",
    "TokenBatchNorm",
    "TransformerBlock",
    "SequenceClassifier",
    "PlacementNet",
    "WSConv2d",
    "RESNET_NORMS",
    "ResidualBlock",
    "ResNet",
]

PAD = 0
"""The padding token of :class:`SequenceClassifier` (token id 0)."""

SEQUENCE_NORMS: tuple[str, ...] = ("bn", "bn_masked", "ln", "rms")
"""Normalisations of :class:`SequenceClassifier`: batch norm over all (batch, time) positions
padding included, batch norm over the real tokens only, LayerNorm, RMSNorm."""


# ---------------------------------------------------------------------------------------------
# Sequences
# ---------------------------------------------------------------------------------------------


class TokenBatchNorm(nn.Module):
    """Batch norm of token features (N, T, D): per feature over the batch and the time steps.

    With ``masked=False`` the statistics include the padding positions, as a plain
    ``BatchNorm1d`` on the transposed (N, D, T) tensor does; with ``masked=True`` they come from
    the real tokens only (padding positions are set to 0).
    """

    def __init__(self, num_features: int, masked: bool = False):
        super().__init__()
        self.masked = masked
        self.bn = BatchNorm1d(num_features)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        """``h`` (N, T, D), ``mask`` (N, T) bool, True at real tokens -> (N, T, D)."""
        if not self.masked:
            return self.bn(h.transpose(1, 2)).transpose(1, 2)
        out = torch.zeros_like(h)
        out[mask] = self.bn(h[mask])
        return out


class _MaskIgnored(nn.Module):
    """Wrap a per-token norm (LayerNorm, RMSNorm) so that it takes (h, mask) like TokenBatchNorm."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        return self.norm(h)


def _sequence_norm(kind: str, d_model: int) -> nn.Module:
    if kind == "bn":
        return TokenBatchNorm(d_model)
    if kind == "bn_masked":
        return TokenBatchNorm(d_model, masked=True)
    if kind == "ln":
        return _MaskIgnored(LayerNorm(d_model))
    if kind == "rms":
        return _MaskIgnored(RMSNorm(d_model))
    raise ValueError(f"norm must be one of {SEQUENCE_NORMS}, got {kind!r}")


class TransformerBlock(nn.Module):
    """A pre-norm transformer block: ``h + attn(norm1(h))``, then ``h + mlp(norm2(h))``.

    Attention ignores the padding positions as keys (``key_padding_mask``).
    """

    def __init__(self, d_model: int, num_heads: int, norm: str, mlp_ratio: int = 2):
        super().__init__()
        self.norm1 = _sequence_norm(norm, d_model)
        self.attention = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.norm2 = _sequence_norm(norm, d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model),
            nn.GELU(),
            nn.Linear(mlp_ratio * d_model, d_model),
        )

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        """``h`` (N, T, D), ``mask`` (N, T) True at real tokens -> (N, T, D)."""
        a = self.norm1(h, mask)
        a, _ = self.attention(a, a, a, key_padding_mask=~mask, need_weights=False)
        h = h + a
        return h + self.mlp(self.norm2(h, mask))


class SequenceClassifier(nn.Module):
    """Classify padded token sequences with a few pre-norm transformer blocks.

    Input: token ids (N, T) as any dtype (floats from a :class:`~bncourse.data.Dataset` are
    rounded), with :data:`PAD` after the end of each sequence. Tokens are embedded, a learned
    position embedding is added, the blocks run with the padding mask, a final norm follows, and
    the real tokens are averaged into one vector per sequence for the linear head.

    Parameters
    ----------
    vocab_size : int
        Number of token ids, PAD included.
    max_len : int
        Longest sequence (T).
    num_classes : int
    d_model : int, default 32
    num_heads : int, default 2
    num_layers : int, default 2
    norm : {"bn", "bn_masked", "ln", "rms"}, default "ln"
    seed : int, optional
        Seed of the initial parameters (without disturbing the global generator).
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        num_classes: int,
        d_model: int = 32,
        num_heads: int = 2,
        num_layers: int = 2,
        norm: str = "ln",
        seed: int | None = None,
    ):
        super().__init__()
        if norm not in SEQUENCE_NORMS:
            raise ValueError(f"norm must be one of {SEQUENCE_NORMS}, got {norm!r}")
        self.norm_name = norm
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=PAD)
            self.position = nn.Parameter(0.1 * torch.randn(max_len, d_model))
            self.blocks = nn.ModuleList(
                TransformerBlock(d_model, num_heads, norm) for _ in range(num_layers)
            )
            self.final_norm = _sequence_norm(norm, d_model)
            self.head = nn.Linear(d_model, num_classes)

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The final token features (N, T, D) (after the final norm) and the mask (N, T)."""
        tokens = x.round().long()
        mask = tokens != PAD
        h = self.embedding(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h, mask)
        return self.final_norm(h, mask), mask

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, num_classes) of token ids ``x`` (N, T)."""
        h, mask = self.features(x)
        weights = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        return self.head(pooled)


# ---------------------------------------------------------------------------------------------
# Batch norm before or after the nonlinearity
# ---------------------------------------------------------------------------------------------


class PlacementNet(nn.Module):
    """A digits MLP or CNN from :mod:`bncourse.models` with BN before or after the nonlinearity.

    ``placement="before"`` computes each hidden block as ``activation(BN(W x))``, as the paper
    does (and as ``base`` does); ``"after"`` as ``BN(activation(W x))``. The parameters are
    ``base``'s own (build ``base`` with ``norm="bn"``), so both placements can start from the same
    weights.

    Parameters
    ----------
    base : MLP or CNN
        Built by :func:`bncourse.models.make_mlp` or :func:`bncourse.models.make_cnn` with BN.
    placement : {"before", "after"}
    """

    def __init__(self, base: MLP | CNN, placement: str = "before"):
        super().__init__()
        if placement not in ("before", "after"):
            raise ValueError(f"placement must be 'before' or 'after', got {placement!r}")
        self.blocks = base.hidden if isinstance(base, MLP) else base.blocks
        if any(getattr(block, "norm", None) is None for block in self.blocks):
            raise ValueError("base must be built with norm='bn' (every block needs a norm)")
        self.base = base
        self.placement = placement

    def forward_with_preactivations(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Logits and each hidden block's output (what the next layer receives).

        Named like :meth:`bncourse.models.MLP.forward_with_preactivations` so that
        :func:`bncourse.training.train` can record the statistics of these outputs.
        """
        is_cnn = isinstance(self.base, CNN)
        h = self.base._as_images(x) if is_cnn else x.flatten(1)
        outputs = []
        for block in self.blocks:
            z = block.conv(h) if is_cnn else block.linear(h)
            if self.placement == "before":
                h = block.activation(block.norm(z))
            else:
                h = block.norm(block.activation(z))
            if is_cnn:
                h = block.pool(h)
            outputs.append(h)
        return self.base.output(h.flatten(1)), outputs

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, num_classes)."""
        return self.forward_with_preactivations(x)[0]


# ---------------------------------------------------------------------------------------------
# Residual networks
# ---------------------------------------------------------------------------------------------

RELU_GAIN = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))
"""The factor that restores unit variance after a ReLU of a unit Gaussian (Brock et al. 2021)."""


class WSConv2d(nn.Conv2d):
    """A convolution with standardised weights: each filter has mean 0 and variance 1 over its
    fan-in (Qiao et al. 2019), recomputed from the raw weight at every call.

    With ``scaled=True`` the standardised weight is also divided by ``sqrt(fan_in)`` and
    multiplied by ``gain`` (NF-ResNets' scaled weight standardisation, Brock et al. 2021), so a
    unit-variance input gives a unit-variance output before the nonlinearity.
    """

    def __init__(self, *args, scaled: bool = False, gain: float = 1.0, eps: float = 1e-4, **kw):
        super().__init__(*args, **kw)
        self.scaled, self.gain, self.eps = scaled, gain, eps

    def standardized_weight(self) -> Tensor:
        """The weight actually used, shape (out_channels, in_channels, kh, kw)."""
        w = self.weight
        fan_in = w[0].numel()
        variance, mean = torch.var_mean(w, dim=(1, 2, 3), correction=0, keepdim=True)
        if self.scaled:
            return self.gain * (w - mean) * torch.rsqrt(variance * fan_in + self.eps)
        return (w - mean) * torch.rsqrt(variance + self.eps)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


RESNET_NORMS: tuple[str, ...] = ("bn", "gn_ws", "none", "skipinit", "fixup", "nf")
"""How :class:`ResNet` normalises (or does not): batch norm, GroupNorm + weight standardisation,
nothing (plain He init), SkipInit, Fixup, NF-ResNet blocks with scaled weight standardisation."""


class _Scalar(nn.Module):
    """A learned scalar added (``kind="bias"``) or multiplied (``"scale"``)."""

    def __init__(self, kind: str, value: float):
        super().__init__()
        self.kind = kind
        self.value = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.value if self.kind == "bias" else x * self.value


def _conv(channels: int, norm: str) -> nn.Conv2d:
    """The 3x3 convolution of a residual branch for ``norm``."""
    if norm == "gn_ws":
        return WSConv2d(channels, channels, 3, padding=1, bias=False)
    if norm == "nf":
        return WSConv2d(channels, channels, 3, padding=1, scaled=True, gain=RELU_GAIN)
    return nn.Conv2d(channels, channels, 3, padding=1, bias=norm != "bn")


def _make_norm(norm: str, channels: int) -> nn.Module:
    """BatchNorm2d for "bn", GroupNorm (8 groups where possible) for "gn_ws", else identity."""
    if norm == "bn":
        return BatchNorm2d(channels)
    if norm == "gn_ws":
        return GroupNorm(math.gcd(channels, 8), channels)
    return nn.Identity()


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions in a residual branch, post- or pre-activation.

    * post-activation (He et al. 2016a): ``relu(x + N2(conv2(relu(N1(conv1(x))))))``;
    * pre-activation (He et al. 2016b): ``x + conv2(relu(N2(conv1(relu(N1(x))))))``.

    ``N`` is BatchNorm2d (``"bn"``), GroupNorm with standardised convolutions (``"gn_ws"``) or
    nothing. The normaliser-free variants use pre-activation without ``N``: ``"none"`` as is,
    ``"skipinit"`` multiplies the branch by a learned scalar starting at 0, ``"fixup"`` starts
    the last convolution at 0, scales the first by ``num_blocks ** -0.5`` and adds scalar biases
    and a scale, ``"nf"`` computes ``x + alpha * branch(x / beta)`` with scaled WS convolutions.

    Parameters
    ----------
    channels : int
    norm : one of :data:`RESNET_NORMS`
    preactivation : bool
        Pre- (True) or post-activation (False; only for ``"bn"``, ``"gn_ws"``, ``"none"``).
    zero_init_last_gamma : bool
        Start the last norm's gamma at 0 (post-activation with a norm only; Goyal et al. 2017).
    num_blocks : int
        Depth of the network (Fixup's scaling).
    alpha, beta : float
        NF blocks: branch scale and expected standard deviation of the block's input.
    """

    def __init__(
        self,
        channels: int,
        norm: str = "bn",
        preactivation: bool = True,
        zero_init_last_gamma: bool = False,
        num_blocks: int = 1,
        alpha: float = 0.2,
        beta: float = 1.0,
    ):
        super().__init__()
        if norm not in RESNET_NORMS:
            raise ValueError(f"norm must be one of {RESNET_NORMS}, got {norm!r}")
        if not preactivation and norm not in ("bn", "gn_ws", "none"):
            raise ValueError(f"norm={norm!r} blocks are pre-activation blocks")
        if zero_init_last_gamma and (preactivation or norm not in ("bn", "gn_ws")):
            raise ValueError(
                "zero_init_last_gamma needs a norm at the end of the branch: post-activation "
                "blocks with norm 'bn' or 'gn_ws'"
            )
        self.norm_name, self.preactivation = norm, preactivation
        self.alpha, self.beta = alpha, beta
        self.conv1, self.conv2 = _conv(channels, norm), _conv(channels, norm)
        if norm in ("none", "skipinit", "fixup"):
            for c in (self.conv1, self.conv2):
                nn.init.kaiming_normal_(c.weight, nonlinearity="relu")
                nn.init.zeros_(c.bias)
        self.norm1, self.norm2 = _make_norm(norm, channels), _make_norm(norm, channels)
        if zero_init_last_gamma:
            nn.init.zeros_(self.norm2.weight)
        self.scale = _Scalar("scale", 0.0) if norm == "skipinit" else nn.Identity()
        self.biases = nn.ModuleList(nn.Identity() for _ in range(4))
        if norm == "fixup":
            with torch.no_grad():
                self.conv1.weight.mul_(num_blocks**-0.5)
                self.conv2.weight.zero_()
            self.biases = nn.ModuleList(_Scalar("bias", 0.0) for _ in range(4))
            self.scale = _Scalar("scale", 1.0)

    def branch(self, x: Tensor) -> Tensor:
        """The residual branch f(x), shape (N, C, H, W)."""
        if not self.preactivation:
            return self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x)))))
        b = self.biases  # Fixup's scalar biases (identities otherwise)
        h = self.conv1(b[0](F.relu(self.norm1(x))))
        h = self.conv2(b[2](F.relu(b[1](self.norm2(h)))))
        return b[3](self.scale(h))

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, C, H, W)."""
        if self.norm_name == "nf":
            return x + self.alpha * self.branch(x / self.beta)
        if self.preactivation:
            return x + self.branch(x)
        return F.relu(x + self.branch(x))


class ResNet(nn.Module):
    """A residual network for small images: a stem convolution, ``num_blocks`` residual blocks
    at full resolution, global average pooling and a linear head.

    Flat inputs (N, C*H*W) are reshaped to ``input_shape`` first (digits: (1, 8, 8)).

    Parameters
    ----------
    num_blocks : int, default 8
    channels : int, default 16
    norm : one of :data:`RESNET_NORMS`, default "bn"
    preactivation : bool, default True
    zero_init_last_gamma : bool, default False
    num_classes : int, default 10
    input_shape : tuple of int, default (1, 8, 8)
    alpha : float, default 0.2
        NF blocks' branch scale.
    stem_stride : int, default 2
        Stride of the stem convolution (2 halves the resolution: 8x8 digits become 4x4 maps,
        which keeps deep networks cheap on a CPU).
    seed : int, optional
        Seed of the initial parameters (without disturbing the global generator).
    """

    def __init__(
        self,
        num_blocks: int = 8,
        channels: int = 16,
        norm: str = "bn",
        preactivation: bool = True,
        zero_init_last_gamma: bool = False,
        num_classes: int = 10,
        input_shape: tuple[int, int, int] = (1, 8, 8),
        alpha: float = 0.2,
        stem_stride: int = 2,
        seed: int | None = None,
    ):
        super().__init__()
        if norm not in RESNET_NORMS:
            raise ValueError(f"norm must be one of {RESNET_NORMS}, got {norm!r}")
        self.input_shape = tuple(input_shape)
        self.norm_name, self.preactivation = norm, preactivation
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            in_channels = input_shape[0]
            if norm == "nf":
                self.stem = WSConv2d(
                    in_channels, channels, 3, stride=stem_stride, padding=1, scaled=True
                )
            else:
                self.stem = nn.Conv2d(in_channels, channels, 3, stride=stem_stride, padding=1)
            blocks = []
            for index in range(num_blocks):
                beta = math.sqrt(1.0 + index * alpha**2)  # expected std of the NF stream
                blocks.append(
                    ResidualBlock(
                        channels, norm, preactivation, zero_init_last_gamma, num_blocks, alpha, beta
                    )
                )
            self.blocks = nn.ModuleList(blocks)
            self.stem_norm, self.final_norm = nn.Identity(), nn.Identity()
            if not preactivation:  # post-activation: stem conv -> norm -> relu
                self.stem_norm = _make_norm(norm, channels)
            else:  # pre-activation ends with norm -> relu
                self.final_norm = _make_norm(norm, channels)
            self.head = nn.Linear(channels, num_classes)

    def _as_images(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.input_shape) if x.dim() == 2 else x

    def stream(self, x: Tensor) -> list[Tensor]:
        """The residual stream after the stem and after each block: 1 + num_blocks tensors."""
        h = self._as_images(x)
        h = self.stem(h)
        if not self.preactivation:
            h = F.relu(self.stem_norm(h))
        states = [h]
        for block in self.blocks:
            h = block(h)
            states.append(h)
        return states

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, num_classes) of images (N, *input_shape) or flat inputs."""
        h = self.stream(x)[-1]
        if self.preactivation:
            h = F.relu(self.final_norm(h))
        return self.head(h.mean(dim=(2, 3)))
