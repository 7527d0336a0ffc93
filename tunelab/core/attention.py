"""Multi-head scaled dot-product attention, written out by hand and fused.

Vaswani et al. 2017, "Attention Is All You Need" (https://arxiv.org/abs/1706.03762), eq. 1:
    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_head) + bias) V
The explicit path spells this equation out; the fused path hands the same tensors to
`torch.nn.functional.scaled_dot_product_attention`. Both receive the same additive bias from
`make_attention_bias`, so they agree to float rounding (1e-6 in fp32).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTENTION_IMPLS = ("fused", "explicit")


def make_attention_bias(
    attention_mask: Tensor | None,
    causal: bool,
    T: int,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    n_prefix: int = 0,
) -> Tensor | None:
    """Additive attention bias: 0 where a query may look at a key, a very negative number elsewhere.

    Masked entries get `torch.finfo(dtype).min`, not -inf: a row whose keys are all masked (a
    fully padded sequence) then gets equal scores everywhere and softmax returns uniform weights
    instead of 0/0 = NaN. Masks are combined as booleans first so two masks never add to -inf.

    Args:
        attention_mask: (B, T) long/bool, 1 = real token (keep as a key), 0 = padding; or None. With
            n_prefix, (B, P+T) covers the prefix too (a KV cache whose past has padding); (B, T) leaves
            the prefix visible everywhere.
        causal: if True, query t may only look at keys 0..t (autoregressive decoding).
        T: sequence length (queries and keys).
        dtype: dtype of the attention scores the bias is added to.
        device: where to build the bias (defaults to the mask's device).
        n_prefix: P key/value positions in front of the T keys (prefix tuning, a KV cache), visible to
            every query; causal query t then sees keys 0..P+t.

    Returns:
        None if there is nothing to mask, else a bias broadcastable to (B, H, T, P+T):
        (B, 1, 1, P+T) for padding only, (1, 1, T, P+T) for causal only, (B, 1, T, P+T) for both.
    """
    if attention_mask is None and not causal:
        return None
    if device is None and attention_mask is not None:
        device = attention_mask.device
    keep = None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[1] not in (T, n_prefix + T):
            raise ValueError(
                f"attention_mask must have shape (B, T={T})"
                + (f" or (B, P+T={n_prefix + T})" if n_prefix else "") + f", got {tuple(attention_mask.shape)}"
            )
        keep = attention_mask.to(device=device, dtype=torch.bool)  # (B, T) or (B, P+T)
        if n_prefix and keep.shape[1] == T:
            keep = torch.cat([keep.new_ones(keep.shape[0], n_prefix), keep], dim=1)  # (B, P+T)
        keep = keep[:, None, None, :]  # (B, 1, 1, P+T)
    if causal:
        lower = torch.ones(T, n_prefix + T, dtype=torch.bool, device=device).tril(n_prefix)
        lower = lower[None, None]  # (1, 1, T, P+T)
        keep = lower if keep is None else keep & lower  # (B, 1, T, P+T)
    bias = torch.zeros(keep.shape, dtype=dtype, device=device)
    return bias.masked_fill_(~keep, torch.finfo(dtype).min)


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (Vaswani et al. 2017, 3.2.2).

    MultiHead(x) = Concat(head_1..head_H) W_O, head_h = Attention(x W_Q^h, x W_K^h, x W_V^h).
    `impl="explicit"` writes the softmax out (to read and to debug); `impl="fused"` (default, the
    fast one) calls `F.scaled_dot_product_attention`. Attention dropout acts in both when training;
    on CPU, where torch's flash kernel has no dropout, both take the explicit path with `dropout_mask`.

    Args:
        d_model: model width C (input and output).
        n_heads: number of heads H.
        d_head: width D of each head; None means C // n_heads. The heads together are H * D wide, which
            differs from C once some heads are removed (structured pruning, Michel et al. 2019).
        dropout: dropout probability on the attention weights (training only).
        bias: whether the four projections have biases.
        impl: "fused" or "explicit".
    """

    def __init__(
        self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True, impl: str = "fused",
        d_head: int | None = None,
    ):
        super().__init__()
        if d_head is None and (n_heads <= 0 or d_model % n_heads != 0):
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if d_head is not None and (n_heads <= 0 or d_head <= 0):
            raise ValueError(f"n_heads ({n_heads}) and d_head ({d_head}) must be positive")
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention impl {impl!r}; expected one of {ATTENTION_IMPLS}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"attention dropout must be in [0, 1), got {dropout}")
        self.d_model, self.n_heads = d_model, n_heads
        self.d_head = d_model // n_heads if d_head is None else d_head
        self.dropout, self.impl = dropout, impl
        inner = n_heads * self.d_head  # H * D: d_model unless heads were removed
        # Four separate projections (not one packed in_proj) so that loading Hugging Face
        # query/key/value weights is a one-to-one name mapping.
        self.q_proj = nn.Linear(d_model, inner, bias=bias)
        self.k_proj = nn.Linear(d_model, inner, bias=bias)
        self.v_proj = nn.Linear(d_model, inner, bias=bias)
        self.out_proj = nn.Linear(inner, d_model, bias=bias)

    def forward(
        self,
        x: Tensor,
        attention_mask: Tensor | None = None,
        causal: bool = False,
        kv_prefix: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Self-attention over `x`, optionally also over P extra key/value positions in front of it.

        Padding is masked as keys only: a query at a padded position still attends to the real
        keys (finite, ignored downstream). A fully padded sequence attends uniformly to all its
        positions, so each output is out_proj(mean of its value vectors): finite, never NaN.

        Args:
            x: (B, T, C) input.
            attention_mask: (B, T) 1 = real token, 0 = padding; None means all real.
            causal: mask future keys (query t sees keys <= t).
            kv_prefix: (keys, values), each (B, H, P, D), placed before the T keys and values of `x` and
                never masked: the learned prefixes of prefix tuning (Li & Liang 2021), or a KV cache.

        Returns:
            (B, T, C) output.
        """
        B, T, C = x.shape
        if C != self.d_model:
            raise ValueError(f"expected input width d_model={self.d_model}, got {C}")
        q = self._split_heads(self.q_proj(x))  # (B, H, T, D)
        k = self._split_heads(self.k_proj(x))  # (B, H, T, D)
        v = self._split_heads(self.v_proj(x))  # (B, H, T, D)
        n_prefix = 0
        if kv_prefix is not None:
            k = torch.cat([kv_prefix[0], k], dim=2)  # (B, H, P+T, D)
            v = torch.cat([kv_prefix[1], v], dim=2)  # (B, H, P+T, D)
            n_prefix = kv_prefix[0].shape[2]
        dropout_p = self.dropout if self.training else 0.0
        if (self.impl == "fused" and attention_mask is None and not (causal and n_prefix)
                and (dropout_p == 0.0 or x.device.type != "cpu")):
            # No padding: let the kernel build the causal mask itself (its fastest case). Its causal mask is
            # aligned top-left, which is wrong once a prefix shifts the keys; that case takes the bias below.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
        else:
            bias = make_attention_bias(attention_mask, causal, T, q.dtype, q.device, n_prefix)
            y = scaled_dot_product_attention(q, k, v, bias, dropout_p, self.impl)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.d_head)  # (B, T, H*D), heads concatenated
        return self.out_proj(y)  # (B, T, C)

    def _split_heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        # A view, not a copy: heads become a batch dimension for the matmuls.
        return x.view(B, T, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, T, D)

    def extra_repr(self) -> str:
        d_head = "" if self.n_heads * self.d_head == self.d_model else f", d_head={self.d_head}"
        return f"d_model={self.d_model}, n_heads={self.n_heads}{d_head}, dropout={self.dropout}, impl={self.impl!r}"


# On a CPU with dropout, attention runs a few sequences at a time so that each (H, Tq, Tk) block of scores
# (3 MiB for MiniLM at T=256) stays in cache through its five elementwise passes (bias, softmax, dropout and
# their backward): 25% less attention time than one pass over the whole (B, H, Tq, Tk) tensor
# (benchmarks/peft_speed.py).
CPU_BLOCK_BYTES = 8 * 2**20


def scaled_dot_product_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, dropout_p: float = 0.0, impl: str = "fused"
) -> Tensor:
    """softmax(q k^T / sqrt(D) + bias) v, explicit or fused (the core shared by every attention).

    With attention dropout on a CPU, "fused" takes the explicit path: torch's SDPA has no CPU kernel
    with dropout and falls back to the same math with a float Bernoulli mask, whose generation alone
    costs ~6x more than `dropout_mask`'s (benchmarks/encoder_speed.py). It runs in blocks of
    sequences that fit CPU_BLOCK_BYTES; the explicit impl computes the whole batch at once.

    Args:
        q: (B, H, Tq, D) queries. k, v: (B, H, Tk, D) keys and values.
        bias: additive bias broadcastable to (B, H, Tq, Tk) (see `make_attention_bias`), or None.
        dropout_p: dropout on the attention weights; pass 0.0 outside training.
        impl: "fused" (F.scaled_dot_product_attention) or "explicit".

    Returns:
        (B, H, Tq, D) attended values.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {ATTENTION_IMPLS}")
    if impl == "fused" and (dropout_p == 0.0 or q.device.type != "cpu"):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    B, H, Tq, _ = q.shape
    rows = max(1, CPU_BLOCK_BYTES // (H * Tq * k.shape[2] * q.element_size()))  # sequences per block
    if impl == "explicit" or rows >= B:
        return _explicit_attention(q, k, v, bias, dropout_p)
    # split, not q[i:i + rows]: the backward of a split is one cat, that of each slice a zero-filled (B, H, T, D)
    biases = itertools.repeat(bias) if bias is None or bias.shape[0] == 1 else bias.split(rows)
    blocks = [_explicit_attention(*qkv, b, dropout_p) for *qkv, b in zip(q.split(rows), k.split(rows),
                                                                        v.split(rows), biases)]
    return torch.cat(blocks)  # (B, H, Tq, D)


def _explicit_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, dropout_p: float) -> Tensor:
    """Eq. 1 written out, with `dropout_mask` dropout on the weights. Shapes as scaled_dot_product_attention."""
    # Scale q (Tq x D numbers) rather than the scores (Tq x Tk), and add the bias in place:
    # a (B, H, T, T) temporary is 128 MiB at B=32, H=4, T=512, and memory traffic dominates.
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)  # (B, H, Tq, Tk)
    if bias is not None:
        scores += bias  # (B, H, Tq, Tk); safe in place: matmul's backward does not need its output
    weights = scores.softmax(dim=-1)  # (B, H, Tq, Tk), each row sums to 1
    if dropout_p == 0.0:
        return weights @ v  # (B, H, Tq, D)
    # Dropout zeroes weights and scales the survivors by 1 / (1 - p). The scale is applied to the
    # (B, H, Tq, D) output instead of the Tk-times larger weights: (w * keep) v / (1-p) = (w * keep / (1-p)) v.
    # torch.where writes the result in one pass (masked_fill copies first), forward and backward.
    weights = torch.where(dropout_mask(weights.shape, dropout_p, weights.device), 0.0, weights)  # (B, H, Tq, Tk)
    return (weights @ v) * (1.0 / (1.0 - dropout_p))  # (B, H, Tq, D)


def dropout_mask(shape, p: float, device=None, generator: torch.Generator | None = None) -> Tensor:
    """A boolean drop-mask, each entry True with probability p (to 1/65536), from 16-bit random integers.

    One 64-bit random draw gives four 16-bit uniforms, so this draws a quarter of the random numbers a
    float Bernoulli mask (`F.dropout`) draws, and the mask is 1 byte per entry instead of 4. An entry
    is dropped when its uniform u in [0, 65536) is below round(65536 p): P(drop) = round(65536 p) / 65536,
    within 7.7e-6 of p.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), None, generator=generator)  # every bit random
    uniforms = words.view(torch.int16)[:numel].view(shape)  # signed: u - 32768, u uniform in [0, 65536)
    return uniforms < round(65536 * p) - 32768
