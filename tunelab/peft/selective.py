"""Selective fine-tuning: train a chosen subset of the pretrained weights and freeze the rest.

No new parameters are added; a method only decides which existing tensors get gradients:
- `freeze` / `unfreeze`: everything off / on (a linear probe is `freeze` plus a trainable head);
- BitFit (Ben Zaken et al. 2021, https://arxiv.org/abs/2106.10199): only the bias terms;
- `train_last_layers`: the top k encoder layers and what sits above them.
`count_parameters` reports the result the way peft's `print_trainable_parameters` does, and
`save_adapter` / `load_adapter` keep only what trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from tunelab.core.family import family_of
from tunelab.peft.inject import matches
from tunelab.peft.saving import load_trained, save_trained

# Modules that sit between the top encoder layer and the head: BERT's [CLS] pooler and the final
# LayerNorm of a pre-norm stack. Training the last k layers while freezing these would fix the very
# functions that read those layers out.
ON_TOP_OF_LAYERS = ("pooler", "final_norm")


def freeze(model: nn.Module) -> nn.Module:
    """Stop gradients to every parameter (requires_grad=False); returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Let every parameter train again (requires_grad=True); returns the model."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def find_modules(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Paths of the modules named (by suffix, e.g. "classifier") in `names`; a name matching nothing raises."""
    if isinstance(names, str):
        raise ValueError(f"modules_to_save must be a list of module names, got the string {names!r}")
    found = [n for n, _ in model.named_modules() if n and matches(n, list(names))]
    missing = [t for t in names if not any(matches(n, [t]) for n in found)]
    if missing:
        raise ValueError(f"modules_to_save {missing} matched no module; the top-level modules of this model are: "
                         f"{[n for n, _ in model.named_children()]}")
    return found


def unfreeze_modules(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Make trainable the modules named (by suffix) in `names`; return their paths.

    These train in place, not as a copy next to a frozen original (peft's `modules_to_save`,
    `tunelab.peft.inject.ModulesToSave`): the copy lets several adapters share one base model, while
    selective methods change the base model itself, so there is nothing to share.
    """
    found = find_modules(model, names)
    for name in found:
        unfreeze(model.get_submodule(name))
    return found


def is_bias(parameter_name: str) -> bool:
    """A bias term: a parameter called `bias` (Linear, LayerNorm) or `..._bias` (BertForMaskedLM's decoder_bias)."""
    leaf = parameter_name.rpartition(".")[2]
    return leaf == "bias" or leaf.endswith("_bias")


def apply_bitfit(model: nn.Module, modules_to_save: Sequence[str] = ("classifier",)) -> nn.Module:
    """BitFit (Ben Zaken et al. 2021): freeze every weight, train every bias, and the new head in full.

    BitFit trains all bias terms of the encoder, in its notation b_q, b_k, b_v (attention), b_m1 (attention
    output), b_m2, b_m3 (feed-forward) and the LayerNorm biases b_LN1, b_LN2 of every layer. On our BERT
    that is, per layer, the biases of attn.{q,k,v,out}_proj, ff.linear{1,2} and norm{1,2} (7C + d_ff
    numbers), plus the embedding LayerNorm's bias and the pooler's bias (C each), plus the head given in
    `modules_to_save` (weight and bias). On `TransformerClassifier` pass modules_to_save=("head",).
    LayerNorm gains stay frozen: they are scales, not biases. Changes the model in place; returns it.
    """
    biases = [p for name, p in model.named_parameters() if is_bias(name)]
    if not biases:
        raise ValueError("apply_bitfit found no bias parameter in this model (nothing named 'bias' or '*_bias')")
    find_modules(model, modules_to_save)  # a misspelt name raises before the model is touched
    freeze(model)
    for p in biases:
        p.requires_grad_(True)
    unfreeze_modules(model, modules_to_save)
    return model


def find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of layers: its family's blocks (`bert.layers`, `transformer.h`, `model.layers`), else the
    one nn.ModuleList named `layers` (TransformerClassifier's)."""
    family = family_of(model)
    if family is not None:
        blocks = family.blocks(model)
        return next(n for n, m in model.named_modules() if m is blocks), blocks
    stacks = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and matches(n, ["layers"])]
    if len(stacks) != 1:
        lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        found = "none" if not stacks else [n for n, _ in stacks]
        raise ValueError(f"expected one nn.ModuleList named 'layers', found {found}; "
                         f"the ModuleLists of this model are: {lists}")
    return stacks[0]


def train_last_layers(model: nn.Module, k: int, modules_to_save: Sequence[str] = ("classifier",)) -> nn.Module:
    """Freeze the model except its last k layers, the modules above them (pooler, final norm) and the head.

    The classic alternative to PEFT when memory is short: lower layers hold general features, the top
    ones adapt most during fine-tuning, so training only the top k keeps most of the gain for a fraction
    of the optimizer state. Changes the model in place; returns it.

    Args:
        model: a model of a family (BERT, GPT-2, Llama), or one with one nn.ModuleList named `layers`
            (TransformerClassifier).
        k: how many of the top layers to train, 1 <= k <= number of layers.
        modules_to_save: modules trained in full, by name suffix (the classification head).
    """
    name, layers = find_layer_stack(model)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(layers):
        raise ValueError(f"k must be an int between 1 and the number of layers in {name!r} ({len(layers)}), got {k!r}")
    find_modules(model, modules_to_save)  # a misspelt name raises before the model is touched
    freeze(model)
    for layer in layers[len(layers) - k:]:
        unfreeze(layer)
    family = family_of(model)
    on_top = family.top if family is not None else ON_TOP_OF_LAYERS
    for module_name, module in model.named_modules():
        if matches(module_name, on_top):
            unfreeze(module)
    unfreeze_modules(model, modules_to_save)
    return model


@dataclass
class LastLayersConfig:
    """`train_last_layers`' one option. layers: how many of the top layers train (with the head above them)."""

    layers: int = 2


def save_adapter(model: nn.Module, folder: str | Path, method: str = "selective") -> Path:
    """Write the parameters that train (the biases, or the top layers, and the head) under their own names;
    `method` ("bitfit", "last-layers") is recorded in adapter_config.json for whoever reads the folder."""
    return save_trained(model, folder, method)


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Load what `save_adapter` wrote into `model`, on which the same selection was made first (e.g.
    `apply_bitfit`): the file must hold exactly the parameters that train, or nothing is loaded."""
    return load_trained(model, folder)


@dataclass(frozen=True)
class ParameterCount:
    """How many parameters a model has and how many of them train; `str()` reads like peft's
    `print_trainable_parameters`: "trainable params: 1,090 || all params: 21,134 || trainable%: 5.1576"."""

    total: int
    trainable: int

    @property
    def percent(self) -> float:
        """Trainable share in percent (0 for a model without parameters)."""
        return 100 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.percent:.4f}"


def count_parameters(model: nn.Module) -> ParameterCount:
    """Count every parameter once (a tied matrix, shared by two modules, counts once, as in peft's
    `get_nb_trainable_parameters`); trainable = requires_grad. A weight stored in codes (a quantized layer:
    a module with `dequantize_weight()`, whose codes are buffers) counts as the in x out weights it stands
    for, frozen, as peft counts bitsandbytes' packed 4-bit weights."""
    total = trainable = 0
    for p in model.parameters():  # parameters() yields a shared tensor once
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    for module in model.modules():
        if callable(getattr(module, "dequantize_weight", None)):
            total += module.in_features * module.out_features
    return ParameterCount(total=total, trainable=trainable)
