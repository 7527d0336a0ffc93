"""Soft prompts: prompt tuning and prefix tuning. The pretrained model stays frozen; only a few vectors learn.

Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning",
https://arxiv.org/abs/2104.08691) puts P learned vectors in front of the word embeddings:

    model([p_1 .. p_P ; E(x_1) .. E(x_T)])       p_i in R^C, the only new parameters: P x C

Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
https://arxiv.org/abs/2101.00190) gives every layer's attention P learned keys and values to attend to:

    head(x) = softmax(q [K_prefix ; K(x)]^T / sqrt(D)) [V_prefix ; V(x)]      P x 2 x L x C parameters

optionally produced by a small MLP from P x C vectors (the paper's reparametrisation, eq. 5:
P_theta = MLP(P'_theta)), which trains more stably. Both follow Hugging Face peft exactly, so adapters
move between peft and TuneLab (`save_adapter` / `load_adapter`): the prompt's positions
come first, so BERT's pooler reads the first virtual token, as in peft.

Both read the model's family description (`tunelab.core.family`), so they wrap BERT, GPT-2 and Llama alike.
In a causal LM the virtual positions become the first entries of the KV cache during generation
(`tunelab.core.generate.generate(wrapper, ids)`): computed once, attended to by every new token.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from tunelab.core.family import ModelFamily, family_of
from tunelab.peft.inject import ModulesToSave, add_modules_to_save, saved_module_tensors
from tunelab.peft.saving import check_fit, peft_key, read_adapter, to_hf_path, write_adapter

ADAPTER_NAME = "default"  # peft's name for a single adapter; it never appears in the saved file
PROMPT_INITS = ("random", "vocab", "text")


@dataclass
class PromptTuningConfig:
    """Prompt tuning (Lester et al. 2021): P learned vectors prepended to the input embeddings.

    Args:
        num_virtual_tokens: P, the number of soft-prompt vectors.
        init: where they start: "random" (N(0, 1), peft's RANDOM), "vocab" (rows of P randomly sampled
            vocabulary tokens, peft's SAMPLE_VOCAB) or "text" (the embeddings of `init_text`'s tokens,
            repeated or cut to P; the paper's best initialisation, peft's TEXT).
        init_text: the text for init="text", e.g. "Classify the sentiment of this review:".
        modules_to_save: modules trained in full next to the prompt (the new classification head);
            use () for a model without a "classifier".
    """

    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str | None = None
    modules_to_save: tuple[str, ...] = ("classifier",)

    def __post_init__(self):
        _check_num_virtual_tokens(self.num_virtual_tokens)
        if self.init not in PROMPT_INITS:
            raise ValueError(f"unknown prompt init {self.init!r}; expected one of {PROMPT_INITS}")
        if self.init == "text" and not self.init_text:
            raise ValueError('init="text" needs init_text, the text whose token embeddings start the prompt')
        if self.init != "text" and self.init_text is not None:
            raise ValueError(f'init_text is only used with init="text", not init={self.init!r}')
        self.modules_to_save = tuple(self.modules_to_save)


@dataclass
class PrefixTuningConfig:
    """Prefix tuning (Li & Liang 2021): P learned keys and values in front of every layer's attention.

    Args:
        num_virtual_tokens: P, the prefix length.
        projection: produce the prefixes as MLP(E) from P x C vectors E, with
            MLP = Linear(C, projection_hidden) -> tanh -> Linear(projection_hidden, 2 L C) (Li & Liang 2021,
            eq. 5); otherwise the P x 2LC prefix values are learned directly.
        projection_hidden: the MLP's hidden width (peft's encoder_hidden_size).
        modules_to_save: modules trained in full next to the prefixes (the new classification head).
    """

    num_virtual_tokens: int = 20
    projection: bool = False
    projection_hidden: int = 512
    modules_to_save: tuple[str, ...] = ("classifier",)

    def __post_init__(self):
        _check_num_virtual_tokens(self.num_virtual_tokens)
        if not isinstance(self.projection_hidden, int) or isinstance(self.projection_hidden, bool) \
                or self.projection_hidden < 1:
            raise ValueError(f"projection_hidden must be a positive int, got {self.projection_hidden!r}")
        self.modules_to_save = tuple(self.modules_to_save)


def _check_num_virtual_tokens(n) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_virtual_tokens must be a positive int, got {n!r}")


class PrefixCache:
    """Fixed keys and values in front of every layer's own, for one forward pass (prefix tuning in training).

    Each layer attends over [prefix ; its new keys]: concatenated, not written into a preallocated buffer,
    so gradients reach the prefixes (one shared buffer written layer after layer would be an in-place change
    of tensors that backward still needs). Nothing is kept: a new one serves each forward pass.
    """

    def __init__(self, prefixes: list[tuple[Tensor, Tensor]]):
        self.prefixes = prefixes  # per layer, (keys, values) each (B, H_kv, P, D)
        self.length = prefixes[0][0].shape[2]  # P positions come before the input
        self.batch_size = prefixes[0][0].shape[0]
        self.max_length = sys.maxsize

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """(B, H_kv, T, D) new keys and values -> [prefix ; new], each (B, H_kv, P + T, D)."""
        prefix_k, prefix_v = self.prefixes[layer]
        return torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)


class _SoftPromptWrapper(nn.Module):
    """What both methods share: a frozen model of a described family (`tunelab.core.family`), its trained heads
    (modules_to_save), the P extra positions, and for a causal LM the KV cache that generation grows."""

    def __init__(self, model: nn.Module, config, method: str):
        super().__init__()
        self.family = _family_of(model, method)
        if any(isinstance(m, ModulesToSave) for m in model.modules()):
            raise ValueError(f"this model already carries an adapter; {method} is applied to a plain model once")
        self.dims = self.family.dims(model)
        P, limit = config.num_virtual_tokens, self.dims.max_positions
        if limit is not None and P >= limit:
            raise ValueError(f"num_virtual_tokens={P} leaves no position for the input: the model has "
                             f"{limit} learned positions")
        self.causal = self.family.task_type(model) == "CAUSAL_LM"
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.config = config
        self.saved_modules = add_modules_to_save(model, config.modules_to_save, ADAPTER_NAME)

    def new_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None):
        """A KV cache for generation (`tunelab.core.generate`) with room for the P virtual positions too."""
        if not self.causal:
            raise TypeError(f"{type(self.model).__name__} is not a causal LM: it keeps no KV cache")
        return self.model.new_cache(batch_size, self.config.num_virtual_tokens + max_length, dtype)

    def _inputs(self, attention_mask: Tensor | None, token_type_ids: Tensor | None, position_ids: Tensor | None,
                cache, batch_size: int):
        """The mask with P ones in front (virtual positions are always attended to), and positions moved past
        them; an encoder's segments get P zeros in front, a decoder takes no segments and an encoder no cache."""
        P = self.config.num_virtual_tokens
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(batch_size, P), attention_mask], dim=1)  # (B, P+T)
        if self.causal:
            if token_type_ids is not None:
                raise ValueError(f"{type(self.model).__name__} takes no token_type_ids")
            return attention_mask, None if position_ids is None else position_ids + P
        if position_ids is not None or cache is not None:
            raise ValueError(f"{type(self.model).__name__} is an encoder: it takes no position_ids and no cache")
        if token_type_ids is not None:  # the virtual positions belong to the first segment
            token_type_ids = torch.cat([token_type_ids.new_zeros(batch_size, P), token_type_ids], dim=1)
        return attention_mask, token_type_ids


class PromptTuning(_SoftPromptWrapper):
    """A frozen model whose input starts with `num_virtual_tokens` learned embeddings (Lester et al. 2021).

    The prompt positions take attention-mask 1 (and token type 0 in BERT); positions run 0 .. P+T-1 over prompt
    and input together, BERT's pooler reads the first prompt vector, and the output covers all P + T positions
    (all as in peft). In generation the prompt goes in with the first step and then lives in the KV cache.
    """

    def __init__(self, model: nn.Module, config: PromptTuningConfig, init_ids: Tensor | None = None):
        super().__init__(model, config, "prompt tuning")
        word_embeddings = self.family.embeddings(model).weight  # (V, C)
        P, C = config.num_virtual_tokens, word_embeddings.shape[1]
        if init_ids is None:  # N(0, 1), like a fresh nn.Embedding (peft's RANDOM)
            prompt = torch.randn(P, C, device=word_embeddings.device)
        else:  # copies of real token embeddings: the prompt starts on the embedding manifold
            prompt = word_embeddings.detach()[init_ids.to(word_embeddings.device)].clone().float()
        self.prompt_embeddings = nn.Parameter(prompt)  # (P, C)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                position_ids: Tensor | None = None, cache=None):
        """(B, T) ids, mask (and segments, or positions and a cache) -> what the wrapped model returns,
        computed over P + T positions. A cache that already holds the prompt gets the ids alone."""
        B, P = input_ids.shape[0], self.config.num_virtual_tokens
        attention_mask, second = self._inputs(attention_mask, token_type_ids, position_ids, cache, B)
        if cache is not None and cache.length > 0:  # a generation step: the prompt is in the cache already
            return self.model(input_ids, attention_mask=attention_mask, position_ids=second, cache=cache)
        embeddings = self.family.embeddings(self.model)
        _check_ids(input_ids, embeddings.num_embeddings, P, self.dims.max_positions)  # before the lookup
        words = embeddings(input_ids)  # (B, T, C)
        x = torch.cat([self.prompt_embeddings.to(words.dtype).expand(B, -1, -1), words], dim=1)  # (B, P+T, C)
        if not self.causal:
            return self.model(None, attention_mask, second, inputs_embeds=x)
        if second is not None:  # the prompt takes positions 0 .. P-1, the input P onwards
            second = torch.cat([torch.arange(P, device=x.device).expand(B, P), second], dim=1)  # (B, P+T)
        return self.model(None, attention_mask=attention_mask, position_ids=second, cache=cache, inputs_embeds=x)


class PrefixTuning(_SoftPromptWrapper):
    """A frozen model whose every attention layer also attends to P learned keys and values (Li & Liang 2021).

    The flat prefix (P, 2 L H_kv D) is laid out as peft lays it out: per virtual token, layer by layer, keys
    then values, each split into the H_kv key/value heads of D (H_kv = H unless attention is grouped-query).
    The input's positions then start at P (as in Hugging Face when past keys and values are given). In a causal
    LM the prefixes are the first P positions of the KV cache, so generation attends to them at every step.
    """

    def __init__(self, model: nn.Module, config: PrefixTuningConfig):
        super().__init__(model, config, "prefix tuning")
        P, C, L = config.num_virtual_tokens, self.dims.width, self.dims.layers
        width = 2 * L * self.dims.kv_heads * self.dims.head_dim  # 2 L C unless attention is grouped-query
        device = self.family.embeddings(model).weight.device
        if config.projection:  # reparametrised: prefix = MLP(E), E (P, C)
            self.prefix_embeddings = nn.Parameter(torch.randn(P, C, device=device))  # (P, C)
            self.projection = nn.Sequential(nn.Linear(C, config.projection_hidden), nn.Tanh(),
                                            nn.Linear(config.projection_hidden, width)).to(device)
        else:  # the prefix values themselves, N(0, 1) like peft's nn.Embedding
            self.prefix_embeddings = nn.Parameter(torch.randn(P, width, device=device))  # (P, 2 L H_kv D)
            self.projection = None

    def flat_prefix(self) -> Tensor:
        """Every layer's key and value prefixes in one (P, 2 L H_kv D) tensor: what peft saves."""
        if self.projection is None:
            return self.prefix_embeddings  # (P, 2 L H_kv D)
        return self.projection(self.prefix_embeddings)  # (P, 2 L H_kv D)

    def kv_prefixes(self, batch_size: int) -> list[tuple[Tensor, Tensor]]:
        """Per layer, (keys, values) each (B, H_kv, P, D): BERT's `kv_prefixes`, a decoder's first P cache slots."""
        L, H, D = self.dims.layers, self.dims.kv_heads, self.dims.head_dim
        flat = self.flat_prefix()  # (P, 2 L H D)
        P = flat.shape[0]
        kv = flat.view(P, L, 2, H, D).permute(1, 2, 3, 0, 4)  # (L, 2, H, P, D)
        kv = kv.unsqueeze(2).expand(-1, -1, batch_size, -1, -1, -1)  # (L, 2, B, H, P, D), no copy
        return [(kv[i, 0], kv[i, 1]) for i in range(L)]

    def new_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None):
        """A KV cache whose first P positions hold the prefixes; generation appends after them."""
        return super().new_cache(batch_size, max_length, dtype).prefill(self.kv_prefixes(batch_size))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                position_ids: Tensor | None = None, cache=None):
        """(B, T) ids, mask (and segments, or positions and a cache) -> what the wrapped model returns; the
        prefixes are never masked. Without a cache a decoder gets one that holds the prefixes for this pass."""
        B = input_ids.shape[0]
        if not self.causal:  # BERT takes the prefixes itself; its mask and segments cover the input only
            self._inputs(None, None, position_ids, cache, B)  # an encoder refuses positions and a cache
            return self.model(input_ids, attention_mask, token_type_ids, kv_prefixes=self.kv_prefixes(B))
        attention_mask, position_ids = self._inputs(attention_mask, token_type_ids, position_ids, cache, B)
        if cache is None:
            cache = PrefixCache(self.kv_prefixes(B))
        elif cache.length == 0:  # an empty cache from the wrapped model's new_cache
            cache.prefill(self.kv_prefixes(B))
        return self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache)


def apply_prompt_tuning(model: nn.Module, config: PromptTuningConfig | None = None, tokenizer=None,
                        **overrides) -> PromptTuning:
    """Freeze `model` and wrap it with a trainable soft prompt; the modules_to_save get trainable copies.

    Args:
        model: a model of a described family: BERT (any head), GPT-2 or Llama (then modules_to_save=()).
        config: a PromptTuningConfig (default one if None); `overrides` replace its fields.
        tokenizer: anything with `.encode(text) -> ids` (tunelab.core.hub.WordPieceTokenizer); needed for
            init="text". Like peft, the ids include [CLS] and [SEP].
    """
    config = PromptTuningConfig(**{**asdict(config or PromptTuningConfig()), **overrides})
    P = config.num_virtual_tokens
    init_ids = None
    if config.init == "vocab":  # peft's SAMPLE_VOCAB: P token ids drawn uniformly from the whole vocabulary
        vocab_size = _family_of(model, "prompt tuning").embeddings(model).num_embeddings
        init_ids = torch.randint(0, vocab_size, (P,))
    elif config.init == "text":
        if tokenizer is None:
            raise ValueError('init="text" needs a tokenizer (e.g. tunelab.core.hub.WordPieceTokenizer)')
        ids = list(tokenizer.encode(config.init_text))
        if not ids:
            raise ValueError(f"init_text {config.init_text!r} encodes to no tokens")
        vocab_size = _family_of(model, "prompt tuning").embeddings(model).num_embeddings
        if max(ids) >= vocab_size:
            raise ValueError(f"the tokenizer gives id {max(ids)}, outside the model's vocabulary of {vocab_size}")
        init_ids = torch.tensor((ids * math.ceil(P / len(ids)))[:P])  # repeated or cut to P tokens
    return PromptTuning(model, config, init_ids)


def apply_prefix_tuning(model: nn.Module, config: PrefixTuningConfig | None = None, **overrides) -> PrefixTuning:
    """Freeze `model` and wrap it with trainable per-layer key/value prefixes (and modules_to_save copies)."""
    config = PrefixTuningConfig(**{**asdict(config or PrefixTuningConfig()), **overrides})
    return PrefixTuning(model, config)


def _family_of(model: nn.Module, method: str) -> ModelFamily:
    family = family_of(model)
    if family is None:
        raise TypeError(f"{method} wraps a model of a described family (BERT, GPT-2, Llama: tunelab.core.family), "
                        f"got {type(model).__name__}")
    return family


def _check_ids(input_ids: Tensor, vocab_size: int, n_prompt: int, max_positions: int | None) -> None:
    """The errors a model would raise for its ids, raised before the wrapper looks them up itself."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer tensor of shape (B, T), got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    T = input_ids.shape[1]
    if T == 0:
        raise ValueError("input_ids has no tokens (T = 0)")
    if max_positions is not None and n_prompt + T > max_positions:
        raise ValueError(f"sequence length {T} plus {n_prompt} prefix positions exceeds max_position_embeddings="
                         f"{max_positions} (the model's learned positions); truncate the input")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}), got min {lo}, max {hi}")


# ---------------------------------------------------------------------------------------------------
# peft's on-disk layout: prompt_embeddings (P, C) or the flat prefix (P, 2LC), plus
# base_model.<HF path>.<leaf> for every trained copy of a module_to_save.
# ---------------------------------------------------------------------------------------------------
def _peft_config(wrapper: PromptTuning | PrefixTuning) -> dict:
    dims, cfg = wrapper.dims, wrapper.config
    if isinstance(wrapper, PrefixTuning):  # peft sizes a prefix by the key/value heads (grouped-query attention)
        token_dim, heads = dims.kv_heads * dims.head_dim, dims.kv_heads
    else:
        token_dim, heads = dims.width, dims.heads
    values = dict(task_type=wrapper.family.task_type(wrapper.model), num_virtual_tokens=cfg.num_virtual_tokens,
                  token_dim=token_dim, num_layers=dims.layers, num_attention_heads=heads,
                  num_transformer_submodules=1, inference_mode=True, base_model_name_or_path=None,
                  modules_to_save=[to_hf_path(wrapper.model, n) for n in wrapper.saved_modules] or None)
    if isinstance(wrapper, PromptTuning):
        init = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}[cfg.init]
        return dict(peft_type="PROMPT_TUNING", prompt_tuning_init=init, prompt_tuning_init_text=cfg.init_text,
                    tokenizer_name_or_path=None, **values)
    return dict(peft_type="PREFIX_TUNING", prefix_projection=cfg.projection,
                encoder_hidden_size=cfg.projection_hidden, **values)


def _peft_type(wrapper) -> str:
    if isinstance(wrapper, PromptTuning):
        return "PROMPT_TUNING"
    if isinstance(wrapper, PrefixTuning):
        return "PREFIX_TUNING"
    raise TypeError(f"expected a PromptTuning or PrefixTuning wrapper, got {type(wrapper).__name__}")


def _head_tensors(wrapper, peft_type: str) -> dict[str, Tensor]:
    """{peft tensor name: tensor} of the trained copies of the modules_to_save."""
    out = {}
    for name, tensor in saved_module_tensors(wrapper.model, ADAPTER_NAME).items():
        path, _, leaf = name.rpartition(".")
        out[peft_key(wrapper.model, path, leaf, peft_type)] = tensor
    return out


def save_adapter(wrapper: PromptTuning | PrefixTuning, folder: str | Path) -> Path:
    """Write the prompt (or the projected prefix, as peft does) and the trained heads in peft's layout."""
    peft_type = _peft_type(wrapper)
    with torch.no_grad():
        prompt = wrapper.prompt_embeddings if peft_type == "PROMPT_TUNING" else wrapper.flat_prefix()
    tensors = {"prompt_embeddings": prompt.detach().float().cpu().contiguous()}
    for name, tensor in _head_tensors(wrapper, peft_type).items():
        tensors[name] = tensor.detach().cpu().contiguous()
    return write_adapter(folder, _peft_config(wrapper), tensors)


def load_adapter(wrapper: PromptTuning | PrefixTuning, folder: str | Path) -> PromptTuning | PrefixTuning:
    """Load a prompt/prefix adapter saved by peft or by `save_adapter` into `wrapper` (in place).

    peft saves a prefix after the projection MLP, and the MLP's input cannot be recovered from its output,
    so a projected adapter loads into a wrapper built with projection=False (it computes the same).
    """
    peft_type = _peft_type(wrapper)
    config, tensors = read_adapter(folder, expected_types=(peft_type,))
    if "prompt_embeddings" not in tensors:
        raise ValueError(f"{folder} has no prompt_embeddings tensor")
    prompt = tensors.pop("prompt_embeddings")
    if peft_type == "PREFIX_TUNING" and wrapper.projection is not None:
        raise ValueError("peft saves the prefix after the projection MLP, which cannot be inverted: load this "
                         "adapter into a wrapper built with projection=False")
    target = wrapper.prompt_embeddings if peft_type == "PROMPT_TUNING" else wrapper.prefix_embeddings
    if tuple(prompt.shape) != tuple(target.shape):
        raise ValueError(f"prompt_embeddings in {folder} has shape {tuple(prompt.shape)}, the model expects "
                         f"{tuple(target.shape)} (num_virtual_tokens={config.get('num_virtual_tokens')} in the file, "
                         f"{wrapper.config.num_virtual_tokens} here)")
    expected = _head_tensors(wrapper, peft_type)  # views of our trained copies, under peft's names
    check_fit(tensors, expected, f"this model's modules_to_save {list(wrapper.saved_modules)}", folder)
    with torch.no_grad():
        target.copy_(prompt)
        for key, tensor in tensors.items():
            expected[key].copy_(tensor)  # state_dict tensors share storage with the parameters
    return wrapper
