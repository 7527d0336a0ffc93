"""A transformer encoder text classifier built from scratch, configured by a dataclass.

tokens -> embedding * sqrt(d_model) + positions -> [cls] -> N encoder layers -> final LayerNorm
(pre-norm only) -> pooling (mean / max / cls, padding ignored) -> dropout -> linear head -> logits.
Vaswani et al. 2017 (https://arxiv.org/abs/1706.03762) for the encoder; Devlin et al. 2019
(BERT, https://arxiv.org/abs/1810.04805) for classifying from a prepended [CLS] vector.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor, nn

from tunelab.core.attention import ATTENTION_IMPLS
from tunelab.core.layers import (
    ACTIVATIONS,
    EncoderLayer,
    LearnedPositionalEmbedding,
    SinusoidalPositionalEncoding,
)

POOLINGS = ("mean", "max", "cls")
POSITIONALS = {"sinusoidal": SinusoidalPositionalEncoding, "learned": LearnedPositionalEmbedding}


@dataclass
class ClassifierConfig:
    """Hyper-parameters of `TransformerClassifier`; JSON-safe via `to_dict` / `from_dict`.

    `dropout` applies to feed-forward activations, residual branches and the pooled vector before
    the head; `embedding_dropout=None` means "same as `dropout`". `attention_dropout` defaults to 0:
    on CPU, dropout on the attention weights takes attention off torch's flash kernel onto the
    explicit (B, H, T, T) path, which costs time and memory. Set it to 0.1 for BERT-like regularisation.

    `bigram_buckets > 0` adds to each token's embedding a learned vector for the pair (token, next
    token), looked up in a table of that many rows by hashing the pair (the "hashing trick" of
    fastText, Joulin et al. 2017, https://arxiv.org/abs/1607.01759). Word order then enters before
    the first attention layer: "not good" gets its own vector. 0 turns it off.

    `token_dropout` hides each real token from attention and pooling with that probability while
    training ("word dropout" of the deep averaging network, Iyyer et al. 2015,
    https://aclanthology.org/P15-1162): the model cannot lean on any single word, which matters
    most for the many rare words and bigrams it could otherwise memorise. Evaluation sees every token.
    """

    vocab_size: int
    num_classes: int = 2
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 512
    max_len: int = 512
    dropout: float = 0.1
    embedding_dropout: float | None = None
    attention_dropout: float = 0.0
    norm_first: bool = True
    positional: str = "sinusoidal"
    pooling: str = "mean"
    attn_impl: str = "fused"
    activation: str = "gelu"
    pad_id: int = 0
    layer_norm_eps: float = 1e-5
    bigram_buckets: int = 0
    token_dropout: float = 0.0

    def __post_init__(self):
        ints = ("vocab_size", "num_classes", "d_model", "n_heads", "n_layers", "d_ff", "max_len", "pad_id",
                "bigram_buckets")
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an int, got {value!r}")
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        for name in ("n_layers", "bigram_buckets"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        for name in ("dropout", "embedding_dropout", "attention_dropout", "token_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        _check_choice("positional", self.positional, tuple(POSITIONALS))
        _check_choice("pooling", self.pooling, POOLINGS)
        _check_choice("attn_impl", self.attn_impl, ATTENTION_IMPLS)
        _check_choice("activation", self.activation, tuple(ACTIVATIONS))
        if not isinstance(self.norm_first, bool):
            raise ValueError(f"norm_first must be a bool, got {self.norm_first!r}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"pad_id {self.pad_id} is not a valid token id for vocab_size {self.vocab_size}")

    @classmethod
    def tiny(cls, **overrides) -> "ClassifierConfig":
        """A few-thousand-parameter config for tests and quick runs (no dropout: deterministic)."""
        values = dict(vocab_size=100, d_model=16, n_heads=2, n_layers=2, d_ff=32, max_len=32, dropout=0.0)
        return cls(**{**values, **overrides})

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict (ints, floats, bools, strings, None)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ClassifierConfig":
        """Inverse of `to_dict`; unknown or missing keys raise ValueError naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ClassifierConfig keys {unknown}; known keys are {sorted(known)}")
        if "vocab_size" not in values:
            raise ValueError("ClassifierConfig needs 'vocab_size'")
        return cls(**values)


def _check_choice(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {list(choices)}")


class TransformerClassifier(nn.Module):
    """Transformer encoder + pooling + linear head: token ids (B, T) -> class logits (B, num_classes).

    Token vectors are stored at std 1/sqrt(d_model) and multiplied by sqrt(d_model) (Vaswani et al.
    2017, 3.4), so they enter with unit-scale components like the sinusoids, and Adam moves them
    sqrt(d_model) times faster than an unscaled unit-init table would. "cls" pooling prepends one
    learned vector (no position, no vocabulary entry; the mask gets a 1 for it) and reads it out.

    Args:
        config: a `ClassifierConfig`.
    """

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = c = config
        self.embed_scale = math.sqrt(c.d_model)
        self.token_embedding = nn.Embedding(c.vocab_size, c.d_model, padding_idx=c.pad_id)
        nn.init.normal_(self.token_embedding.weight, std=c.d_model**-0.5)
        with torch.no_grad():
            self.token_embedding.weight[c.pad_id].zero_()  # padding is masked anyway; keep it inert
        if c.bigram_buckets:
            # Row 0 stands for "no next token" (last token, or next is padding) and stays zero.
            self.bigram_embedding = nn.Embedding(c.bigram_buckets + 1, c.d_model, padding_idx=0)
            nn.init.normal_(self.bigram_embedding.weight, std=c.d_model**-0.5)
            with torch.no_grad():
                self.bigram_embedding.weight[0].zero_()
        self.position = POSITIONALS[c.positional](c.max_len, c.d_model)
        if c.pooling == "cls":
            # Stored and scaled like a token embedding row, so it starts at the same magnitude.
            self.cls_token = nn.Parameter(torch.randn(1, 1, c.d_model) * c.d_model**-0.5)
        emb_dropout = c.dropout if c.embedding_dropout is None else c.embedding_dropout
        self.embedding_dropout = nn.Dropout(emb_dropout)
        self.layers = nn.ModuleList(
            EncoderLayer(
                c.d_model, c.n_heads, c.d_ff, c.dropout, c.norm_first, c.activation, c.attn_impl,
                c.layer_norm_eps, c.attention_dropout,
            )
            for _ in range(c.n_layers)
        )
        # Pre-norm layers leave the residual stream un-normalised; post-norm layers end in a LayerNorm.
        self.final_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps) if c.norm_first else nn.Identity()
        self.head_dropout = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.d_model, c.num_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Classify a padded batch. A fully padded row gives finite logits (head bias for mean/max).

        Args:
            input_ids: (B, T) long token ids.
            attention_mask: (B, T) 1 = real token, 0 = padding; None means no padding.

        Returns:
            (B, num_classes) logits.
        """
        h, mask = self.encode(input_ids, attention_mask)  # (B, T', C), (B, T') or None
        return self.head(self.head_dropout(self.pool(h, mask)))  # (B, num_classes)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Hidden states (B, T', C) and the mask that goes with them (T' = T + 1 with cls pooling)."""
        self._check_inputs(input_ids, attention_mask)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # nothing to mask: skip building biases, attention runs unmasked
        B = input_ids.shape[0]
        x = self.token_embedding(input_ids)  # (B, T, C)
        if self.config.bigram_buckets:
            x = x + self.bigram_embedding(self.bigram_ids(input_ids, attention_mask))  # (B, T, C)
        x = x * self.embed_scale
        if self.training and self.config.token_dropout > 0:
            attention_mask = self.drop_tokens(input_ids, attention_mask)  # (B, T)
        x = self.position(x)  # (B, T, C)
        if self.config.pooling == "cls":
            cls = (self.cls_token * self.embed_scale).expand(B, -1, -1)  # (B, 1, C)
            x = torch.cat([cls, x], dim=1)  # (B, T+1, C)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask.new_ones(B, 1), attention_mask], dim=1)  # (B, T+1)
        x = self.embedding_dropout(x)
        for layer in self.layers:
            x = layer(x, attention_mask)  # (B, T', C)
        return self.final_norm(x), attention_mask  # (B, T', C)

    def drop_tokens(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """The mask with each real token hidden with probability token_dropout; no row loses all its tokens."""
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        kept = real & (torch.rand(input_ids.shape, device=input_ids.device) >= self.config.token_dropout)  # (B, T)
        kept = torch.where(kept.any(dim=1, keepdim=True), kept, real)  # a row that lost everything keeps all
        return kept.long()  # (B, T)

    def bigram_ids(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """(B, T) bigram-table rows: hash(token t, token t+1) in [1, buckets], or 0 where t+1 is not a real token.

        The pair (a, b) is first made unique as a * vocab_size + b, then folded into the table by a
        multiplicative hash (Knuth's 2654435761) modulo the bucket count. Padding never contributes,
        so extra padding leaves the ids of real tokens unchanged.
        """
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        has_next = real & nn.functional.pad(real[:, 1:], (0, 1))  # (B, T): t and t+1 are both real tokens
        nxt = nn.functional.pad(input_ids[:, 1:], (0, 1))  # (B, T): the next token, 0 past the end
        pair = input_ids * self.config.vocab_size + nxt  # (B, T), unique per (a, b)
        # int64 products wrap around for vocabularies above ~58k; `%` stays non-negative and deterministic.
        rows = (pair * 2654435761) % self.config.bigram_buckets + 1  # (B, T) in [1, buckets]
        return torch.where(has_next, rows, torch.zeros_like(rows))  # (B, T)

    def pool(self, h: Tensor, attention_mask: Tensor | None) -> Tensor:
        """(B, T, C) hidden states -> (B, C), ignoring padding; rows with no real token pool to 0."""
        pooling = self.config.pooling
        if pooling == "cls":
            return h[:, 0]  # (B, C)
        if attention_mask is None:
            return h.mean(dim=1) if pooling == "mean" else h.amax(dim=1)  # (B, C)
        keep = attention_mask.to(torch.bool)  # (B, T)
        if pooling == "mean":
            weights = keep.to(h.dtype)  # (B, T)
            # A batched (1, T) @ (T, C) product sums the real rows without a (B, T, C) temporary.
            summed = torch.bmm(weights[:, None, :], h).squeeze(1)  # (B, C)
            return summed / weights.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, C)
        pooled = h.masked_fill(~keep[:, :, None], float("-inf")).amax(dim=1)  # (B, C)
        return torch.where(keep.any(dim=1, keepdim=True), pooled, torch.zeros_like(pooled))  # (B, C)

    def _check_inputs(self, input_ids: Tensor, attention_mask: Tensor | None) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match "
                f"input_ids shape {tuple(input_ids.shape)}"
            )
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids has no tokens (T = 0)")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got min {lo}, max {hi}")
