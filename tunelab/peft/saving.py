"""Adapters on disk in Hugging Face peft's layout, so that peft reads ours and we read peft's.

A peft adapter folder holds adapter_config.json (the method's settings, `peft_type` among them) and
adapter_model.safetensors, whose tensor names are the module paths of the Hugging Face model:

    LoRA, IA3 (peft "tuners"):   base_model.model.<HF module path>.<leaf>   e.g. ...attention.self.query.lora_A.weight
    prompt and prefix tuning:    prompt_embeddings, and base_model.<HF module path>.<leaf> for saved heads

The adapter's own name ("default") never appears in the file. Our module paths are translated with the
model family's name table (`tunelab.core.family`); models without one keep our names.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor, nn

from tunelab.core.family import family_of, hf_module_names
from tunelab.core.io import atomic_folder, read_safetensors, write_safetensors

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


def fan_in_fan_out(model: nn.Module, paths) -> bool:
    """peft's fan_in_fan_out for these adapted layers: True when Hugging Face stores their weights (in, out), as
    GPT-2's Conv1D (our nn.Linear holds the transpose, so the adapter tensors are the same; only peft's merge
    needs to know). One setting serves the whole adapter, so a mix of both kinds cannot be written for peft."""
    family = family_of(model)
    kinds = {bool(family and family.is_transposed(path)) for path in paths}
    if len(kinds) > 1:
        raise ValueError("peft's adapter config has one fan_in_fan_out for all layers; these targets mix Conv1D "
                         f"layers with Linear ones: {sorted(paths)}")
    return kinds.pop()


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


# Adapter folders of the methods peft does not have (bottleneck adapters, BitFit, last layers): the tensors that
# train, under our own parameter names, with peft_type TUNELAB and the method's name in adapter_config.json.
OURS = "TUNELAB"


def save_trained(model: nn.Module, folder: str | Path, method: str) -> Path:
    """Write every parameter of `model` that trains (requires_grad) under its own name; `method` names the
    method in adapter_config.json, for whoever reads the folder."""
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trained:
        raise ValueError(f"this model has no trainable parameters to save as a {method} adapter")
    return write_adapter(folder, {"peft_type": OURS, "method": method}, trained)


def check_fit(tensors: dict[str, Tensor], expected: dict[str, Tensor], what: str, folder: str | Path) -> None:
    """Refuse an adapter file whose `tensors` are not exactly the `expected` names with their shapes: `what`
    says what they should be ("the model's trainable parameters"); the error lists every difference."""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{folder} does not fit {what}: missing tensors {missing}, unexpected tensors {unexpected}")
    shapes = [f"{k}: file {tuple(t.shape)} vs model {tuple(expected[k].shape)}" for k, t in tensors.items()
              if t.shape != expected[k].shape]
    if shapes:
        raise ValueError(f"shape mismatches in {folder}: {', '.join(shapes)}")


def load_trained(model: nn.Module, folder: str | Path) -> nn.Module:
    """Copy what `save_trained` wrote into the trainable parameters of `model`, prepared the same way (same
    method, same options): the file must hold exactly those tensors, with their shapes, or nothing is loaded."""
    config, tensors = read_adapter(folder, expected_types=(OURS,))
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    check_fit(tensors, trained, f"the model's trainable parameters (it holds a {config.get('method')} adapter)",
              folder)
    for name, p in trained.items():
        p.data.copy_(tensors[name])
    return model
