"""Model families: what the methods that adapt or compress a model need to know of it, in one small record.

Each family (BERT, GPT-2, Llama) describes itself once, next to its model classes, and sets the description as
the `family` attribute of those classes. `tunelab.peft` reads `family_of(model)` and never imports a model class,
so a method written once works on every family, and a new family is one new description:

    hf_module_names   our module path -> the Hugging Face module path (adapter files name Hugging Face's modules)
    embeddings        the token embedding table (prompt tuning reads and extends it)
    blocks            the stack of transformer blocks (the last layers)
    dims              the sizes soft prompts are built to: width, layers, attention heads and key/value heads,
                      head width, and the number of learned positions (None for rotary positions)
    lora_targets      peft's default target_modules for the family
    feedforward       the layers (IA)^3 scales at their input rather than their output
    top               the modules between the last block and the head (BERT's pooler, a final norm)
    outputs           the output layers (a classifier, the LM head): never adapted by `targets="all-linear"`
    transposed        layers whose Hugging Face weight is stored (in, out), GPT-2's Conv1D: peft's fan_in_fan_out
    task_type         peft's task_type for a model of the family ("SEQ_CLS", "CAUSAL_LM", ...; None: no head
                      peft knows). "CAUSAL_LM" models take (input_ids, attention_mask, position_ids, cache) and
                      keep a KV cache, which soft prompts join during generation.

Where a bottleneck adapter goes is a property of a block, not of a family: every block class names its two
residual branches (`residual_branches`), so adapters also fit models that have no family description.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Dims:
    """The sizes of a model that soft prompts are built to."""

    width: int  # C, the hidden size
    layers: int  # L, the number of blocks
    heads: int  # H, query heads
    kv_heads: int  # H_kv, key/value heads (H for multi-head attention, fewer for grouped-query)
    head_dim: int  # D
    max_positions: int | None  # learned position embeddings; None: rotary, no fixed limit


@dataclass(frozen=True)
class ModelFamily:
    name: str
    hf_module_names: Callable[[nn.Module], dict[str, str]]
    embeddings: Callable[[nn.Module], nn.Embedding]
    blocks: Callable[[nn.Module], nn.ModuleList]
    dims: Callable[[nn.Module], Dims]
    lora_targets: tuple[str, ...]
    feedforward: tuple[str, ...]
    task_type: Callable[[nn.Module], str | None]
    top: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    transposed: tuple[str, ...] = ()

    def is_transposed(self, module_path: str) -> bool:
        """Whether the Hugging Face weight of our module `module_path` is stored (in, out)."""
        return any(module_path == t or module_path.endswith("." + t) for t in self.transposed)


def family_of(model: nn.Module) -> ModelFamily | None:
    """The description of `model`'s family, or None for a model that has none (e.g. a bare nn.Module)."""
    family = getattr(type(model), "family", None)
    return family if isinstance(family, ModelFamily) else None


def hf_module_names(model: nn.Module) -> dict[str, str]:
    """{our module path: Hugging Face module path} of `model`'s family; {} when it has none (names kept)."""
    family = family_of(model)
    return {} if family is None else family.hf_module_names(model)
