"""The fine-tuning methods of `tunelab finetune`, one record each: how a method is put on a pretrained model,
what it trains, how it is saved and loaded back.

    full               every weight trains                         saved as a Hugging Face model folder
    lora, dora         low-rank updates of chosen Linear layers    peft adapter folder (or --merge: a full folder)
    qlora              LoRA on a frozen NF4 base (double-quantized) peft adapter folder (or --merge: a full folder)
    ia3                learned scaling of keys, values, FFN input  peft adapter folder
    prompt, prefix     learned virtual tokens / key-value prefixes peft adapter folder
    adapter-houlsby,   bottleneck adapters in every layer          the trained tensors, under our names
    adapter-pfeiffer
    bitfit             biases only (+ the new head)                the trained tensors, under our names
    last-layers        the top k encoder layers (+ the new head)   the trained tensors, under our names

`METHODS` is the one table: the CLI's --help, `tunelab finetune`, `tunelab evaluate` and the benchmarks read it.
A method's options (rank, targets, number of virtual tokens ...) are the fields of its config dataclass in
tunelab.peft; `method_config` refuses unknown ones by name. Every PEFT adapter holds only what was trained (and
the new classification head); loading one rebuilds the pretrained model and applies the method first.
Adding a method is one `Method(...)` line below, plus its module in tunelab.peft and its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from torch import nn

from tunelab.peft import adapters, ia3, lora, prompt, qlora, selective
from tunelab.peft.saving import ADAPTER_WEIGHTS


@dataclass(frozen=True)
class Method:
    """One fine-tuning method.

    Args:
        name: what `--method` says.
        summary: one line for `tunelab finetune --help`.
        lr: peak learning rate when none is given (see the sources below the table).
        apply: (model, config, tokenizer) -> the module to train; freezes what stays fixed, adds what trains.
        config: the dataclass of the method's options (None: the method takes none).
        fixed: config fields the method fixes (dora is LoRA with use_dora=True).
        save, load: (model, folder) -> folder / model: the method module's `save_adapter` / `load_adapter`.
            None for full fine-tuning, which saves the whole model as a Hugging Face folder.
        merge: (model) -> model with the update folded into its weights, the plain pretrained architecture
            (None: the method has no update to fold).
        saved_config: the options a saved adapter is rebuilt with, when they differ from the training ones.
    """

    name: str
    summary: str
    lr: float
    apply: Callable
    config: type | None = None
    fixed: dict = field(default_factory=dict)
    save: Callable | None = None
    load: Callable | None = None
    merge: Callable | None = None
    saved_config: Callable | None = None

    @property
    def mergeable(self) -> bool:
        return self.merge is not None

    def options(self) -> list[str]:
        """The option names this method takes (its config's fields, minus the fixed ones)."""
        return [] if self.config is None else [f.name for f in fields(self.config) if f.name not in self.fixed]

    def make_config(self, options: dict):
        """The method's config dataclass built from `options` (None for a method without options)."""
        known = self.options()
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown {self.name} options {unknown}; known: {sorted(known) or 'none'}")
        if self.config is None:
            return None
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
        return self.config(**values, **self.fixed)


def _merge_lora(model: nn.Module) -> nn.Module:
    return lora.unload_lora(model, merge=True)


def _save_selective(method: str) -> Callable:
    return lambda model, folder: selective.save_adapter(model, folder, method)


# Peak learning rates. Methods that train few parameters from a zero or identity start want larger steps than
# full fine-tuning's 5e-5 (Devlin et al. 2019): LoRA 4e-4..5e-4 on RoBERTa-base GLUE over 30-80 epochs (Hu et al.
# 2021, table 9), doubled here for a 2-epoch budget; adapters 1e-4..1e-3 (Houlsby et al. 2019); BitFit 1e-4..1e-3
# (Ben Zaken et al. 2021); IA3 3e-3 (Liu et al. 2022); prompt tuning 0.3 with Adafactor (Lester et al. 2021),
# about 3e-2 with AdamW on small models; prefix tuning 5e-5..8e-5 with its MLP (Li & Liang 2021), 1e-2 without.
# QLoRA takes LoRA's rate: the comparison between them changes only how the frozen base is stored (the paper
# trains 7B-65B models at 1e-4..2e-4, Dettmers et al. 2023, table 9).
_TABLE = (
    Method("full", "every weight trains", 5e-5, apply=lambda model, config, tokenizer: model),
    Method("lora", "low-rank updates B A of chosen Linear layers (Hu et al. 2021)", 1e-3,
           apply=lambda model, config, tokenizer: lora.apply_lora(model, config), config=lora.LoRAConfig,
           fixed={"use_dora": False}, save=lora.save_adapter, load=lora.load_adapter, merge=_merge_lora),
    Method("dora", "LoRA on the direction, a learned magnitude per output (Liu et al. 2024)", 1e-3,
           apply=lambda model, config, tokenizer: lora.apply_lora(model, config), config=lora.LoRAConfig,
           fixed={"use_dora": True}, save=lora.save_adapter, load=lora.load_adapter, merge=_merge_lora),
    Method("qlora", "LoRA on every linear layer of a frozen NF4 base (Dettmers et al. 2023)", 1e-3,
           apply=lambda model, config, tokenizer: qlora.prepare_qlora(model, config), config=qlora.QLoRAConfig,
           save=lora.save_adapter, load=lora.load_adapter, merge=qlora.merge_qlora),
    Method("adapter-houlsby", "bottleneck adapters after attention and feed-forward (Houlsby et al. 2019)", 1e-3,
           apply=lambda model, config, tokenizer: adapters.apply_adapters(model, config),
           config=adapters.AdapterConfig, fixed={"style": "houlsby"}, save=adapters.save_adapter,
           load=adapters.load_adapter),
    Method("adapter-pfeiffer", "bottleneck adapters after the feed-forward only (Pfeiffer et al. 2020)", 1e-3,
           apply=lambda model, config, tokenizer: adapters.apply_adapters(model, config),
           config=adapters.AdapterConfig, fixed={"style": "pfeiffer"}, save=adapters.save_adapter,
           load=adapters.load_adapter),
    Method("prompt", "learned virtual tokens before the input (Lester et al. 2021)", 3e-2,
           apply=lambda model, config, tokenizer: prompt.apply_prompt_tuning(model, config, tokenizer=tokenizer),
           config=prompt.PromptTuningConfig, save=prompt.save_adapter, load=prompt.load_adapter),
    # peft saves a prefix after its MLP, which cannot be inverted: the saved prefix is rebuilt without one.
    Method("prefix", "learned keys and values prepended in every layer (Li & Liang 2021)", 1e-2,
           apply=lambda model, config, tokenizer: prompt.apply_prefix_tuning(model, config),
           config=prompt.PrefixTuningConfig, save=prompt.save_adapter, load=prompt.load_adapter,
           saved_config=lambda config: replace(config, projection=False)),
    Method("ia3", "learned scaling of keys, values and feed-forward input (Liu et al. 2022)", 3e-3,
           apply=lambda model, config, tokenizer: ia3.apply_ia3(model, config), config=ia3.IA3Config,
           save=ia3.save_adapter, load=ia3.load_adapter),
    Method("bitfit", "the biases and the new head (Ben Zaken et al. 2021)", 1e-3,
           apply=lambda model, config, tokenizer: selective.apply_bitfit(model), save=_save_selective("bitfit"),
           load=selective.load_adapter),
    Method("last-layers", "the top k encoder layers and the new head", 1e-4,
           apply=lambda model, config, tokenizer: selective.train_last_layers(model, config.layers),
           config=selective.LastLayersConfig, save=_save_selective("last-layers"), load=selective.load_adapter),
)
METHODS: dict[str, Method] = {method.name: method for method in _TABLE}


def get_method(name: str) -> Method:
    """The record of method `name`; an unknown name is refused with the list of methods."""
    if name not in METHODS:
        raise ValueError(f"unknown fine-tuning method {name!r}; available: {list(METHODS)}")
    return METHODS[name]


def method_config(method: str, options: dict):
    """The config dataclass of `method` built from `options` (None for a method without options)."""
    return get_method(method).make_config(options)


def apply_method(model: nn.Module, method: str, options: dict, tokenizer=None) -> nn.Module:
    """Prepare a pretrained classifier for `method`: freeze what stays fixed, add what trains.
    Returns the module to train (the prompt methods wrap the model; the others change it in place)."""
    record = get_method(method)
    return record.apply(model, record.make_config(options), tokenizer)


def save_method(model: nn.Module, method: str, folder: str | Path) -> Path:
    """Write what `method` trained to `folder`: peft's layout where peft has the method, else our tensors."""
    record = get_method(method)
    if record.save is None:
        raise ValueError(f"{method} fine-tuning saves the whole model (save_pretrained), not an adapter")
    return record.save(model, folder)


def rebuild_method(model: nn.Module, method: str, options: dict, folder: str | Path, tokenizer=None) -> nn.Module:
    """A pretrained model with a saved run's adapter, ready for inference: `apply_method`, then the method's
    `load` fills in what was trained."""
    record = get_method(method)
    config = record.make_config(options)
    if record.saved_config is not None:
        config = record.saved_config(config)
    if record.load is None:
        raise ValueError(f"{method} fine-tuning saves the whole model; load it with load_pretrained")
    return record.load(record.apply(model, config, tokenizer), folder)


def merge_method(model: nn.Module, method: str) -> nn.Module:
    """The plain pretrained architecture with the learned update folded into its weights (LoRA, DoRA, QLoRA)."""
    if not get_method(method).mergeable:
        mergeable = [name for name, record in METHODS.items() if record.mergeable]
        raise ValueError(f"--merge folds low-rank updates into the weights; {method!r} has none to fold "
                         f"(mergeable: {mergeable})")
    return get_method(method).merge(model)


def adapter_bytes(folder: str | Path) -> int:
    """Size of the saved tensors (adapter_model.safetensors) in bytes."""
    return (Path(folder) / ADAPTER_WEIGHTS).stat().st_size
