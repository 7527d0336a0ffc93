"""A BERT-family encoder (BERT, MiniLM) that loads Hugging Face weights and computes what they compute.

Devlin et al. 2019, "BERT" (https://arxiv.org/abs/1810.04805):

    ids, segments -> word + position + token-type embeddings -> LayerNorm -> dropout
    -> N post-norm encoder layers (the `EncoderLayer` of tunelab.core.layers, norm_first=False)
    -> last hidden states (B, T, C);  pooler: tanh(W h[CLS] + b) -> (B, C)

Three heads sit on the encoder: none (`BertModel`), a linear classifier on the pooled [CLS] vector
(`BertForSequenceClassification`) and the masked-language-model head with the output projection tied to
the word embeddings (`BertForMaskedLM`). Hugging Face checkpoints are read by an explicit name map
(`hf_to_tunelab`): every tensor name in the file must map to one of ours and every one of ours must be
filled, else `load_hf_state_dict` raises an error listing the offending names.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor, nn

from tunelab.core.attention import ATTENTION_IMPLS
from tunelab.core.family import Dims, ModelFamily
from tunelab.core.layers import ACTIVATIONS, EncoderLayer

# Hugging Face `hidden_act` names -> ours (tunelab.core.layers.ACTIVATIONS).
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


@dataclass
class BertConfig:
    """Hyper-parameters of a BERT encoder. Field names are those of Hugging Face's config.json, so
    `from_hf_dict(json.load(...))` reads a checkpoint's config and `to_hf_dict` writes one back.

    Defaults are BERT-base (Devlin et al. 2019). MiniLM-L6-H384 is hidden_size=384,
    num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02
    num_labels: int = 2
    classifier_dropout: float | None = None
    attn_impl: str = "fused"  # ours, not Hugging Face's: "fused" (SDPA) or "explicit" (softmax written out)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size", "num_labels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.hidden_act not in HF_ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; expected one of {sorted(HF_ACTIVATIONS)}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.attn_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attn_impl {self.attn_impl!r}; expected one of {ATTENTION_IMPLS}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id {self.pad_token_id} is not a token id of vocab_size {self.vocab_size}")

    @classmethod
    def tiny(cls, **overrides) -> "BertConfig":
        """A few-thousand-parameter config for tests (no dropout: deterministic)."""
        values = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                      max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return cls(**{**values, **overrides})

    @classmethod
    def from_hf_dict(cls, values: dict) -> "BertConfig":
        """Read a Hugging Face config.json dict; keys that do not change the computation are ignored."""
        model_type = values.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"model_type {model_type!r} is not a BERT encoder (expected 'bert')")
        position = values.get("position_embedding_type", "absolute")
        if position != "absolute":
            raise ValueError(f"position_embedding_type {position!r} is not supported (only 'absolute')")
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in values.items() if k in known}
        if "id2label" in values and "num_labels" not in values:
            kept["num_labels"] = len(values["id2label"])
        return cls(**kept)

    def to_hf_dict(self, architecture: str = "BertModel") -> dict:
        """A config.json dict that `transformers.AutoConfig` reads back to the same model."""
        values = {k: v for k, v in asdict(self).items() if k not in ("attn_impl", "num_labels")}
        labels = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
        return {"architectures": [architecture], "model_type": "bert", "position_embedding_type": "absolute",
                **values, "id2label": labels, "label2id": {v: int(k) for k, v in labels.items()}}


class BertEmbeddings(nn.Module):
    """word + position + token-type embeddings, then LayerNorm and dropout: (B, T) ids -> (B, T, C)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        c = config
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, input_ids: Tensor | None = None, token_type_ids: Tensor | None = None,
                inputs_embeds: Tensor | None = None, position_offset: int = 0) -> Tensor:
        """(B, T) ids, or (B, T, C) word vectors given directly (soft prompts) -> (B, T, C).
        Positions run from `position_offset` (P when P prefix positions come first, as in Hugging Face)."""
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        T = x.shape[1]
        if token_type_ids is None:  # a single segment: every token has type 0
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)  # (B, T, C)
        x = x + self.position_embeddings.weight[position_offset:position_offset + T]  # (T, C) broadcast over B
        return self.dropout(self.norm(x))  # (B, T, C)


class BertOutput(NamedTuple):
    """What `BertModel` returns. `hidden_states` (only when asked for) holds the embedding output and
    every layer's output: num_hidden_layers + 1 tensors of shape (B, T, C), as in Hugging Face."""

    last_hidden_state: Tensor  # (B, T, C)
    pooler_output: Tensor | None  # (B, C), None without a pooler
    hidden_states: tuple[Tensor, ...] | None = None


class BertModel(nn.Module):
    """The BERT encoder with an optional pooler.

    Args:
        config: a `BertConfig`.
        add_pooler: keep the [CLS] pooler (tanh(dense(h[:, 0]))); the MLM model has none.
    """

    def __init__(self, config: BertConfig, add_pooler: bool = True):
        super().__init__()
        self.config = c = config
        self.embeddings = BertEmbeddings(c)
        self.layers = nn.ModuleList(
            EncoderLayer(c.hidden_size, c.num_attention_heads, c.intermediate_size, dropout=c.hidden_dropout_prob,
                         norm_first=False, activation=HF_ACTIVATIONS[c.hidden_act], attn_impl=c.attn_impl,
                         layer_norm_eps=c.layer_norm_eps, attention_dropout=c.attention_probs_dropout_prob,
                         activation_dropout=0.0)
            for _ in range(c.num_hidden_layers)
        )
        self.pooler = nn.Linear(c.hidden_size, c.hidden_size) if add_pooler else None
        self.apply(lambda module: init_bert_weights(module, c.initializer_range))

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, output_hidden_states: bool = False, *,
                inputs_embeds: Tensor | None = None,
                kv_prefixes: list[tuple[Tensor, Tensor]] | None = None) -> BertOutput:
        """Encode a padded batch.

        Args:
            input_ids: (B, T) token ids, [CLS] first. attention_mask: (B, T) 1 = real, 0 = padding, or None.
            token_type_ids: (B, T) segment ids, or None for all zeros.
            output_hidden_states: also return the embedding output and every layer's output.
            inputs_embeds: (B, T, C) word vectors instead of `input_ids` (prompt tuning prepends learned ones).
            kv_prefixes: per layer, (keys, values) each (B, H, P, D) that every query also attends to
                (prefix tuning). As in Hugging Face, the positions of the T tokens then start at P.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        n_prefix = 0
        if kv_prefixes is not None:
            if len(kv_prefixes) != len(self.layers):
                raise ValueError(f"kv_prefixes has {len(kv_prefixes)} entries for {len(self.layers)} layers")
            n_prefix = kv_prefixes[0][0].shape[2]
        check_inputs(input_ids, attention_mask, self.config, inputs_embeds, n_prefix)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # nothing to mask: the fused kernel runs unmasked (its fastest case)
        x = self.embeddings(input_ids, token_type_ids, inputs_embeds, position_offset=n_prefix)  # (B, T, C)
        states = [x]
        for i, layer in enumerate(self.layers):
            x = layer(x, attention_mask, kv_prefix=None if kv_prefixes is None else kv_prefixes[i])  # (B, T, C)
            states.append(x)
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None  # (B, C)
        return BertOutput(x, pooled, tuple(states) if output_hidden_states else None)


class BertForSequenceClassification(nn.Module):
    """BERT + dropout + a linear layer on the pooled [CLS] vector: (B, T) ids -> (B, num_labels) logits."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        p = config.hidden_dropout_prob if config.classifier_dropout is None else config.classifier_dropout
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        init_bert_weights(self.classifier, config.initializer_range)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, **encoder_inputs) -> Tensor:
        """`encoder_inputs` (inputs_embeds, kv_prefixes) go to `BertModel.forward`."""
        pooled = self.bert(input_ids, attention_mask, token_type_ids, **encoder_inputs).pooler_output  # (B, C)
        return self.classifier(self.dropout(pooled))  # (B, num_labels)


class BertForMaskedLM(nn.Module):
    """BERT + the MLM head: dense -> activation -> LayerNorm -> a projection onto the vocabulary whose
    weight *is* the word-embedding matrix (tied, Press & Wolf 2017) plus a per-token bias.
    (B, T) ids -> (B, T, vocab_size) logits."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = c = config
        self.bert = BertModel(c, add_pooler=False)
        self.transform = nn.Linear(c.hidden_size, c.hidden_size)
        self.activation = ACTIVATIONS[HF_ACTIVATIONS[c.hidden_act]]
        self.transform_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.decoder_bias = nn.Parameter(torch.zeros(c.vocab_size))
        init_bert_weights(self.transform, c.initializer_range)

    @property
    def decoder_weight(self) -> Tensor:
        return self.bert.embeddings.word_embeddings.weight  # (V, C), shared with the input embedding

    @torch.no_grad()
    def init_decoder_bias(self, token_counts: Tensor) -> None:
        """Start the output bias at the log unigram frequencies, log((n_i + 1) / sum_j (n_j + 1)), so that the
        untrained model already predicts piece frequencies ("init well": Karpathy 2019, A Recipe for Training
        Neural Networks). From a zero bias, which Adam moves by about lr per step, a short run learns the
        frequencies in the tied embeddings instead: it writes them into one direction shared by every word
        vector, the vectors the encoder reads its input from.

        Args:
            token_counts: (vocab_size,) how often each piece occurs in the training text.
        """
        if token_counts.shape != self.decoder_bias.shape:
            raise ValueError(f"token_counts must have shape ({self.config.vocab_size},), "
                             f"got {tuple(token_counts.shape)}")
        smoothed = token_counts.double() + 1.0  # add-one: a piece never seen still gets a finite logit
        self.decoder_bias.copy_((smoothed / smoothed.sum()).log())

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, **encoder_inputs) -> Tensor:
        """`encoder_inputs` (inputs_embeds, kv_prefixes) go to `BertModel.forward`."""
        h = self.bert(input_ids, attention_mask, token_type_ids, **encoder_inputs).last_hidden_state  # (B, T, C)
        h = self.transform_norm(self.activation(self.transform(h)))  # (B, T, C)
        return nn.functional.linear(h, self.decoder_weight, self.decoder_bias)  # (B, T, V)


def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation: N(0, std^2) weights, zero biases, unit LayerNorm gains, a zero padding row."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def check_inputs(input_ids: Tensor | None, attention_mask: Tensor | None, config: BertConfig,
                 inputs_embeds: Tensor | None = None, n_prefix: int = 0) -> None:
    """Raise a ValueError naming the problem with a batch: shapes, empty rows, ids out of range, length."""
    if inputs_embeds is not None:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[2] != config.hidden_size:
            raise ValueError(f"inputs_embeds must have shape (B, T, hidden_size={config.hidden_size}), "
                             f"got {tuple(inputs_embeds.shape)}")
        shape = tuple(inputs_embeds.shape[:2])
    elif input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
    else:
        shape = tuple(input_ids.shape)
    if attention_mask is not None and tuple(attention_mask.shape) != shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match the batch shape {shape}")
    B, T = shape
    if T == 0:
        raise ValueError("input_ids has no tokens (T = 0)")
    if n_prefix + T > config.max_position_embeddings:
        prefix = f" plus {n_prefix} prefix positions" if n_prefix else ""
        raise ValueError(f"sequence length {T}{prefix} exceeds max_position_embeddings="
                         f"{config.max_position_embeddings}; truncate the input (e.g. the collator's max_length)")
    if input_ids is not None:
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= config.vocab_size:
            raise ValueError(f"token ids must be in [0, {config.vocab_size}), got min {lo}, max {hi}")


# ---------------------------------------------------------------------------------------------------
# Hugging Face names <-> ours. One table, read in both directions; {i} is a layer index.
# ---------------------------------------------------------------------------------------------------
_LAYER_NAMES = {
    "attention.self.query": "attn.q_proj",
    "attention.self.key": "attn.k_proj",
    "attention.self.value": "attn.v_proj",
    "attention.output.dense": "attn.out_proj",
    "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "ff.linear1",
    "output.dense": "ff.linear2",
    "output.LayerNorm": "norm2",
}
_NAMES = {
    "embeddings.word_embeddings": "embeddings.word_embeddings",
    "embeddings.position_embeddings": "embeddings.position_embeddings",
    "embeddings.token_type_embeddings": "embeddings.token_type_embeddings",
    "embeddings.LayerNorm": "embeddings.norm",
    "pooler.dense": "pooler",
    **{f"encoder.layer.{{i}}.{hf}": f"layers.{{i}}.{ours}" for hf, ours in _LAYER_NAMES.items()},
}
# Heads: the module prefix of each class in Hugging Face's files, and its own head tensors.
_HEADS = {
    BertModel: ("", {}),
    BertForSequenceClassification: ("bert.", {"classifier": "classifier"}),
    BertForMaskedLM: ("bert.", {"cls.predictions.transform.dense": "transform",
                                "cls.predictions.transform.LayerNorm": "transform_norm"}),
}
# Tensors of other tasks' heads, skipped when a file is loaded for this class (as Hugging Face does).
_OTHER_HEADS = {BertModel: ("cls.", "classifier."), BertForSequenceClassification: ("cls.",),
                BertForMaskedLM: ("classifier.", "bert.pooler.")}
# Tensors in Hugging Face files that hold nothing to learn: buffers (position ids) and tied copies.
_IGNORED_HF = re.compile(r"(^|\.)embeddings\.(position_ids|token_type_ids)$|^cls\.predictions\.decoder\.(weight|bias)$")


def _module_map(model: nn.Module) -> dict[str, str]:
    """{Hugging Face module path: our module path} for this model, layer indices filled in."""
    prefix, head = _HEADS[type(model)]
    ours_prefix = "" if isinstance(model, BertModel) else "bert."
    layers = model.config.num_hidden_layers
    mapping = {}
    for hf, ours in _NAMES.items():
        for i in range(layers) if "{i}" in hf else [None]:
            mapping[prefix + hf.format(i=i)] = ours_prefix + ours.format(i=i)
    mapping.update(head)
    if isinstance(model, BertForMaskedLM):
        del mapping[prefix + "pooler.dense"]
    return mapping


def hf_module_names(model: nn.Module) -> dict[str, str]:
    """{our module path: Hugging Face module path} for a BERT model; {} for any other model."""
    if type(model) not in _HEADS:
        return {}
    return {ours: hf for hf, ours in _module_map(model).items()}


def hf_to_tunelab(model: nn.Module, hf_name: str) -> str | None:
    """Our parameter name for a Hugging Face tensor name, or None when the name is not ours to load."""
    if isinstance(model, BertForMaskedLM) and hf_name == "cls.predictions.bias":
        return "decoder_bias"
    module, _, leaf = hf_name.rpartition(".")
    ours = _module_map(model).get(module)
    return None if ours is None else f"{ours}.{leaf}"


def tunelab_to_hf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Our weights under Hugging Face names (for `save_pretrained`); tied tensors are written once."""
    inverse = {ours: hf for hf, ours in _module_map(model).items()}
    out = {}
    for name, tensor in model.state_dict().items():
        if isinstance(model, BertForMaskedLM) and name == "decoder_bias":
            out["cls.predictions.bias"] = tensor
            continue
        module, _, leaf = name.rpartition(".")
        out[f"{inverse[module]}.{leaf}"] = tensor
    return out


class StateDictMismatch(ValueError):
    """A Hugging Face state dict does not fit the model: names that map to nothing, or weights not filled."""


def load_hf_state_dict(model: nn.Module, hf_state: dict[str, Tensor], allow_missing: tuple[str, ...] = ()) -> list[str]:
    """Copy a Hugging Face BERT state dict into `model` by explicit name mapping.

    A file saved from a bare `BertModel` (no "bert." prefix) loads into the classes with heads and vice
    versa: the prefix is added or removed. Tensors that Hugging Face keeps but that carry nothing to learn
    (position_ids, the tied MLM decoder) are skipped. Anything else that maps to no parameter of ours is
    an error, as is a parameter of ours that the file leaves empty, unless its name starts with one of
    `allow_missing` (a fresh classification head, say): those keep their initial values.

    Returns:
        The names of our parameters that kept their initial values (allowed missing ones).

    Raises:
        StateDictMismatch: listing unexpected, missing, or wrongly shaped tensors.
    """
    prefix = _HEADS[type(model)][0]
    has_prefix = any(name.startswith("bert.") for name in hf_state)
    if prefix and not has_prefix:
        hf_state = {prefix + k if not _is_head(k) else k: v for k, v in hf_state.items()}
    elif not prefix and has_prefix:
        hf_state = {k[len("bert."):]: v for k, v in hf_state.items() if k.startswith("bert.")}
    ours = model.state_dict()
    unexpected, shapes, filled = [], [], {}
    for hf_name, tensor in hf_state.items():
        if _IGNORED_HF.search(hf_name):
            continue
        if hf_name.startswith(_OTHER_HEADS[type(model)]):
            continue  # another task's head (an MLM head in a file loaded for classification, say)
        name = hf_to_tunelab(model, hf_name)
        if name is None or name not in ours:
            unexpected.append(hf_name)
        elif tuple(tensor.shape) != tuple(ours[name].shape):
            shapes.append(f"{hf_name}: file {tuple(tensor.shape)} vs model {tuple(ours[name].shape)}")
        else:
            filled[name] = tensor
    missing = [n for n in ours if n not in filled and not n.startswith(allow_missing)]
    if unexpected or missing or shapes:
        parts = []
        for title, names in (("unexpected keys (in the file, not in the model)", unexpected),
                             ("missing keys (in the model, not in the file)", missing),
                             ("shape mismatches", shapes)):
            if names:
                more = f" ... (+{len(names) - 20})" if len(names) > 20 else ""
                parts.append(f"{title}: {', '.join(names[:20])}{more}")
        raise StateDictMismatch(f"cannot load this state dict into {type(model).__name__}: " + "; ".join(parts))
    with torch.no_grad():
        for name, tensor in filled.items():
            ours[name].copy_(tensor)
    return [n for n in ours if n not in filled]


def _is_head(hf_name: str) -> bool:
    return hf_name.startswith(("cls.", "classifier."))


def _encoder(model: nn.Module) -> BertModel:
    return model if isinstance(model, BertModel) else model.bert


def _dims(c: BertConfig) -> Dims:
    H = c.num_attention_heads
    return Dims(c.hidden_size, c.num_hidden_layers, H, H, c.hidden_size // H, c.max_position_embeddings)


# peft's task_type: it decides which PeftModel class `PeftModel.from_pretrained` builds around the model.
TASK_TYPES = {BertForSequenceClassification: "SEQ_CLS", BertModel: "FEATURE_EXTRACTION", BertForMaskedLM: None}


BERT_FAMILY = ModelFamily(
    name="bert", hf_module_names=hf_module_names,
    embeddings=lambda model: _encoder(model).embeddings.word_embeddings,
    blocks=lambda model: _encoder(model).layers, dims=lambda model: _dims(model.config),
    lora_targets=("q_proj", "v_proj"), feedforward=("ff.linear2",), top=("pooler",), outputs=("classifier",),
    task_type=lambda model: TASK_TYPES[type(model)])
for _cls in (BertModel, BertForSequenceClassification, BertForMaskedLM):
    _cls.family = BERT_FAMILY
