"""QLoRA: LoRA adapters on a frozen base whose weights are stored in NF4 with double-quantized constants.

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (https://arxiv.org/abs/2305.14314), eq. 5:

    Y = X dequant(W_nf4)^T + s X A^T B^T        W_nf4: 4-bit NormalFloat codes, one absmax per block of 64
                                                weights, the absmax themselves in 8 bits per block of 256

Each base weight costs 4 + 8/64 + 32/(64*256) = 4.127 bits instead of 32. It is decoded, block by block, in
every forward pass (in the compute dtype) and decoded once more in the backward pass to carry the gradient to
the input (`tunelab.quant.linear.DequantizedMatmul`): nothing of it is trained or kept in floating point.
Only A and B (and a new head) train, in float32. The paper puts LoRA on every linear layer but the output
layer, which is the default here (`targets="all-linear"`).

A QLoRA model is a LoRA model whose `LoRALinear.base` is a `Linear4bit`: saving, loading (peft's adapter
files), named adapters and DoRA are LoRA's. Merging is not: the update cannot be added to 4-bit codes in place.
`merge_qlora` decodes the base, adds s B A and gives a float model equal to the adapted one; asked to
re-quantize it, it codes the merged weights again, which moves every weight to its nearest NF4 value and
changes the outputs (peft warns "may get different generations due to rounding errors"; QLoRA's authors merge
into the 16-bit base and keep the result in 16 bits).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from torch import nn

from tunelab.core.family import family_of
from tunelab.peft.inject import replace_module
from tunelab.peft.lora import DoRAAdapter, LoRAConfig, apply_lora, lora_layers, unload_lora
from tunelab.quant.linear import COMPUTE_DTYPES, Linear4bit, QuantEmbedding, QuantLinear, quantize_embedding
from tunelab.quant.nonuniform import BLOCKSIZES, QUANT_TYPES


@dataclass
class QLoRAConfig(LoRAConfig):
    """LoRA's settings (r, alpha, dropout, targets, rsLoRA, DoRA, modules_to_save) plus how the base is stored.

    Args:
        targets: as LoRA's; by default every linear layer except the output layers (QLoRA, sec. 4).
        quant_type: "nf4" (QLoRA) or "fp4" (bitsandbytes' 4-bit float).
        blocksize: weights per absmax constant (64 in QLoRA).
        double_quant: store the constants in 8 bits per block of 256 (4.127 instead of 4.5 bits per weight).
        compute_dtype: the dtype the base's matmul runs in: "float32" or "bfloat16" on a CPU, "bfloat16" or
            "float16" on a GPU. The adapters stay float32. Under autocast the matmul runs in the autocast dtype
            whatever this says, as an nn.Linear's does.
        quantize_frozen: also store in 4 bits the linear layers LoRA does not adapt (the output layers and
            `modules_to_save` stay in floating point).
        quantize_embeddings: store the token embedding table in 4 bits too (QLoRA codes linear layers only;
            in a small model with a large vocabulary the table is much of the frozen weight).
    """

    targets: str | tuple[str, ...] = "all-linear"
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "float32"
    quantize_frozen: bool = False
    quantize_embeddings: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")

    @property
    def quant_options(self) -> dict:
        """The options of the `Linear4bit` layers holding the base."""
        return {"quant_type": self.quant_type, "blocksize": self.blocksize, "double_quant": self.double_quant,
                "compute_dtype": self.compute_dtype}


def prepare_qlora(model: nn.Module, config: QLoRAConfig | None = None, adapter_name: str = "default",
                  **overrides) -> nn.Module:
    """Add LoRA adapter `adapter_name` to the layers `config.targets` selects and store their frozen weights in
    4 bits, in place; everything is frozen but the adapter (and its copies of `config.modules_to_save`).

    The adapters are drawn as LoRA's are (same seed, same adapter as peft's). DoRA's magnitudes start at the
    row norms of the 4-bit weights, as peft computes them on a bitsandbytes base, so a fresh adapter is the
    identity of the quantized model. Keyword `overrides` replace config fields.
    """
    known = {f.name for f in fields(QLoRAConfig)}
    if unknown := sorted(set(overrides) - known):
        raise ValueError(f"unknown QLoRAConfig fields {unknown}; the fields are {sorted(known)}")
    config = replace(config or QLoRAConfig(), **overrides)
    if not isinstance(config, QLoRAConfig):
        raise TypeError(f"prepare_qlora needs a QLoRAConfig, got {type(config).__name__}")
    before = set(lora_layers(model))
    apply_lora(model, config, adapter_name)
    for name, layer in lora_layers(model).items():
        if isinstance(layer.base, nn.Linear):
            layer.base = _quantized(layer.base, config)
        adapter = layer.adapters[adapter_name]
        if isinstance(adapter, DoRAAdapter) and name not in before:
            adapter.magnitude.data.copy_(adapter.weight_norm(layer.base.weight))
    if config.quantize_frozen:
        for name in frozen_linear_layers(model):
            replace_module(model, name, _quantized(model.get_submodule(name), config))
    if config.quantize_embeddings:
        _quantize_embeddings(model, config)
    return model


def _quantize_embeddings(model: nn.Module, config: QLoRAConfig) -> None:
    family = family_of(model)
    if family is None:
        raise ValueError(f"quantize_embeddings needs {type(model).__name__}'s family description to find its "
                         "token embeddings")
    table = family.embeddings(model)
    if isinstance(table, QuantEmbedding):
        return
    if sum(p is table.weight for _, p in model.named_parameters(remove_duplicate=False)) > 1:
        raise ValueError("quantize_embeddings: the embedding table is tied to the output layer, which reads it as "
                         "a float weight; untie it or keep the embeddings in floating point")
    name = next(n for n, m in model.named_modules() if m is table)
    replace_module(model, name, quantize_embedding(table, Linear4bit, **config.quant_options))


def _quantized(layer: nn.Linear, config: QLoRAConfig) -> Linear4bit:
    return Linear4bit.from_linear(layer, **config.quant_options).to(layer.weight.device)


def frozen_linear_layers(model: nn.Module) -> list[str]:
    """The plain linear layers of a LoRA model that hold no adapter and are not an output layer or a trained
    copy: what `quantize_frozen` stores in 4 bits as well."""
    family = family_of(model)
    outputs = tuple(family.outputs) if family else ()
    lora = tuple(f"{n}." for n in lora_layers(model))
    names = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if (isinstance(module, nn.Linear) and not name.startswith(lora) and "copies" not in parts
                and "original" not in parts and not any(name == o or name.startswith(o + ".") for o in outputs)):
            names.append(name)
    return names


def qlora_layers(model: nn.Module) -> dict:
    """{module path: LoRALinear} of the LoRA layers whose base is stored in codes."""
    return {n: layer for n, layer in lora_layers(model).items() if isinstance(layer.base, QuantLinear)}


def dequantized(layer: QuantLinear) -> nn.Linear:
    """A float32 nn.Linear holding the weight and bias that `layer`'s codes stand for (frozen)."""
    weight = layer.dequantize_weight()
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device)
    linear.weight.data.copy_(weight)
    if layer.bias is not None:
        linear.bias.data.copy_(layer.bias)
    return linear.requires_grad_(False)


def merge_qlora(model: nn.Module, requantize: bool = False) -> nn.Module:
    """Fold the active adapter into the decoded base weights, W = dequant(W_4bit) + s B A, and put plain layers
    back, in place: a float model whose outputs equal the adapted model's (up to float rounding). Every other
    4-bit layer (and a 4-bit embedding table) is decoded too.

    requantize: store the merged weights in 4 bits again, with the options the base had. This changes the
    outputs, since each merged weight moves to its nearest code; measure it before deploying such a model.
    """
    layers = qlora_layers(model)
    if not layers:
        raise ValueError("this model has no LoRA layer on a 4-bit base; call prepare_qlora first")
    options = {name: layer.base.options() for name, layer in layers.items()}
    for layer in layers.values():
        layer.base = dequantized(layer.base)
    unload_lora(model, merge=True)
    if requantize:
        for name, opts in options.items():
            merged = model.get_submodule(name)
            replace_module(model, name, Linear4bit.from_linear(merged, **opts).to(merged.weight.device))
    else:
        for name, module in list(model.named_modules()):
            if isinstance(module, QuantEmbedding) and isinstance(module.store, Linear4bit):
                table = nn.Embedding.from_pretrained(module.weight, freeze=True, padding_idx=module.padding_idx)
                replace_module(model, name, table)
            elif isinstance(module, Linear4bit) and not name.endswith(".store"):
                replace_module(model, name, dequantized(module))
    return model
