"""Multi-head scaled dot-product attention, written out by hand and fused.

Vaswani et al. 2017, "Attention Is All You Need" (https://arxiv.org/abs/1706.03762), eq. 1:
    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_head) + bias) V
The explicit path spells this equation out; the fused path hands the same tensors to
`torch.nn.functional.scaled_dot_product_attention`. Both receive the same additive bias from
`make_attention_bias`, so they agree to float rounding (1e-6 in fp32).
"""

from __future__ import annotations

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
) -> Tensor | None:
    """Additive attention bias: 0 where a query may look at a key, a very negative number elsewhere.

    Masked entries get `torch.finfo(dtype).min`, not -inf: a row whose keys are all masked (a
    fully padded sequence) then gets equal scores everywhere and softmax returns uniform weights
    instead of 0/0 = NaN. Masks are combined as booleans first so two masks never add to -inf.

    Args:
        attention_mask: (B, T) long/bool, 1 = real token (keep as a key), 0 = padding; or None.
        causal: if True, query t may only look at keys 0..t (autoregressive decoding).
        T: sequence length (queries and keys).
        dtype: dtype of the attention scores the bias is added to.
        device: where to build the bias (defaults to the mask's device).

    Returns:
        None if there is nothing to mask, else a bias broadcastable to (B, H, T, T):
        (B, 1, 1, T) for padding only, (1, 1, T, T) for causal only, (B, 1, T, T) for both.
    """
    if attention_mask is None and not causal:
        return None
    if device is None and attention_mask is not None:
        device = attention_mask.device
    keep = None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[1] != T:
            raise ValueError(
                f"attention_mask must have shape (B, T={T}), got {tuple(attention_mask.shape)}"
            )
        keep = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, T)
    if causal:
        lower = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]  # (1, 1, T, T)
        keep = lower if keep is None else keep & lower  # (B, 1, T, T)
    bias = torch.zeros(keep.shape, dtype=dtype, device=device)
    return bias.masked_fill_(~keep, torch.finfo(dtype).min)


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (Vaswani et al. 2017, 3.2.2).

    MultiHead(x) = Concat(head_1..head_H) W_O, head_h = Attention(x W_Q^h, x W_K^h, x W_V^h).
    `impl="explicit"` writes the softmax out (to read and to debug); `impl="fused"` (default, the
    fast one) calls `F.scaled_dot_product_attention`. Attention dropout acts in both when training;
    on CPU torch's flash kernel has no dropout, so dropout > 0 sends the fused path to a math fallback.

    Args:
        d_model: model width C; split into `n_heads` heads of width D = C // n_heads.
        n_heads: number of heads H.
        dropout: dropout probability on the attention weights (training only).
        bias: whether the four projections have biases.
        impl: "fused" or "explicit".
    """

    def __init__(
        self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True, impl: str = "fused"
    ):
        super().__init__()
        if n_heads <= 0 or d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention impl {impl!r}; expected one of {ATTENTION_IMPLS}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"attention dropout must be in [0, 1), got {dropout}")
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_model // n_heads
        self.dropout, self.impl = dropout, impl
        # Four separate projections (not one packed in_proj) so that loading Hugging Face
        # query/key/value weights is a one-to-one name mapping.
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: Tensor, attention_mask: Tensor | None = None, causal: bool = False) -> Tensor:
        """Self-attention over `x`.

        Padding is masked as keys only: a query at a padded position still attends to the real
        keys (finite, ignored downstream). A fully padded sequence attends uniformly to all its
        positions, so each output is out_proj(mean of its value vectors): finite, never NaN.

        Args:
            x: (B, T, C) input.
            attention_mask: (B, T) 1 = real token, 0 = padding; None means all real.
            causal: mask future keys (query t sees keys <= t).

        Returns:
            (B, T, C) output.
        """
        B, T, C = x.shape
        if C != self.d_model:
            raise ValueError(f"expected input width d_model={self.d_model}, got {C}")
        q = self._split_heads(self.q_proj(x))  # (B, H, T, D)
        k = self._split_heads(self.k_proj(x))  # (B, H, T, D)
        v = self._split_heads(self.v_proj(x))  # (B, H, T, D)
        dropout_p = self.dropout if self.training else 0.0
        if self.impl == "fused" and attention_mask is None:
            # No padding: let the kernel build the causal mask itself (its fastest case).
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
        else:
            bias = make_attention_bias(attention_mask, causal, T, q.dtype, q.device)
            y = scaled_dot_product_attention(q, k, v, bias, dropout_p, self.impl)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C), heads concatenated
        return self.out_proj(y)  # (B, T, C)

    def _split_heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        # A view, not a copy: heads become a batch dimension for the matmuls.
        return x.view(B, T, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, T, D)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, dropout={self.dropout}, impl={self.impl!r}"


def scaled_dot_product_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, dropout_p: float = 0.0, impl: str = "fused"
) -> Tensor:
    """softmax(q k^T / sqrt(D) + bias) v, explicit or fused (the core shared by every attention).

    Args:
        q: (B, H, Tq, D) queries. k, v: (B, H, Tk, D) keys and values.
        bias: additive bias broadcastable to (B, H, Tq, Tk) (see `make_attention_bias`), or None.
        dropout_p: dropout on the attention weights; pass 0.0 outside training.
        impl: "fused" (F.scaled_dot_product_attention) or "explicit".

    Returns:
        (B, H, Tq, D) attended values.
    """
    if impl == "fused":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    if impl != "explicit":
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {ATTENTION_IMPLS}")
    # Scale q (Tq x D numbers) rather than the scores (Tq x Tk), and add the bias in place:
    # a (B, H, T, T) temporary is 128 MiB at B=32, H=4, T=512, and memory traffic dominates.
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)  # (B, H, Tq, Tk)
    if bias is not None:
        scores += bias  # (B, H, Tq, Tk); safe in place: matmul's backward does not need its output
    weights = scores.softmax(dim=-1)  # (B, H, Tq, Tk), each row sums to 1
    weights = F.dropout(weights, p=dropout_p, training=dropout_p > 0)  # (B, H, Tq, Tk)
    return weights @ v  # (B, H, Tq, D)
