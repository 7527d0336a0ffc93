"""Transformer encoder building blocks: feed-forward, encoder layer, positional encodings.

Vaswani et al. 2017, "Attention Is All You Need" (https://arxiv.org/abs/1706.03762), sections
3.1-3.5; pre-norm from Xiong et al. 2020, "On Layer Normalization in the Transformer
Architecture" (https://arxiv.org/abs/2002.04745). Submodule names follow
`torch.nn.TransformerEncoderLayer` (linear1/linear2/norm1/norm2/dropout1/dropout2) so the parity
test copies weights name by name.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tunelab.core.attention import MultiHeadAttention

# "gelu" is the exact erf form (BERT); "gelu_tanh" the tanh approximation (GPT-2, Hugging Face "gelu_new").
ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": partial(F.gelu, approximate="tanh"), "relu": F.relu}


class FeedForward(nn.Module):
    """Position-wise feed-forward network (Vaswani et al. 2017, eq. 2).

    FFN(x) = linear2(dropout(act(linear1(x)))), applied to every position independently;
    act is exact (erf) GELU, its tanh approximation, or ReLU.

    Args:
        d_model: input and output width C.
        d_ff: hidden width (usually 4 * d_model).
        dropout: dropout on the hidden activations (training only).
        activation: "gelu", "gelu_tanh" or "relu".
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.1, activation: str = "gelu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]
        self.linear1 = nn.Linear(d_model, d_ff)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        h = self.dropout(self.activation(self.linear1(x)))  # (B, T, d_ff)
        return self.linear2(h)  # (B, T, C)

    def extra_repr(self) -> str:
        return f"activation={self.activation_name!r}"


class EncoderLayer(nn.Module):
    """One transformer encoder layer: self-attention then feed-forward, each with a residual.

    post-norm (Vaswani et al. 2017): x = LN(x + Attn(x));  x = LN(x + FFN(x))
    pre-norm (Xiong et al. 2020):    x = x + Attn(LN(x));  x = x + FFN(LN(x))
    Pre-norm (the default) trains stably without warmup; its stack needs a final LayerNorm.

    Args:
        d_model: model width C. n_heads: attention heads. d_ff: feed-forward hidden width.
        dropout: dropout on both residual branches (and the feed-forward activations, see below).
        attention_dropout: dropout on the attention weights; None means `dropout` (as in torch).
        activation_dropout: dropout on the feed-forward hidden activations; None means `dropout`
            (as in torch). BERT has none there: 0.
        norm_first: True for pre-norm, False for post-norm.
        activation: "gelu", "gelu_tanh" or "relu". attn_impl: "fused" or "explicit".
        layer_norm_eps: epsilon of both LayerNorms.
    """

    residual_branches = ("dropout1", "dropout2")  # the last module of each branch (adapters go there)

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.1,
        norm_first: bool = True,
        activation: str = "gelu",
        attn_impl: str = "fused",
        layer_norm_eps: float = 1e-5,
        attention_dropout: float | None = None,
        activation_dropout: float | None = None,
    ):
        super().__init__()
        self.d_model, self.norm_first = d_model, norm_first
        attention_dropout = dropout if attention_dropout is None else attention_dropout
        activation_dropout = dropout if activation_dropout is None else activation_dropout
        self.attn = MultiHeadAttention(d_model, n_heads, dropout=attention_dropout, impl=attn_impl)
        self.ff = FeedForward(d_model, d_ff, dropout=activation_dropout, activation=activation)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: Tensor, attention_mask: Tensor | None = None, causal: bool = False,
                kv_prefix: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x: (B, T, C); attention_mask: (B, T) 1 = real, 0 = padding, or None; kv_prefix: extra (keys,
        values) for the attention, each (B, H, P, D) (see `MultiHeadAttention`). Returns (B, T, C)."""
        if self.norm_first:
            x = x + self.dropout1(self.attn(self.norm1(x), attention_mask, causal, kv_prefix))  # (B, T, C)
            x = x + self.dropout2(self.ff(self.norm2(x)))  # (B, T, C)
        else:
            x = self.norm1(x + self.dropout1(self.attn(x, attention_mask, causal, kv_prefix)))  # (B, T, C)
            x = self.norm2(x + self.dropout2(self.ff(x)))  # (B, T, C)
        return x


def _check_length(T: int, max_len: int) -> None:
    if T > max_len:
        raise ValueError(
            f"sequence length {T} is longer than max_len {max_len}; truncate the input "
            f"(e.g. the collator's max_length) or build the model with a larger max_len"
        )


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed sinusoidal positions added to the input (Vaswani et al. 2017, section 3.5).

    PE[pos, 2i] = sin(pos / 10000^(2i / d_model)),  PE[pos, 2i+1] = cos(pos / 10000^(2i / d_model)).
    The table is a non-persistent buffer: rebuilt from (max_len, d_model), never saved in a checkpoint.

    Args:
        max_len: longest sequence accepted.
        d_model: model width C (odd widths drop the last cosine).
    """

    def __init__(self, max_len: int, d_model: int):
        super().__init__()
        self.max_len, self.d_model = max_len, d_model
        pos = torch.arange(max_len, dtype=torch.float32)[:, None]  # (max_len, 1)
        # 1 / 10000^(2i/d) computed as exp(-2i ln(10000) / d) to stay accurate in float32.
        inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        angles = pos * inv_freq  # (max_len, ceil(C/2))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(angles)
        pe[:, 1::2] = torch.cos(angles[:, : d_model // 2])
        self.register_buffer("pe", pe, persistent=False)  # (max_len, C)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, C) -> x + PE[:T] (B, T, C)."""
        _check_length(x.shape[1], self.max_len)
        return x + self.pe[: x.shape[1]].to(x.dtype)  # (B, T, C)

    def extra_repr(self) -> str:
        return f"max_len={self.max_len}, d_model={self.d_model}"


class LearnedPositionalEmbedding(nn.Module):
    """A trained vector per position added to the input (BERT, GPT-2; Gehring et al. 2017).

    x[:, t] + P[t], with P an (max_len, d_model) embedding initialised N(0, 0.02^2) as in BERT/GPT-2.

    Args:
        max_len: number of positions (longest sequence accepted).
        d_model: model width C.
    """

    def __init__(self, max_len: int, d_model: int):
        super().__init__()
        self.max_len = max_len
        self.embedding = nn.Embedding(max_len, d_model)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, C) -> x + P[:T] (B, T, C)."""
        _check_length(x.shape[1], self.max_len)
        return x + self.embedding.weight[: x.shape[1]]  # (B, T, C)

    def extra_repr(self) -> str:
        return f"max_len={self.max_len}"
