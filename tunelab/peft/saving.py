"""Adapters on disk in Hugging Face peft's layout, so that peft reads ours and we read peft's.

A peft adapter folder holds adapter_config.json (the method's settings, `peft_type` among them) and
adapter_model.safetensors, whose tensor names are the module paths of the Hugging Face model:

    LoRA, IA3 (peft "tuners"):   base_model.model.<HF module path>.<leaf>   e.g. ...attention.self.query.lora_A.weight
    prompt and prefix tuning:    prompt_embeddings, and base_model.<HF module path>.<leaf> for saved heads

The adapter's own name ("default") never appears in the file. Our module paths are translated with the
model family's name table (`tunelab.core.bert.hf_module_names`); models without one keep our names.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor, nn

from tunelab.core.bert import hf_module_names
from tunelab.core.hub import atomic_folder, read_safetensors, write_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROMPT_LEARNING = ("PROMPT_TUNING", "PREFIX_TUNING")


def key_prefix(peft_type: str) -> str:
    """What peft puts before a module path: its PeftModel wraps tuners in one more `.model`."""
    return "base_model." if peft_type in PROMPT_LEARNING else "base_model.model."


def to_hf_path(model: nn.Module, path: str) -> str:
    """Hugging Face module path for our module `path` (unchanged when the model has no name table)."""
    return hf_module_names(model).get(path, path)


def from_hf_path(model: nn.Module, hf_path: str) -> str:
    """Our module path for a Hugging Face module path (unchanged when the model has no name table)."""
    inverse = {hf: ours for ours, hf in hf_module_names(model).items()}
    return inverse.get(hf_path, hf_path)


def peft_key(model: nn.Module, path: str, leaf: str, peft_type: str) -> str:
    """The tensor name peft uses for `leaf` (e.g. "lora_A.weight") of our module `path`."""
    return f"{key_prefix(peft_type)}{to_hf_path(model, path)}.{leaf}"


def split_peft_key(model: nn.Module, key: str, peft_type: str, leaves: tuple[str, ...]) -> tuple[str, str] | None:
    """(our module path, leaf) for a peft tensor name ending in one of `leaves`, or None if it is not one."""
    prefix = key_prefix(peft_type)
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix):]
    for leaf in leaves:
        if rest.endswith("." + leaf):
            return from_hf_path(model, rest[: -len(leaf) - 1]), leaf
    return None


def write_adapter(folder: str | Path, config: dict, tensors: dict[str, Tensor]) -> Path:
    """Write adapter_config.json and adapter_model.safetensors atomically (all or nothing)."""
    if "peft_type" not in config:
        raise ValueError("an adapter config needs a peft_type")
    with atomic_folder(folder) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        write_safetensors(tmp / ADAPTER_WEIGHTS, tensors)
    return Path(folder)


def read_adapter(folder: str | Path, expected_types: tuple[str, ...] | None = None) -> tuple[dict, dict[str, Tensor]]:
    """(config, tensors) of an adapter folder. A pickled adapter_model.bin is refused, never unpickled."""
    folder = Path(folder)
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no {ADAPTER_CONFIG}: not an adapter folder")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON ({error})") from error
    peft_type = config.get("peft_type")
    if expected_types is not None and peft_type not in expected_types:
        raise ValueError(f"{folder} holds a {peft_type} adapter; expected one of {list(expected_types)}")
    return config, read_safetensors(folder / ADAPTER_WEIGHTS)
