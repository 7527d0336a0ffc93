"""Encoder layer parity with torch.nn.TransformerEncoderLayer; feed-forward; positional encodings."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import assert_close
from tunelab.core.layers import (
    EncoderLayer,
    FeedForward,
    LearnedPositionalEmbedding,
    SinusoidalPositionalEncoding,
)

B, T, C, H, FF = 3, 6, 16, 4, 32


def copy_from_torch(ours: EncoderLayer, theirs: nn.TransformerEncoderLayer) -> None:
    """Name-by-name copy; torch's packed in_proj (3C, C) is split into our q/k/v projections."""
    with torch.no_grad():
        attn = theirs.self_attn
        for proj, w, b in zip(
            (ours.attn.q_proj, ours.attn.k_proj, ours.attn.v_proj),
            attn.in_proj_weight.chunk(3),
            attn.in_proj_bias.chunk(3),
        ):
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        pairs = [
            (ours.attn.out_proj, attn.out_proj),
            (ours.ff.linear1, theirs.linear1),
            (ours.ff.linear2, theirs.linear2),
            (ours.norm1, theirs.norm1),
            (ours.norm2, theirs.norm2),
        ]
        for mine, reference in pairs:
            mine.weight.copy_(reference.weight)
            mine.bias.copy_(reference.bias)


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("torch_fast_path", [False, True])
def test_encoder_layer_matches_torch(norm_first, activation, torch_fast_path):
    theirs = nn.TransformerEncoderLayer(
        C, H, FF, dropout=0.1, activation=activation, batch_first=True, norm_first=norm_first
    ).eval()
    ours = EncoderLayer(C, H, FF, dropout=0.1, norm_first=norm_first, activation=activation).eval()
    copy_from_torch(ours, theirs)
    x = torch.randn(B, T, C)
    mask = (torch.arange(T)[None, :] < torch.tensor([6, 3, 1])[:, None]).long()  # (B, T)
    # Under no_grad torch takes its fast path (nested tensors), which returns zeros at padded
    # positions; with grad enabled it runs the ordinary path. Either way, compare real positions.
    with torch.set_grad_enabled(not torch_fast_path):
        expected = theirs(x, src_key_padding_mask=mask == 0)  # torch: True = padding
        actual = ours(x, attention_mask=mask)
    real = mask.bool()
    assert_close(actual[real], expected[real])


@pytest.mark.parametrize("norm_first", [True, False])
def test_encoder_layer_causal_matches_torch(norm_first):
    theirs = nn.TransformerEncoderLayer(C, H, FF, dropout=0.0, batch_first=True, norm_first=norm_first)
    ours = EncoderLayer(C, H, FF, dropout=0.0, norm_first=norm_first, activation="relu", attn_impl="explicit")
    copy_from_torch(ours, theirs)
    x = torch.randn(B, T, C)
    expected = theirs(x, src_mask=nn.Transformer.generate_square_subsequent_mask(T), is_causal=True)
    assert_close(ours(x, causal=True), expected)


def test_encoder_layer_dropout_acts_only_in_training():
    layer = EncoderLayer(C, H, FF, dropout=0.5)
    x = torch.randn(B, T, C)
    assert not torch.allclose(layer.train()(x), layer.eval()(x))
    assert_close(layer.eval()(x), layer.eval()(x))


def test_attention_dropout_defaults_to_dropout():
    assert EncoderLayer(C, H, FF, dropout=0.2).attn.dropout == 0.2  # like torch's encoder layer
    layer = EncoderLayer(C, H, FF, dropout=0.2, attention_dropout=0.0)
    assert layer.attn.dropout == 0.0 and layer.dropout1.p == 0.2 and layer.ff.dropout.p == 0.2


@pytest.mark.parametrize("activation, fn", [("gelu", F.gelu), ("relu", F.relu)])
def test_feed_forward_is_two_linears_around_the_activation(activation, fn):
    ff = FeedForward(C, FF, dropout=0.0, activation=activation)
    x = torch.randn(B, T, C) * 3  # wide enough that gelu and relu differ
    assert_close(ff(x), ff.linear2(fn(ff.linear1(x))))
    assert ff(x).shape == (B, T, C)


def test_unknown_activation():
    with pytest.raises(ValueError, match="swish"):
        FeedForward(C, FF, activation="swish")


@pytest.mark.parametrize("d_model", [16, 7])
def test_sinusoidal_matches_the_formula(d_model):
    pe = SinusoidalPositionalEncoding(max_len=50, d_model=d_model)
    expected = torch.zeros(50, d_model)
    for pos in range(50):
        for i in range(d_model):
            angle = pos / 10000 ** (2 * (i // 2) / d_model)
            expected[pos, i] = math.sin(angle) if i % 2 == 0 else math.cos(angle)
    x = torch.randn(2, 50, d_model)
    assert_close(pe(x) - x, expected.expand(2, -1, -1))
    assert_close(pe(x[:, :10]), x[:, :10] + expected[:10])


def test_sinusoidal_table_is_a_buffer_not_a_parameter_or_checkpoint_entry():
    pe = SinusoidalPositionalEncoding(max_len=8, d_model=4)
    assert list(pe.parameters()) == []
    assert "pe" in dict(pe.named_buffers())
    assert pe.state_dict() == {}  # rebuilt from (max_len, d_model), so checkpoints stay small


def test_learned_positional_embedding_adds_a_trained_vector_per_position():
    pos = LearnedPositionalEmbedding(max_len=10, d_model=C)
    x = torch.randn(B, T, C)
    y = pos(x)
    assert_close(y, x + pos.embedding.weight[:T])
    y.sum().backward()
    grad = pos.embedding.weight.grad
    assert (grad[:T] == B).all() and (grad[T:] == 0).all()  # only used positions learn


@pytest.mark.parametrize("module", [SinusoidalPositionalEncoding, LearnedPositionalEmbedding])
def test_sequence_longer_than_max_len(module):
    pos = module(max_len=5, d_model=C)
    with pytest.raises(ValueError, match=r"sequence length 6 is longer than max_len 5"):
        pos(torch.randn(1, 6, C))
    assert pos(torch.randn(1, 5, C)).shape == (1, 5, C)
