"""MultiHeadAttention: parity with torch.nn.MultiheadAttention, explicit == fused, masking."""

import pytest
import torch
from torch import nn

from tests.conftest import assert_close
from tunelab.core.attention import MultiHeadAttention, make_attention_bias, scaled_dot_product_attention

B, T, C, H = 3, 7, 16, 4


def padding_mask(lengths=(7, 4, 1), T=T):
    """(B, T) long mask, 1 for the first `length` positions of each row (right padding)."""
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()


def copy_from_torch(ours: MultiHeadAttention, theirs: nn.MultiheadAttention) -> None:
    """torch packs q, k, v into one in_proj (3C, C); ours keeps three Linear layers."""
    with torch.no_grad():
        for proj, w, b in zip(
            (ours.q_proj, ours.k_proj, ours.v_proj),
            theirs.in_proj_weight.chunk(3, dim=0),
            theirs.in_proj_bias.chunk(3, dim=0),
        ):
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        ours.out_proj.weight.copy_(theirs.out_proj.weight)
        ours.out_proj.bias.copy_(theirs.out_proj.bias)


@pytest.mark.parametrize("impl", ["fused", "explicit"])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_torch_multihead_attention(impl, causal):
    theirs = nn.MultiheadAttention(C, H, batch_first=True)
    ours = MultiHeadAttention(C, H, impl=impl)
    copy_from_torch(ours, theirs)
    x = torch.randn(B, T, C)
    mask = padding_mask()
    expected, _ = theirs(
        x, x, x,
        key_padding_mask=mask == 0,  # torch: True = ignore this key; ours: 1 = keep
        attn_mask=torch.ones(T, T, dtype=torch.bool).triu(1) if causal else None,  # True = not allowed
        need_weights=False,
    )
    actual = ours(x, attention_mask=mask, causal=causal)
    real = mask.bool()
    assert_close(actual[real], expected[real])


@pytest.mark.parametrize("masking", ["none", "padding", "causal", "padding+causal"])
def test_explicit_and_fused_agree_in_train_mode(masking):
    fused = MultiHeadAttention(C, H, dropout=0.0, impl="fused").train()
    explicit = MultiHeadAttention(C, H, dropout=0.0, impl="explicit").train()
    explicit.load_state_dict(fused.state_dict())
    mask = padding_mask() if "padding" in masking else None
    causal = "causal" in masking
    x = torch.randn(B, T, C, requires_grad=True)
    y_fused = fused(x, mask, causal)
    (g_fused,) = torch.autograd.grad(y_fused.square().sum(), x)
    y_explicit = explicit(x, mask, causal)
    (g_explicit,) = torch.autograd.grad(y_explicit.square().sum(), x)
    assert_close(y_explicit, y_fused, atol=1e-6, rtol=1e-6)
    assert_close(g_explicit, g_fused, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["fused", "explicit"])
def test_padding_keys_are_ignored_and_padded_queries_are_finite(impl):
    attn = MultiHeadAttention(C, H, impl=impl)
    mask = padding_mask()
    x = torch.randn(B, T, C)
    noisy = torch.where(mask.bool()[:, :, None], x, torch.randn(B, T, C) * 100)  # change only padding
    y, y_noisy = attn(x, mask), attn(noisy, mask)
    assert torch.isfinite(y).all()  # padded queries still attend to the real keys
    real = mask.bool()
    assert_close(y_noisy[real], y[real])


@pytest.mark.parametrize("impl", ["fused", "explicit"])
@pytest.mark.parametrize("causal", [False, True])
def test_fully_padded_sequence_attends_uniformly(impl, causal):
    attn = MultiHeadAttention(C, H, impl=impl)
    x = torch.randn(1, T, C)
    y = attn(x, torch.zeros(1, T, dtype=torch.long), causal=causal)
    assert torch.isfinite(y).all()
    # Every key masked: equal scores everywhere, so each query averages all the values.
    # (With causal on top, the future keys are masked by the same finite value, so still all of them.)
    expected = attn.out_proj(attn.v_proj(x).mean(dim=1, keepdim=True)).expand(1, T, C)
    assert_close(y, expected)


def test_make_attention_bias_shapes_and_values():
    mask = padding_mask()
    assert make_attention_bias(None, False, T, torch.float32) is None
    pad = make_attention_bias(mask, False, T, torch.float32)
    assert pad.shape == (B, 1, 1, T)
    neg = torch.finfo(torch.float32).min
    assert torch.equal(pad[:, 0, 0], torch.where(mask.bool(), 0.0, neg))
    causal = make_attention_bias(None, True, T, torch.float32)
    assert causal.shape == (1, 1, T, T)
    assert causal[0, 0, 2, 3] == neg and causal[0, 0, 3, 2] == 0 and causal[0, 0, 3, 3] == 0
    both = make_attention_bias(mask, True, T, torch.float32)
    assert both.shape == (B, 1, T, T)
    assert torch.isfinite(both).all()  # masks combined as booleans: never min + min = -inf
    assert both[1, 0, 5, 4] == neg and both[1, 0, 5, 3] == 0 and both[1, 0, 2, 3] == neg


@pytest.mark.parametrize("impl", ["fused", "explicit"])
def test_attention_dropout_acts_only_in_training(impl):
    attn = MultiHeadAttention(C, H, dropout=0.5, impl=impl)
    x, mask = torch.randn(B, T, C), padding_mask()
    no_dropout = MultiHeadAttention(C, H, dropout=0.0, impl=impl)
    no_dropout.load_state_dict(attn.state_dict())
    assert not torch.allclose(attn.train()(x, mask), no_dropout(x, mask))
    assert_close(attn.eval()(x, mask), no_dropout(x, mask))


def test_scaled_dot_product_attention_handles_different_query_and_key_lengths():
    # Decoders with a KV cache attend Tq new queries to Tk cached keys.
    q, k, v = torch.randn(2, H, 3, 4), torch.randn(2, H, 5, 4), torch.randn(2, H, 5, 4)
    explicit = scaled_dot_product_attention(q, k, v, impl="explicit")
    assert explicit.shape == (2, H, 3, 4)
    assert_close(explicit, scaled_dot_product_attention(q, k, v, impl="fused"))


@pytest.mark.parametrize("impl", ["fused", "explicit"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_kv_prefix_equals_attending_over_the_longer_sequence(impl, causal, padded):
    # The keys and values of P earlier positions, handed in as a prefix, give the last T queries exactly
    # what they get when the whole P+T sequence runs at once (the invariant a KV cache relies on).
    P = 3
    attn = MultiHeadAttention(C, H, impl=impl).eval()
    full = torch.randn(B, P + T, C)
    mask = padding_mask() if padded else None
    full_mask = None if mask is None else torch.cat([torch.ones(B, P, dtype=torch.long), mask], dim=1)
    expected = attn(full, full_mask, causal)[:, P:]  # (B, T, C)
    prefix = full[:, :P]
    kv = (attn._split_heads(attn.k_proj(prefix)), attn._split_heads(attn.v_proj(prefix)))  # (B, H, P, D) each
    assert_close(attn(full[:, P:], mask, causal, kv_prefix=kv), expected)


def test_make_attention_bias_with_a_prefix():
    P, neg = 2, torch.finfo(torch.float32).min
    both = make_attention_bias(padding_mask(), True, T, torch.float32, n_prefix=P)
    assert both.shape == (B, 1, T, P + T)
    assert (both[:, 0, :, :P] == 0).all()  # the prefix is visible to every query
    assert both[0, 0, 0, P] == 0 and both[0, 0, 0, P + 1] == neg  # causal over the T keys, shifted by P
    assert both[2, 0, 3, P + 1] == neg  # row 2 has one real token: key 1 is padding


def test_errors():
    with pytest.raises(ValueError, match=r"d_model \(10\).*n_heads \(4\)"):
        MultiHeadAttention(10, 4)
    with pytest.raises(ValueError, match="flash"):
        MultiHeadAttention(C, H, impl="flash")
    with pytest.raises(ValueError, match="dropout"):
        MultiHeadAttention(C, H, dropout=1.0)
    attn = MultiHeadAttention(C, H)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(B, T=7\)"):
        attn(torch.randn(B, T, C), torch.ones(B, T + 1))
    with pytest.raises(ValueError, match="d_model=16"):
        attn(torch.randn(B, T, C + 1))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_drops_with_probability_p(p):
    from tunelab.core.attention import dropout_mask

    keep = ~dropout_mask((64, 1000, 33), p)  # an odd size: the last 64-bit word is cut
    assert keep.dtype == torch.bool and keep.shape == (64, 1000, 33)
    rate = 1 - keep.float().mean().item()
    assert abs(rate - p) < 4 * (p * (1 - p) / keep.numel()) ** 0.5 + 1e-5  # within 4 standard errors
    # neighbouring entries (the four 16-bit halves of one draw) are independent
    pairs = (~keep[..., 0::2][..., :16]) & (~keep[..., 1::2][..., :16])
    assert abs(pairs.float().mean().item() - p * p) < 0.01
    generator = torch.Generator().manual_seed(3)
    first = dropout_mask((5, 7), p, generator=generator)
    assert torch.equal(first, dropout_mask((5, 7), p, generator=torch.Generator().manual_seed(3)))


def test_attention_dropout_keeps_the_expected_output_on_both_paths():
    """E[attention with dropout] = attention without: average many draws of each path."""
    x = torch.randn(2, 5, C)
    reference = MultiHeadAttention(C, H, dropout=0.0).eval()
    expected = reference(x)
    for impl in ("fused", "explicit"):
        attn = MultiHeadAttention(C, H, dropout=0.3, impl=impl).train()
        attn.load_state_dict(reference.state_dict())
        draws = torch.stack([attn(x) for _ in range(4000)])
        assert not torch.allclose(draws[0], expected)
        assert (draws.mean(0) - expected).abs().max() < 0.02, impl


@pytest.mark.parametrize("bias_kind", ["padding", "causal", "none"])
def test_cpu_dropout_attention_in_blocks_equals_one_pass_over_the_batch(monkeypatch, bias_kind):
    """The fused CPU path with dropout runs a few sequences at a time; with the same seed it computes the
    whole-batch result bit for bit (each block draws the next words of the same random stream: here a
    block holds a multiple of 4 scores), gradients included, whatever the shape of the bias."""
    import tunelab.core.attention as attention

    q, k, v = (torch.randn(5, H, T + 1, 4, requires_grad=True) for _ in range(3))
    mask = torch.ones(5, T + 1, dtype=torch.long)
    mask[1, 4:] = 0
    bias = {"padding": make_attention_bias(mask, False, T + 1, torch.float32),  # (5, 1, 1, T+1)
            "causal": make_attention_bias(None, True, T + 1, torch.float32),  # (1, 1, T+1, T+1)
            "none": None}[bias_kind]
    results = []
    for block_bytes in (2**40, 2 * H * (T + 1) ** 2 * 4):  # everything at once; blocks of 2 sequences
        monkeypatch.setattr(attention, "CPU_BLOCK_BYTES", block_bytes)
        torch.manual_seed(1)
        y = scaled_dot_product_attention(q, k, v, bias, dropout_p=0.2, impl="fused")  # (5, H, T+1, 4)
        results.append((y, *torch.autograd.grad(y.square().sum(), (q, k, v))))
    for whole, blocked in zip(*results):
        assert torch.equal(whole, blocked)
    torch.manual_seed(2)
    assert not torch.equal(scaled_dot_product_attention(q, k, v, bias, dropout_p=0.2), results[1][0])  # dropout acts


@pytest.mark.parametrize("impl", ["fused", "explicit"])
def test_heads_narrower_than_the_model_equal_the_full_attention_with_those_heads_removed(impl):
    # H * D != C once heads are pruned away: 3 heads of width 4 on a 16-wide model compute what the
    # 4-head attention computes when the 4th head's columns of out_proj are zero.
    full = MultiHeadAttention(C, H, impl=impl).eval()
    with torch.no_grad():
        full.out_proj.weight[:, 12:] = 0.0
    narrow = MultiHeadAttention(C, 3, impl=impl, d_head=4).eval()
    assert narrow.q_proj.weight.shape == (12, C) and narrow.out_proj.weight.shape == (C, 12)
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(narrow, name).weight.copy_(getattr(full, name).weight[:12])
            getattr(narrow, name).bias.copy_(getattr(full, name).bias[:12])
        narrow.out_proj.weight.copy_(full.out_proj.weight[:, :12])
        narrow.out_proj.bias.copy_(full.out_proj.bias)
    x, mask = torch.randn(B, T, C), padding_mask()
    assert_close(narrow(x, mask), full(x, mask))
    assert_close(narrow(x, causal=True), full(x, causal=True))
    assert "d_head=4" in repr(narrow) and "d_head" not in repr(full)
    with pytest.raises(ValueError, match=r"d_head \(0\)"):
        MultiHeadAttention(C, 3, d_head=0)
