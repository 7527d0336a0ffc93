"""The fine-tuning methods of `tunelab finetune`: how each is put on a pretrained BERT, saved, and loaded back.

    full               every weight trains                         saved as a Hugging Face model folder
    lora, dora         low-rank updates of chosen Linear layers    peft adapter folder (or --merge: a full folder)
    ia3                learned scaling of keys, values, FFN input  peft adapter folder
    prompt, prefix     learned virtual tokens / key-value prefixes peft adapter folder
    adapter-houlsby,   bottleneck adapters in every layer          the trained tensors, under our names
    adapter-pfeiffer
    bitfit             biases only (+ the new head)                the trained tensors, under our names
    last-layers        the top k encoder layers (+ the new head)   the trained tensors, under our names

A method's options (rank, targets, number of virtual tokens ...) are the fields of its config dataclass in
tunelab.peft; `apply_method` refuses unknown ones by name. Every PEFT checkpoint holds only what was trained
(and the new classification head); loading one rebuilds the pretrained model and applies the method first.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from torch import nn

from tunelab.peft import adapters, ia3, lora, prompt, selective
from tunelab.peft.saving import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter, write_adapter

METHODS = ("full", "lora", "dora", "adapter-houlsby", "adapter-pfeiffer", "prompt", "prefix", "ia3", "bitfit",
           "last-layers")
# Methods whose options are a config dataclass's fields, and what those options fix for the method.
CONFIGS = {"lora": (lora.LoRAConfig, {"use_dora": False}), "dora": (lora.LoRAConfig, {"use_dora": True}),
           "adapter-houlsby": (adapters.AdapterConfig, {"style": "houlsby"}),
           "adapter-pfeiffer": (adapters.AdapterConfig, {"style": "pfeiffer"}),
           "prompt": (prompt.PromptTuningConfig, {}), "prefix": (prompt.PrefixTuningConfig, {}),
           "ia3": (ia3.IA3Config, {})}
OTHER_OPTIONS = {"full": (), "bitfit": (), "last-layers": ("layers",)}
MERGEABLE = ("lora", "dora")
# Peak learning rates when none is given. Methods that train few parameters from a zero or identity start
# want larger steps than full fine-tuning's 5e-5 (Devlin et al. 2019): LoRA 4e-4..5e-4 on RoBERTa-base GLUE
# over 30-80 epochs (Hu et al. 2021, table 9), doubled here for a 2-epoch budget (one epoch on 2,000 IMDB
# reviews: 5e-4 reached 70.5%, 2e-3 82.8%, full fine-tuning 82.9%); adapters 1e-4..1e-3 (Houlsby et al.
# 2019); BitFit 1e-4..1e-3 (Ben Zaken et al. 2021); IA3 3e-3 (Liu et al. 2022); prompt tuning 0.3 with
# Adafactor (Lester et al. 2021), about 3e-2 with AdamW on small models; prefix tuning 5e-5..8e-5 with its
# MLP (Li & Liang 2021), 1e-2 without one.
DEFAULT_LR = {"full": 5e-5, "lora": 1e-3, "dora": 1e-3, "adapter-houlsby": 1e-3, "adapter-pfeiffer": 1e-3,
              "prompt": 3e-2, "prefix": 1e-2, "ia3": 3e-3, "bitfit": 1e-3, "last-layers": 1e-4}
OURS = "TUNELAB"  # peft_type of the adapter folders of methods peft does not have


def method_config(method: str, options: dict):
    """The config dataclass of `method` built from `options` (None for full, bitfit, last-layers)."""
    if method not in METHODS:
        raise ValueError(f"unknown fine-tuning method {method!r}; available: {list(METHODS)}")
    if method not in CONFIGS:
        unknown = sorted(set(options) - set(OTHER_OPTIONS[method]))
        if unknown:
            raise ValueError(f"unknown {method} options {unknown}; known: {list(OTHER_OPTIONS[method])}")
        return None
    cls, fixed = CONFIGS[method]
    known = {f.name for f in fields(cls)} - set(fixed)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown {method} options {unknown}; known: {sorted(known)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    return cls(**values, **fixed)


def apply_method(model: nn.Module, method: str, options: dict, tokenizer=None) -> nn.Module:
    """Prepare a pretrained classifier for `method`: freeze what stays fixed, add what trains.
    Returns the module to train (the prompt methods wrap the model; the others change it in place)."""
    config = method_config(method, options)
    if method == "full":
        return model
    if method in ("lora", "dora"):
        return lora.apply_lora(model, config)
    if method.startswith("adapter-"):
        return adapters.apply_adapters(model, config)
    if method == "prompt":
        return prompt.apply_prompt_tuning(model, config, tokenizer=tokenizer)
    if method == "prefix":
        return prompt.apply_prefix_tuning(model, config)
    if method == "ia3":
        return ia3.apply_ia3(model, config)
    if method == "bitfit":
        return selective.apply_bitfit(model)
    return selective.train_last_layers(model, options.get("layers", 2))


def save_method(model: nn.Module, method: str, options: dict, folder: str | Path) -> Path:
    """Write what `method` trained to `folder`: peft's layout where peft has the method, else our tensors."""
    if method in ("lora", "dora"):
        return lora.save_adapter(model, folder)
    if method == "ia3":
        return ia3.save_ia3_adapter(model, folder)
    if method in ("prompt", "prefix"):
        return prompt.save_prompt_adapter(model, folder)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    return write_adapter(folder, {"peft_type": OURS, "method": method, "options": options}, trained)


def load_method(model: nn.Module, method: str, folder: str | Path) -> nn.Module:
    """Load what `save_method` wrote into `model`, to which `apply_method` was applied (same method, options)."""
    if method in ("lora", "dora"):
        return lora.load_adapter(model, folder)
    if method == "ia3":
        return ia3.load_ia3_adapter(model, folder)
    if method in ("prompt", "prefix"):
        return prompt.load_prompt_adapter(model, folder)
    config, tensors = read_adapter(folder, expected_types=(OURS,))
    if config.get("method") != method:
        raise ValueError(f"{Path(folder) / ADAPTER_CONFIG} holds a {config.get('method')!r} adapter, not {method!r}")
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(trained) - set(tensors)), sorted(set(tensors) - set(trained))
    if missing or unexpected:
        raise ValueError(f"the {method} adapter in {folder} does not fit the model: missing {missing}, "
                         f"unexpected {unexpected}")
    for name, p in trained.items():
        if p.shape != tensors[name].shape:
            raise ValueError(f"{name}: the adapter holds shape {tuple(tensors[name].shape)}, "
                             f"the model {tuple(p.shape)}")
        p.data.copy_(tensors[name])
    return model


def rebuild_method(model: nn.Module, method: str, options: dict, folder: str | Path, tokenizer=None) -> nn.Module:
    """`apply_method` then `load_method`: a pretrained model with a saved run's adapter, ready for inference.
    A prefix trained through its MLP is saved after the MLP (as peft saves it), so it is rebuilt without one."""
    if method == "prefix":
        options = {**options, "projection": False}
    return load_method(apply_method(model, method, options, tokenizer), method, folder)


def merge_method(model: nn.Module, method: str) -> nn.Module:
    """The plain pretrained architecture with the learned update folded into its weights (LoRA, DoRA)."""
    if method not in MERGEABLE:
        raise ValueError(f"--merge folds low-rank updates into the weights; {method!r} has none to fold "
                         f"(mergeable: {list(MERGEABLE)})")
    return lora.unload_lora(model, merge=True)


def adapter_bytes(folder: str | Path) -> int:
    """Size of the saved tensors (adapter_model.safetensors) in bytes."""
    return (Path(folder) / ADAPTER_WEIGHTS).stat().st_size
