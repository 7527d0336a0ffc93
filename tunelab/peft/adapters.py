"""Bottleneck adapters: a small trained MLP with a residual, inserted into every frozen encoder layer.

Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP" (https://arxiv.org/abs/1902.00751):

    adapter(h) = h + W_up act(W_down h + b_down) + b_up,   W_down: (m, C), W_up: (C, m), m = C // reduction_factor

placed on the output of each sublayer, before the residual add and LayerNorm (Houlsby, fig. 2):

    x = LN(x + adapter(dropout(Attn(x))));   x = LN(x + adapter(dropout(FFN(x))))      post-norm (BERT)
    x = x + adapter(dropout(Attn(LN(x))));   x = x + adapter(dropout(FFN(LN(x))))      pre-norm (GPT, Llama)

Pfeiffer et al. 2020, "AdapterFusion" (https://arxiv.org/abs/2005.00247) keep only the second one, after
the feed-forward block: half the adapter parameters. W_up starts at zero, so before training every
adapter is the identity and the model computes exactly its pretrained function.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

from torch import Tensor, nn

from tunelab.core.layers import ACTIVATIONS
from tunelab.peft.saving import load_trained, save_trained
from tunelab.peft.selective import find_modules, freeze, unfreeze_modules

STYLES = ("houlsby", "pfeiffer")


@dataclass
class AdapterConfig:
    """Where and how large the bottleneck adapters are.

    Args:
        style: "houlsby" (after attention and after the feed-forward, Houlsby et al. 2019) or "pfeiffer"
            (after the feed-forward only, Pfeiffer et al. 2020).
        reduction_factor: C / m, the model width over the bottleneck width (16: 768 -> 48 for BERT-base).
        activation: the nonlinearity between the projections, one of tunelab.core.layers.ACTIVATIONS.
        modules_to_save: modules trained in full beside the adapters, by name suffix (the new head).
    """

    style: str = "houlsby"
    reduction_factor: int = 16
    activation: str = "relu"
    modules_to_save: tuple[str, ...] = ("classifier",)

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"unknown adapter style {self.style!r}; expected one of {list(STYLES)}")
        if isinstance(self.reduction_factor, bool) or not isinstance(self.reduction_factor, int) \
                or self.reduction_factor < 1:
            raise ValueError(f"reduction_factor must be a positive int, got {self.reduction_factor!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {sorted(ACTIVATIONS)}")
        if isinstance(self.modules_to_save, str):
            raise ValueError(f"modules_to_save must be a list of module names, got the string {self.modules_to_save!r}")
        self.modules_to_save = tuple(self.modules_to_save)


class BottleneckAdapter(nn.Module):
    """h + up(act(down(h))): project the width C down to m, apply the nonlinearity, project back up.

    `up` is initialised to zero (weight and bias), so the adapter starts as the exact identity and the
    first optimizer steps move the model away from its pretrained function only as far as the loss asks.
    `down` keeps nn.Linear's default initialisation: it must not be zero too, or no gradient would reach `up`.

    Args:
        d_model: width C of the hidden states. bottleneck: m, 1 <= m <= C.
        activation: one of tunelab.core.layers.ACTIVATIONS.
    """

    def __init__(self, d_model: int, bottleneck: int, activation: str = "relu"):
        super().__init__()
        if not 1 <= bottleneck <= d_model:
            raise ValueError(f"bottleneck must be between 1 and the width {d_model}, got {bottleneck}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]
        self.down = nn.Linear(d_model, bottleneck)
        self.up = nn.Linear(bottleneck, d_model)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        """h: (B, T, C) -> (B, T, C)."""
        return h + self.up(self.activation(self.down(h)))  # (B, T, m) inside, (B, T, C) out

    def extra_repr(self) -> str:
        return f"activation={self.activation_name!r}"


class WithAdapter(nn.Module):
    """Runs `module` then `adapter` on its output. Takes the place of the last module of a block's residual
    branch (the block's `residual_branches`: EncoderLayer's `dropout1` after attention and `dropout2` after the
    feed-forward, GPT-2's two residual dropouts, Llama's two empty slots), which is exactly where the adapter
    goes: the block's own forward then computes x + adapter(dropout(sublayer(x))) unchanged."""

    def __init__(self, module: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.module = module
        self.adapter = adapter

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        return self.adapter(self.module(x))  # (B, T, C)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of `model` that take adapters: modules whose class names its two `residual_branches`."""
    return [m for m in model.modules() if getattr(type(m), "residual_branches", None)]


def _parent_and_leaf(block: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, leaf = path.rpartition(".")
    return (block.get_submodule(parent) if parent else block), leaf


def apply_adapters(model: nn.Module, config: AdapterConfig | None = None, **overrides) -> nn.Module:
    """Freeze `model`, add bottleneck adapters to each of its transformer blocks, train them and the head.

    Placement: the adapter wraps the last module of each residual branch (see `WithAdapter`), not a copy of
    the block, so the block's own forward runs as written and the adapter sees dropout(sublayer(x)), as in
    Houlsby et al.'s figure 2. Wrapping `attn.out_proj` / `ff.linear2` instead would put the adapter before
    that dropout. The same place serves pre-norm blocks (x + adapter(dropout(sublayer(LN(x))))).

    The modules in `config.modules_to_save` (the classification head) train in place rather than as a
    per-adapter copy (tunelab.peft.inject.ModulesToSave): a model carries one set of adapters here, so a
    frozen original of a freshly initialised head would only double its parameters. Houlsby et al. also
    train every LayerNorm (their figure 2): modules_to_save=("classifier", "norm1", "norm2") does that.

    Args:
        model: any model built from blocks that name their `residual_branches`: BERT, MiniLM and
            TransformerClassifier (tunelab.core.layers.EncoderLayer), GPT-2 and Llama (tunelab.core.decoder).
            A causal LM has no new head: pass modules_to_save=().
        config: an `AdapterConfig`; keyword `overrides` replace its fields (apply_adapters(m, style="pfeiffer")).

    Returns:
        The same model, changed in place.
    """
    config = _with_overrides(config or AdapterConfig(), overrides)
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"apply_adapters found no transformer block in {type(model).__name__}; adapters go into "
                         "blocks that name their residual_branches (EncoderLayer, GPTBlock, LlamaBlock)")
    if any(isinstance(m, WithAdapter) for m in model.modules()):
        raise ValueError("this model already has adapters; apply_adapters cannot be applied twice")
    width = min(block.d_model for block in blocks)
    if config.reduction_factor > width:
        raise ValueError(f"reduction_factor {config.reduction_factor} is larger than the width {width}: "
                         f"the bottleneck would have {width // config.reduction_factor} units")
    find_modules(model, config.modules_to_save)  # a misspelt name raises before the model is touched
    freeze(model)
    for block in blocks:
        weight = next(block.parameters())
        places = block.residual_branches if config.style == "houlsby" else block.residual_branches[1:]
        for place in places:  # after attention (houlsby only), after the feed-forward
            adapter = BottleneckAdapter(block.d_model, block.d_model // config.reduction_factor, config.activation)
            adapter.to(device=weight.device, dtype=weight.dtype)
            parent, leaf = _parent_and_leaf(block, place)
            setattr(parent, leaf, WithAdapter(getattr(parent, leaf), adapter))  # new parameters: trainable
    unfreeze_modules(model, config.modules_to_save)
    return model


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name: parameter} of every adapter in `model` (what an adapter checkpoint holds besides the head)."""
    return {f"{name}.{leaf}": p for name, module in model.named_modules() if isinstance(module, BottleneckAdapter)
            for leaf, p in module.named_parameters()}


def adapter_style(model: nn.Module) -> str:
    """"houlsby" or "pfeiffer": where the adapters of `model` sit (after attention too, or only after the FFN)."""
    for block in transformer_blocks(model):
        wrapped = [isinstance(getattr(*_parent_and_leaf(block, place)), WithAdapter)
                   for place in block.residual_branches]
        if any(wrapped):
            return "houlsby" if wrapped[0] else "pfeiffer"
    raise ValueError("this model has no bottleneck adapters; call apply_adapters first")


def save_adapter(model: nn.Module, folder: str | Path) -> Path:
    """Write the adapters and the head that trains with them (peft has no such method: our tensor names)."""
    return save_trained(model, folder, f"adapter-{adapter_style(model)}")


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Load what `save_adapter` wrote into `model`, to which `apply_adapters` gave the same adapters."""
    adapter_style(model)  # a model without adapters is refused by name, not by a list of missing tensors
    return load_trained(model, folder)


def _with_overrides(config: AdapterConfig, overrides: dict) -> AdapterConfig:
    known = [f.name for f in fields(AdapterConfig)]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"unknown AdapterConfig fields {unknown}; known fields are {known}")
    return replace(config, **overrides)
