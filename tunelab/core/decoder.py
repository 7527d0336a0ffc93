"""Decoder-only causal language models: a GPT-2 and a Llama that compute what Hugging Face's compute.

GPT-2 (Radford et al. 2019): token + learned position embeddings -> N pre-norm blocks
    x = x + Attn(LN(x));  x = x + MLP(LN(x)),  MLP = c_proj(GELU_tanh(c_fc(x)))
-> final LayerNorm -> logits through the (tied) token embedding.

Llama (Touvron et al. 2023, https://arxiv.org/abs/2302.13971): token embeddings -> N pre-norm blocks
    x = x + Attn(RMSNorm(x));  x = x + MLP(RMSNorm(x)),  MLP = down(SiLU(gate(x)) * up(x))   (SwiGLU, Shazeer 2020)
with rotary position embeddings on the queries and keys (RoPE, Su et al. 2021, https://arxiv.org/abs/2104.09864)
and grouped-query attention (GQA, Ainslie et al. 2023, https://arxiv.org/abs/2305.13245: H query heads share
H_kv key/value heads) -> final RMSNorm -> logits through an untied (or tied) head.

Module names are Hugging Face's (`transformer.h.0.attn.c_attn`, `model.layers.0.self_attn.q_proj`), so a
checkpoint, a peft adapter file and a `target_modules` list name the same tensors in both libraries; the
one difference in the files is GPT-2's `Conv1D`, which stores its weight as (in, out) where nn.Linear
stores (out, in): `hf_to_tunelab_state_dict` and `tunelab_to_hf_state_dict` transpose those four weights.

Both models take `(input_ids (B, T), attention_mask (B, T) or (B, P+T) with a cache, position_ids (B, T))` and
return logits (B, T, V); `forward_hidden` returns the per-layer hidden states as Hugging Face does. A `KVCache`
(preallocated, one (B, H_kv, T_max, D) key and value tensor per layer) makes generation cost one token's work
per step (`tunelab.core.generate`).
"""

from __future__ import annotations

import contextlib

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tunelab.core.attention import ATTENTION_IMPLS, make_attention_bias, scaled_dot_product_attention
from tunelab.core.family import Dims, ModelFamily
from tunelab.core.layers import ACTIVATIONS

HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
                  "silu": "silu"}


def _positive_ints(config, names) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _probabilities(config, names) -> None:
    for name in names:
        value = getattr(config, name)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")


class _HFConfig:
    """from_hf_dict / to_hf_dict for a config dataclass whose field names are Hugging Face's."""

    MODEL_TYPE = ""
    OURS = ("attn_impl",)  # fields Hugging Face does not have

    @classmethod
    def from_hf_dict(cls, values: dict) -> "_HFConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_hf_dict(self, architecture: str) -> dict:
        values = {k: v for k, v in asdict(self).items() if k not in self.OURS}
        return {"architectures": [architecture], "model_type": self.MODEL_TYPE, **values}


@dataclass
class GPTConfig(_HFConfig):
    """A GPT-2 (Hugging Face `GPT2Config` field names; defaults are GPT-2 small, 124M parameters)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None: 4 * n_embd
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True
    attn_impl: str = "fused"  # ours: "fused" (SDPA) or "explicit" (the softmax written out)

    MODEL_TYPE = "gpt2"

    def __post_init__(self):
        _positive_ints(self, ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"))
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.activation_function not in HF_ACTIVATIONS:
            raise ValueError(f"unsupported activation_function {self.activation_function!r}; "
                             f"expected one of {sorted(HF_ACTIVATIONS)}")
        _probabilities(self, ("resid_pdrop", "embd_pdrop", "attn_pdrop"))
        if self.attn_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attn_impl {self.attn_impl!r}; expected one of {ATTENTION_IMPLS}")

    @classmethod
    def from_hf_dict(cls, values: dict) -> "GPTConfig":
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if values.get(flag):
                raise ValueError(f"GPT-2 configs with {flag}=True are not supported")
        if values.get("scale_attn_weights") is False:
            raise ValueError("GPT-2 configs with scale_attn_weights=False are not supported")
        return super().from_hf_dict(values)

    @property
    def d_ff(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def tiny(cls, **overrides) -> "GPTConfig":
        """A small config for tests (no dropout: deterministic)."""
        values = dict(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return cls(**{**values, **overrides})


@dataclass
class LlamaConfig(_HFConfig):
    """A Llama (Hugging Face `LlamaConfig` field names; defaults are a Llama-2-7B-shaped model)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: num_attention_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    attn_impl: str = "fused"

    MODEL_TYPE = "llama"

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                                 f"({self.num_attention_heads}) unless head_dim is given")
            self.head_dim = self.hidden_size // self.num_attention_heads
        _positive_ints(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                              "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act not in HF_ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; expected one of {sorted(HF_ACTIVATIONS)}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
        _probabilities(self, ("attention_dropout",))
        if self.attn_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attn_impl {self.attn_impl!r}; expected one of {ATTENTION_IMPLS}")

    @classmethod
    def from_hf_dict(cls, values: dict) -> "LlamaConfig":
        values = dict(values)
        rope = values.pop("rope_parameters", None) or values.pop("rope_scaling", None) or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ValueError(f"rope type {kind!r} is not supported (only the default rotary embedding)")
        if "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        if values.get("pretraining_tp", 1) != 1:
            raise ValueError("Llama configs with pretraining_tp != 1 are not supported")
        return super().from_hf_dict(values)

    def to_hf_dict(self, architecture: str) -> dict:
        values = super().to_hf_dict(architecture)
        values["rope_parameters"] = {"rope_type": "default", "rope_theta": values["rope_theta"]}
        return values

    @classmethod
    def tiny(cls, **overrides) -> "LlamaConfig":
        """A small config for tests: GQA 4/2, untied head."""
        values = dict(vocab_size=97, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2)
        return cls(**{**values, **overrides})


# ---------------------------------------------------------------- the KV cache


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to `max_length` positions.

    Each layer writes its new (B, H_kv, T, D) keys and values at positions [length, length + T) and attends
    over [0, length + T); the model then advances `length` by T. Preallocating (instead of concatenating a
    growing tensor every step) makes a step's cost independent of how the cache grew.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_length: int,
                 dtype: torch.dtype = torch.float32, device=None):
        shape = (n_layers, batch_size, n_kv_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # positions filled

    @property
    def max_length(self) -> int:
        return self.keys.shape[3]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store (B, H_kv, T, D) keys and values of `layer` after the ones kept; return all of them so far."""
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]  # (B, H_kv, length + T, D)

    def prefill(self, prefixes: list[tuple[Tensor, Tensor]]) -> "KVCache":
        """Start the cache with P given positions per layer, (keys, values) each (B, H_kv, P, D): prefix tuning's
        learned prefixes (Li & Liang 2021), which then sit in front of every token the model sees or generates.
        The caller's attention mask covers them (P ones in front) and positions start after them, as in peft."""
        if self.length:
            raise ValueError(f"prefill needs an empty cache; this one holds {self.length} positions")
        if len(prefixes) != self.keys.shape[0]:
            raise ValueError(f"expected one (keys, values) prefix per layer ({self.keys.shape[0]}), "
                             f"got {len(prefixes)}")
        for layer, (k, v) in enumerate(prefixes):
            self.update(layer, k, v)
        self.length = prefixes[0][0].shape[2]
        return self

    def reorder(self, rows: Tensor) -> None:
        """Keep the cache rows `rows` (e.g. the prompts still generating), in that order."""
        self.keys, self.values = self.keys[:, rows], self.values[:, rows]


def _check_forward_inputs(input_ids: Tensor | None, attention_mask, position_ids, cache, vocab_size: int,
                          max_positions: int | None, inputs_embeds: Tensor | None = None,
                          width: int = 0) -> int:
    """Validate the shared forward inputs; return the number of cached positions P."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids (B, T) and inputs_embeds (B, T, C)")
    if inputs_embeds is not None:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != width:
            raise ValueError(f"inputs_embeds must have shape (B, T, {width}), got {tuple(inputs_embeds.shape)}")
        B, T = inputs_embeds.shape[:2]
    elif not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
        raise ValueError(f"input_ids must be an integer tensor of shape (B, T), got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    else:
        B, T = input_ids.shape
    if T == 0:
        raise ValueError("the input has no tokens (T = 0)")
    on_meta = input_ids is not None and input_ids.is_meta  # shapes only (memory accounting): no values to check
    if input_ids is not None and not on_meta and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(f"input_ids must lie in [0, {vocab_size}), got values in "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")
    past = 0
    if cache is not None:
        past = cache.length
        if cache.batch_size != B:
            raise ValueError(f"the cache holds {cache.batch_size} sequences, input_ids has {B}")
        if past + T > cache.max_length:
            raise ValueError(f"the cache has room for {cache.max_length} positions: {past} kept + {T} new do not fit")
    if attention_mask is not None and tuple(attention_mask.shape) != (B, past + T):
        raise ValueError(f"attention_mask must have shape (B, P+T) = ({B}, {past + T}) "
                         f"({past} cached positions), got {tuple(attention_mask.shape)}")
    if position_ids is not None and tuple(position_ids.shape) not in ((B, T), (1, T)):
        raise ValueError(f"position_ids must have shape ({B}, {T}), got {tuple(position_ids.shape)}")
    if max_positions is not None:
        top = past + T if position_ids is None else int(position_ids.max()) + 1
        if top > max_positions:
            raise ValueError(f"position {top - 1} is beyond the {max_positions} learned positions "
                             f"(n_positions); truncate the input")
    return past


def _attend(q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None, past: int, dropout_p: float,
            impl: str) -> Tensor:
    """Causal attention of T new queries (B, H, T, D) over P + T keys/values (B, H_kv, P+T, D).

    Grouped-query attention repeats each key/value head for the H / H_kv query heads that share it (query
    head h reads key/value head h // (H / H_kv), as Hugging Face's `repeat_kv`).
    """
    B, H, T, D = q.shape
    n_rep = H // k.shape[1]
    fused = impl == "fused" and (dropout_p == 0.0 or q.device.type != "cpu")
    if attention_mask is None and (T == 1 or (past == 0 and fused)):
        bias = None  # one query sees every key kept; or the fused kernel's own causal mask (is_causal below)
    else:
        # the queries are the last T of P + T positions: query t sees the keys 0..P+t that are not padding
        bias = make_attention_bias(attention_mask, True, T, q.dtype, q.device, n_prefix=past)  # (B|1, 1, T, P+T)
    if fused:
        # SDPA reads the shared key/value heads itself (enable_gqa): no (B, H, P+T, D) copy of the cache per step
        gqa = {"enable_gqa": True} if n_rep > 1 and SDPA_GQA else {}
        if n_rep > 1 and not gqa:
            k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p,
                                              is_causal=bias is None and T > 1, **gqa)  # (B, H, T, D)
    if n_rep > 1:
        k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)  # (B, H, P+T, D)
    return scaled_dot_product_attention(q, k, v, bias, dropout_p, impl)  # (B, H, T, D)


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, H_kv, S, D) -> (B, H_kv * n_rep, S, D), each head repeated n_rep times in a row (Hugging Face's
    repeat_kv)."""
    B, H_kv, S, D = x.shape
    return x[:, :, None].expand(B, H_kv, n_rep, S, D).reshape(B, H_kv * n_rep, S, D)


def _sdpa_has_gqa() -> bool:
    """Whether this torch's scaled_dot_product_attention takes enable_gqa (torch >= 2.5)."""
    try:
        q, kv = torch.zeros(1, 2, 1, 4), torch.zeros(1, 1, 1, 4)
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
        return True
    except TypeError:
        return False


SDPA_GQA = _sdpa_has_gqa()


def _split(x: Tensor, n_heads: int, d_head: int) -> Tensor:
    B, T, _ = x.shape
    return x.view(B, T, n_heads, d_head).transpose(1, 2)  # (B, H, T, D)


def _merge(y: Tensor) -> Tensor:
    B, H, T, D = y.shape
    return y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)


# ---------------------------------------------------------------- GPT-2


class GPTAttention(nn.Module):
    """Causal self-attention with one fused q/k/v projection `c_attn` (C -> 3C) and `c_proj` (C -> C)."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.d_head = layer, config.n_head, config.n_embd // config.n_head
        self.dropout, self.impl = config.attn_pdrop, config.attn_impl
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: Tensor, attention_mask: Tensor | None, past: int, cache: KVCache | None) -> Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        q, k, v = self.c_attn(x).split(x.shape[-1], dim=-1)  # 3 x (B, T, C)
        q, k, v = (_split(t, self.n_heads, self.d_head) for t in (q, k, v))  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, H, P+T, D)
        y = _attend(q, k, v, attention_mask, past, self.dropout if self.training else 0.0, self.impl)
        return self.resid_dropout(self.c_proj(_merge(y)))  # (B, T, C)


class GPTMLP(nn.Module):
    """c_proj(GELU_tanh(c_fc(x))): C -> d_ff -> C."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.d_ff)
        self.c_proj = nn.Linear(config.d_ff, config.n_embd)
        self.act = ACTIVATIONS[HF_ACTIVATIONS[config.activation_function]]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))  # (B, T, C)


class GPTBlock(nn.Module):
    residual_branches = ("attn.resid_dropout", "mlp.dropout")  # the last module of each branch (adapters go there)

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.d_model = config.n_embd
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPTAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPTMLP(config)

    def forward(self, x, attention_mask, past, cache, position_embeddings=None):
        x = x + self.attn(self.ln_1(x), attention_mask, past, cache)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class GPTModel(nn.Module):
    """Embeddings, blocks and the final LayerNorm (Hugging Face's `GPT2Model`)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(GPTBlock(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def embed(self, input_ids: Tensor | None, position_ids: Tensor, inputs_embeds: Tensor | None = None):
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        return self.drop(x + self.wpe(position_ids)), None  # (B, T, C)


# ---------------------------------------------------------------- Llama


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019), computed in float32 like Hugging Face's."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RotaryEmbedding(nn.Module):
    """cos and sin of position * theta^(-2i/D) for i < D/2, each repeated twice along the last axis
    (Hugging Face's half-split layout: dimension i pairs with i + D/2, see `rotate_half`)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (D/2,)

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """position_ids (B, T) -> cos, sin, each (B, 1, T, D), computed in float32 then cast to `dtype`."""
        device = position_ids.device.type
        with torch.autocast(device, enabled=False) if device != "meta" else contextlib.nullcontext():
            freqs = position_ids[..., None].float() * self.inv_freq.float()  # (B, T, D/2)
            angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, D)
            return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x_i, x_{i+D/2}) by its position's angle: x cos + rotate_half(x) sin. x: (B, H, T, D)."""
    return x * cos + rotate_half(x) * sin


class LlamaAttention(nn.Module):
    """Grouped-query causal self-attention with rotary positions; q/k/v/o projections without biases."""

    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.layer, self.impl, self.dropout = layer, config.attn_impl, config.attention_dropout
        self.n_heads, self.n_kv_heads, self.d_head = (config.num_attention_heads, config.num_key_value_heads,
                                                      config.head_dim)
        C, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(C, self.n_heads * self.d_head, bias=bias)
        self.k_proj = nn.Linear(C, self.n_kv_heads * self.d_head, bias=bias)
        self.v_proj = nn.Linear(C, self.n_kv_heads * self.d_head, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.d_head, C, bias=bias)

    def forward(self, x: Tensor, attention_mask: Tensor | None, past: int, cache: KVCache | None,
                position_embeddings: tuple[Tensor, Tensor]) -> Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        cos, sin = position_embeddings  # (B, 1, T, D)
        q = apply_rotary(_split(self.q_proj(x), self.n_heads, self.d_head), cos, sin)  # (B, H, T, D)
        k = apply_rotary(_split(self.k_proj(x), self.n_kv_heads, self.d_head), cos, sin)  # (B, H_kv, T, D)
        v = _split(self.v_proj(x), self.n_kv_heads, self.d_head)  # (B, H_kv, T, D)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, H_kv, P+T, D)
        y = _attend(q, k, v, attention_mask, past, self.dropout if self.training else 0.0, self.impl)
        return self.o_proj(_merge(y))  # (B, T, C)


class LlamaMLP(nn.Module):
    """SwiGLU: down(SiLU(gate(x)) * up(x)), C -> intermediate -> C."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        C, d_ff, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(C, d_ff, bias=bias)
        self.up_proj = nn.Linear(C, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, C, bias=bias)
        self.act = F.silu if config.hidden_act == "silu" else ACTIVATIONS[HF_ACTIVATIONS[config.hidden_act]]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))  # (B, T, C)


class LlamaBlock(nn.Module):
    # Llama's branches end in a projection, not a dropout: two empty slots mark where adapters go, so wrapping
    # them renames no weight (nn.Identity has none).
    residual_branches = ("attn_out", "mlp_out")

    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.d_model = config.hidden_size
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)
        self.attn_out, self.mlp_out = nn.Identity(), nn.Identity()

    def forward(self, x, attention_mask, past, cache, position_embeddings=None):
        h = self.self_attn(self.input_layernorm(x), attention_mask, past, cache, position_embeddings)
        x = x + self.attn_out(h)  # (B, T, C)
        return x + self.mlp_out(self.mlp(self.post_attention_layernorm(x)))  # (B, T, C)


class LlamaModel(nn.Module):
    """Embeddings, blocks and the final RMSNorm (Hugging Face's `LlamaModel`)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)

    def embed(self, input_ids: Tensor | None, position_ids: Tensor, inputs_embeds: Tensor | None = None):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        return x, self.rotary_emb(position_ids, x.dtype)

    @property
    def h(self) -> nn.ModuleList:
        return self.layers

    @property
    def ln_f(self) -> nn.Module:
        return self.norm


# ---------------------------------------------------------------- the causal LM (shared by both families)


class CausalLM(nn.Module):
    """A decoder stack (`self.<base_name>`) and an LM head: the forward, the cache and the weight tying shared
    by GPT and Llama. Subclasses set `base_name`, `base_class`, `n_kv_heads` and `head_dim`."""

    base_name = ""

    def __init__(self, config):
        super().__init__()
        self.config = config
        setattr(self, self.base_name, self.base_class(config))
        self.lm_head = nn.Linear(self.input_embeddings().embedding_dim, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        self.tie_weights()

    @property
    def base(self) -> nn.Module:
        return getattr(self, self.base_name)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.base.h

    def input_embeddings(self) -> nn.Embedding:
        raise NotImplementedError

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.input_embeddings().weight

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hf_config_dict(self, architecture: str) -> dict:
        """The config.json Hugging Face reads for this model."""
        return self.config.to_hf_dict(architecture)

    def new_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KVCache for `batch_size` sequences of up to `max_length` positions."""
        weight = self.input_embeddings().weight
        return KVCache(len(self.blocks), batch_size, self.n_kv_heads, self.head_dim, max_length,
                       dtype or weight.dtype, weight.device)

    def forward_hidden(self, input_ids: Tensor | None, attention_mask: Tensor | None = None,
                       position_ids: Tensor | None = None, cache: KVCache | None = None,
                       output_hidden_states: bool = False, inputs_embeds: Tensor | None = None,
                       ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        """The final normed hidden states (B, T, C) and, if asked, Hugging Face's `hidden_states`: the embedding
        output, every block's output but the last, and the final normed output (n_layers + 1 tensors)."""
        width = self.input_embeddings().embedding_dim
        past = _check_forward_inputs(input_ids, attention_mask, position_ids, cache, self.config.vocab_size,
                                     getattr(self.config, "n_positions", None), inputs_embeds, width)
        given = input_ids if inputs_embeds is None else inputs_embeds
        B, T = given.shape[:2]
        if attention_mask is not None and not attention_mask.is_meta and bool(attention_mask.all()):
            attention_mask = None  # no padding: the causal mask alone (SDPA's is_causal), no bias built per layer
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=given.device)[None].expand(B, T)  # (B, T)
        x, position_embeddings = self.base.embed(input_ids, position_ids, inputs_embeds)  # (B, T, C)
        states = [x] if output_hidden_states else None
        for block in self.blocks:
            x = block(x, attention_mask, past, cache, position_embeddings)  # (B, T, C)
            if output_hidden_states:
                states.append(x)
        x = self.base.ln_f(x)
        if cache is not None:
            cache.length += T
        if output_hidden_states:
            states[-1] = x
        return x, tuple(states) if output_hidden_states else None

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: KVCache | None = None,
                inputs_embeds: Tensor | None = None) -> Tensor:
        """Next-token logits (B, T, V).

        Args:
            input_ids: (B, T) token ids; or, instead, inputs_embeds (B, T, C): vectors in place of the token
                embeddings (prompt tuning puts learned ones in front of the words').
            attention_mask: 1 = real token, 0 = padding; (B, T), or (B, P+T) covering the P cached positions too.
            position_ids: (B, T) positions; None: P, P+1, ..., P+T-1 (as Hugging Face's forward). For left-padded
                batches pass cumsum(mask) - 1, as `tunelab.core.generate` does.
            cache: a `KVCache` from `new_cache`; the new keys and values are appended to it.
        """
        h, _ = self.forward_hidden(input_ids, attention_mask, position_ids, cache, inputs_embeds=inputs_embeds)
        return self.lm_head(h)  # (B, T, V)


class GPT(CausalLM):
    """GPT-2 with an LM head tied to the token embedding (Hugging Face's `GPT2LMHeadModel`)."""

    base_name, base_class = "transformer", GPTModel

    def __init__(self, config: GPTConfig):
        self.n_kv_heads, self.head_dim = config.n_head, config.n_embd // config.n_head
        super().__init__(config)
        for name, p in self.named_parameters():  # GPT-2's residual projections: std / sqrt(2 n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=config.initializer_range / math.sqrt(2 * config.n_layer))

    def input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte


class Llama(CausalLM):
    """Llama with an untied (or tied) LM head (Hugging Face's `LlamaForCausalLM`)."""

    base_name, base_class = "model", LlamaModel

    def __init__(self, config: LlamaConfig):
        self.n_kv_heads, self.head_dim = config.num_key_value_heads, config.head_dim
        super().__init__(config)

    def input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens


# ---------------------------------------------------------------- a classification head on the decoder

POOLINGS = ("last", "mean")


class SequenceClassifierMixin:
    """A decoder stack read out by a linear `score` head instead of the LM head (Hugging Face's
    `LlamaForSequenceClassification` / `GPT2ForSequenceClassification`).

    A causal model's last real token is the only position that has seen the whole text, so by default the
    head reads that one ("last", Hugging Face's choice); "mean" averages the hidden states of the real tokens
    (Hugging Face has no such head: a folder saved with it records the pooling, but transformers reads the last).
    """

    def __init__(self, config, num_labels: int = 2, pooling: str = "last"):
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        super().__init__(config)
        del self.lm_head
        self.num_labels, self.pooling = num_labels, pooling
        self.score = nn.Linear(self.input_embeddings().embedding_dim, num_labels, bias=False)
        nn.init.normal_(self.score.weight, std=config.initializer_range)

    def tie_weights(self) -> None:  # no LM head to tie
        pass

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, inputs_embeds: Tensor | None = None) -> Tensor:
        """(B, T) ids (right or left padded) and mask -> (B, num_labels) logits."""
        h, _ = self.forward_hidden(input_ids, attention_mask, position_ids, inputs_embeds=inputs_embeds)  # (B,T,C)
        B, T = h.shape[:2]
        if self.pooling == "mean":
            if attention_mask is None:
                return self.score(h.mean(1))
            weights = attention_mask.to(h.dtype)[..., None]  # (B, T, 1)
            return self.score((h * weights).sum(1) / weights.sum(1).clamp(min=1))  # (B, num_labels)
        if attention_mask is None:
            last = torch.full((B,), T - 1, device=h.device)
        else:  # the rightmost real token: the end of a right-padded row, column T - 1 of a left-padded one
            last = (torch.arange(T, device=h.device) * attention_mask).argmax(-1)  # (B,)
        return self.score(h[torch.arange(B, device=h.device), last])  # (B, num_labels)

    def hf_config_dict(self, architecture: str) -> dict:
        labels = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
        return {**self.config.to_hf_dict(architecture), "id2label": labels,
                "label2id": {v: int(k) for k, v in labels.items()}, "tunelab_pooling": self.pooling}


class GPTForSequenceClassification(SequenceClassifierMixin, GPT):
    """GPT-2 with a classification head (Hugging Face's `GPT2ForSequenceClassification`)."""


class LlamaForSequenceClassification(SequenceClassifierMixin, Llama):
    """Llama with a classification head (Hugging Face's `LlamaForSequenceClassification`)."""


# ---------------------------------------------------------------- the families, as tunelab.peft reads them

def _task_type(model: nn.Module) -> str:
    return "SEQ_CLS" if isinstance(model, SequenceClassifierMixin) else "CAUSAL_LM"


GPT2_FAMILY = ModelFamily(
    name="gpt2", hf_module_names=lambda model: {}, embeddings=lambda model: model.transformer.wte,
    dims=lambda m: Dims(m.config.n_embd, m.config.n_layer, m.config.n_head, m.config.n_head, m.head_dim,
                        m.config.n_positions),
    blocks=lambda model: model.transformer.h, lora_targets=("c_attn",), feedforward=("mlp.c_proj",), top=("ln_f",),
    outputs=("lm_head", "score"),
    task_type=lambda model: _task_type(model), transposed=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
LLAMA_FAMILY = ModelFamily(
    name="llama", hf_module_names=lambda model: {}, embeddings=lambda model: model.model.embed_tokens,
    blocks=lambda model: model.model.layers,
    dims=lambda m: Dims(m.config.hidden_size, m.config.num_hidden_layers, m.config.num_attention_heads,
                        m.config.num_key_value_heads, m.head_dim, None),
    lora_targets=("q_proj", "v_proj"), feedforward=("down_proj",),
    top=("model.norm",), outputs=("lm_head", "score"),
    task_type=lambda model: _task_type(model))
GPT.family, Llama.family = GPT2_FAMILY, LLAMA_FAMILY  # module names are Hugging Face's: an empty name table


# ---------------------------------------------------------------- Hugging Face files

ARCHITECTURES = {"GPT2LMHeadModel": (GPTConfig, GPT), "LlamaForCausalLM": (LlamaConfig, Llama),
                 "GPT2ForSequenceClassification": (GPTConfig, GPTForSequenceClassification),
                 "LlamaForSequenceClassification": (LlamaConfig, LlamaForSequenceClassification)}
MODEL_TYPES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}  # the causal LM of each model_type
CLASSIFIERS = {"gpt2": "GPT2ForSequenceClassification", "llama": "LlamaForSequenceClassification"}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _is_conv1d(model: nn.Module, name: str) -> bool:
    return isinstance(model, GPT) and name.endswith(CONV1D)


def hf_to_tunelab_state_dict(model: CausalLM, hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face tensors -> ours. Names are the same; GPT-2's Conv1D weights (in, out) are transposed to
    nn.Linear's (out, in); GPT-2's non-persistent `attn.bias` / `masked_bias` buffers of old files are dropped.

    Every tensor must fill one of ours with the same shape, and every one of ours must be filled (the tied head
    may be absent), else a ValueError lists the offending names. A causal LM's file loads into a classifier:
    its LM head is dropped and the classifier's new `score` keeps its initialisation.
    """
    ours = model.state_dict()
    tied = model.config.tie_word_embeddings
    classifier = isinstance(model, SequenceClassifierMixin)
    if classifier and "score.weight" not in hf_state:  # a pretrained LM becoming a classifier
        hf_state = {k: v for k, v in hf_state.items() if k != "lm_head.weight"}
    out, unexpected, wrong = {}, [], []
    for name, tensor in hf_state.items():
        if isinstance(model, GPT) and name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if _is_conv1d(model, name):
            tensor = tensor.t()
        if name not in ours:
            unexpected.append(name)
        elif tuple(ours[name].shape) != tuple(tensor.shape):
            wrong.append(f"{name}: file {tuple(tensor.shape)} vs model {tuple(ours[name].shape)}")
        else:
            out[name] = tensor
    missing = [n for n in ours if n not in out and not (tied and n == "lm_head.weight")
               and not (classifier and n == "score.weight" and "score.weight" not in hf_state)]
    problems = [f"unexpected tensors {unexpected}"] * bool(unexpected) + [f"missing tensors {missing}"] * bool(
        missing) + [f"wrong shapes {wrong}"] * bool(wrong)
    if problems:
        raise ValueError(f"the checkpoint does not fit {type(model).__name__}: " + "; ".join(problems))
    return out


def load_hf_state_dict(model: CausalLM, hf_state: dict[str, Tensor]) -> None:
    """Copy a Hugging Face state dict into `model` (see `hf_to_tunelab_state_dict`), keeping the tie."""
    state = hf_to_tunelab_state_dict(model, hf_state)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=False)
    model.tie_weights()


def tunelab_to_hf_state_dict(model: CausalLM) -> dict[str, Tensor]:
    """Our tensors under Hugging Face's names and layouts (Conv1D weights transposed back), contiguous; the tied
    head is left out, as Hugging Face writes it."""
    state = {}
    for name, tensor in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        state[name] = (tensor.t() if _is_conv1d(model, name) else tensor).contiguous()
    return state


def decoder_from_hf_config(values: dict, task: str = "causal_lm", num_labels: int | None = None,
                           pooling: str | None = None, **overrides) -> CausalLM:
    """A randomly initialised GPT or Llama for a Hugging Face config.json's contents: its causal LM, or with
    task="classification" its sequence classifier (num_labels: the file's id2label, else 2; pooling: the
    file's, else "last")."""
    model_type = values.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not a decoder TuneLab knows ({sorted(MODEL_TYPES)})")
    if task not in ("causal_lm", "classification"):
        raise ValueError(f"unknown task {task!r} for a decoder; expected 'causal_lm' or 'classification'")
    architecture = (CLASSIFIERS if task == "classification" else MODEL_TYPES)[model_type]
    config_class, model_class = ARCHITECTURES[architecture]
    config = config_class.from_hf_dict(values)
    if overrides:
        config = config_class(**{**asdict(config), **overrides})
    if task == "causal_lm":
        return model_class(config)
    labels = num_labels or len(values.get("id2label") or {}) or 2
    return model_class(config, labels, pooling or values.get("tunelab_pooling", "last"))
