"""Tests of bncourse.architectures: the sequence model, BN placement and residual networks."""

from __future__ import annotations

import pytest
import torch

from bncourse.architectures import (
    PAD,
    RESNET_NORMS,
    PlacementNet,
    ResidualBlock,
    ResNet,
    SequenceClassifier,
    TokenBatchNorm,
    WSConv2d,
)
from bncourse.models import make_cnn, make_mlp


def _padded_batch(lengths, max_len=10, vocab=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(len(lengths), max_len)
    for i, n in enumerate(lengths):
        x[i, :n] = torch.randint(1, vocab, (n,), generator=g).float()
    return x


@pytest.mark.parametrize("norm", ["ln", "rms"])
def test_per_token_norm_ignores_padding_and_batch_mates(norm):
    model = SequenceClassifier(7, 10, 3, d_model=16, norm=norm, seed=0).train()
    x = _padded_batch([4, 10, 2])
    alone = model(x[:1])
    torch.testing.assert_close(model(x)[:1], alone)
    longer = torch.cat([x[:1], torch.zeros(1, 5)], dim=1)  # more padding, same tokens
    model_long = SequenceClassifier(7, 15, 3, d_model=16, norm=norm, seed=0)
    model_long.load_state_dict(
        {k: (v if k != "position" else model_long.position) for k, v in model.state_dict().items()}
    )
    with torch.no_grad():
        model_long.position[:10] = model.position
    torch.testing.assert_close(model_long(longer), alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["bn", "bn_masked"])
def test_batch_norm_over_tokens_depends_on_batch_mates(norm):
    model = SequenceClassifier(7, 10, 3, d_model=16, norm=norm, seed=0).train()
    x = _padded_batch([4, 10, 2, 3])
    y = _padded_batch([4, 1, 1, 1])
    y[0] = x[0]
    assert (model(x)[0] - model(y)[0]).abs().max() > 1e-3


def test_token_batch_norm_masked_uses_real_tokens_only():
    h = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    h_changed = h.clone()
    h_changed[~mask] = 100.0  # padding values must not matter
    norm = TokenBatchNorm(4, masked=True)
    out, out_changed = norm(h, mask), norm(h_changed, mask)
    torch.testing.assert_close(out, out_changed)
    assert out[~mask].abs().max() == 0
    real = out[mask]
    torch.testing.assert_close(real.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    plain = TokenBatchNorm(4)
    assert (plain(h, mask)[mask] - plain(h_changed, mask)[mask]).abs().max() > 0.1


def test_sequence_classifier_rejects_unknown_norm():
    with pytest.raises(ValueError, match="norm must be one of"):
        SequenceClassifier(5, 4, 2, norm="bn2")
    assert PAD == 0


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_placement_net_orders_norm_and_relu(net):
    base = (
        make_mlp(64, 10, depth=2, width=20, activation="relu", norm="bn", seed=0)
        if net == "mlp"
        else make_cnn(10, channels=(4, 8), norm="bn", seed=0)
    )
    x = torch.randn(32, 64)
    _, before = PlacementNet(base, "before").forward_with_preactivations(x)
    _, after = PlacementNet(base, "after").forward_with_preactivations(x)
    assert before[0].min() >= 0  # ReLU last
    if net == "mlp":  # BN last: zero mean, unit variance per unit in training mode
        torch.testing.assert_close(after[0].mean(0), torch.zeros(20), atol=1e-5, rtol=0)
        assert after[0].min() < 0
    with pytest.raises(ValueError, match="placement"):
        PlacementNet(base, "middle")
    with pytest.raises(ValueError, match="norm='bn'"):
        PlacementNet(make_mlp(64, 10, depth=1, width=8, activation="relu"), "before")


def test_ws_conv_standardises_filters():
    conv = WSConv2d(3, 5, 3, bias=False)
    with torch.no_grad():
        conv.weight.mul_(10.0)  # eps (1e-4) is then negligible against the variance
    w = conv.standardized_weight()
    torch.testing.assert_close(w.mean(dim=(1, 2, 3)), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(w.var(dim=(1, 2, 3), correction=0), torch.ones(5), atol=1e-3, rtol=0)
    scaled = WSConv2d(3, 5, 3, bias=False, scaled=True)
    with torch.no_grad():
        scaled.weight.mul_(10.0)
    var = scaled.standardized_weight().var(dim=(1, 2, 3), correction=0)
    torch.testing.assert_close(var * 27, torch.ones(5), atol=1e-3, rtol=0)


@pytest.mark.parametrize("norm", RESNET_NORMS)
def test_resnet_runs_and_backpropagates(norm):
    model = ResNet(3, 8, norm=norm, seed=0)
    x = torch.randn(6, 64)
    logits = model(x)
    assert logits.shape == (6, 10)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("norm", ["skipinit", "fixup"])
def test_zero_branches_make_blocks_the_identity(norm):
    block = ResidualBlock(8, norm, num_blocks=4)
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(block(x), x)


def test_zero_gamma_post_activation_block_is_the_identity_on_relu_input():
    block = ResidualBlock(8, "bn", preactivation=False, zero_init_last_gamma=True)
    x = torch.relu(torch.randn(4, 8, 4, 4))
    torch.testing.assert_close(block(x), x)


def test_stream_variance_grows_without_norm_and_not_with_zero_gamma():
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        plain = [h.var().item() for h in ResNet(12, 8, norm="none", seed=0).stream(x)]
        zero = ResNet(12, 8, norm="bn", preactivation=False, zero_init_last_gamma=True, seed=0)
        flat = [h.var().item() for h in zero.stream(x)]
    assert plain[-1] > 10 * plain[0]
    assert max(flat) == pytest.approx(min(flat), rel=1e-5)


def test_resnet_argument_errors():
    with pytest.raises(ValueError, match="norm must be one of"):
        ResNet(2, 8, norm="ln")
    with pytest.raises(ValueError, match="pre-activation"):
        ResidualBlock(8, "nf", preactivation=False)
    with pytest.raises(ValueError, match="zero_init_last_gamma"):
        ResidualBlock(8, "bn", preactivation=True, zero_init_last_gamma=True)


def test_seed_gives_the_same_network_without_touching_the_global_generator():
    torch.manual_seed(3)
    state = torch.get_rng_state()
    a, b = ResNet(2, 8, seed=1), ResNet(2, 8, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
