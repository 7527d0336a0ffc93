"""Benchmark: where the memory of a training step goes, for full fine-tuning, LoRA and QLoRA, on two Llamas.

For each model and method the step is accounted as `tunelab.quant.report.training_memory` does it: frozen
weights as stored, trained weights, their gradients, AdamW's two moments, and the activations autograd keeps
for the backward pass, which are *measured* by recording every tensor saved during one forward pass and the
loss (`torch.autograd.graph.saved_tensors_hooks`).

1. The small IMDB Llama (benchmarks/imdb_lm.py: 6 layers, d=384, GQA 6/2, vocab 8,192), float32, batch 8 x 256,
   LoRA r=8 on every linear layer but the head. Its figures are measured on the real model (the kept one when
   benchmarks/results/imdb_lm/ holds it, else the same shapes with random weights: memory does not depend on
   the values), beside the same accounting *computed* from the parameter shapes alone.
2. A Llama-2-7B-shaped model (32 layers, d=4096, FFN 11,008, vocab 32,000) built on the meta device: shapes,
   no weights, no memory. The settings are torchtune's single-device recipes (llama2/7B_lora_single_device and
   7B_qlora_single_device): bf16 weights, adapters and optimizer state, batch 2, activation checkpointing,
   LoRA r=8 on q_proj and v_proj, QLoRA r=8 on q, k, v, output and the MLP with those layers' weights in NF4.
   Activations are measured on meta models of 1 and 2 blocks (per block = the difference) at 512 tokens and
   extrapolated to 32 blocks, with checkpointing (each block keeps its input, one block is live in the
   backward pass) and without. The meta device runs attention by its math path, which keeps the attention
   probabilities (B x H x T x T per block) that a flash-attention kernel does not: an upper bound there.

torchtune's QLoRA tutorial reports the peak memory *reserved* during Llama-2-7B training: 15.57 GB for LoRA,
9.29 GB for QLoRA. benchmarks/README.md compares them with this accounting.

    python benchmarks/qlora_memory.py                # a minute; kept as benchmarks/results/qlora_memory/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from _common import add_no_save, save_run
from tunelab.tasks.imdb_lm import DEFAULT_MODEL

GB = 1e9
SMALL = {**DEFAULT_MODEL, "vocab_size": 8192}  # benchmarks/imdb_lm.py's model (tied embeddings)
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# torchtune's recipes: LoRA on q and v; QLoRA on q, k, v, output and the MLP (recipes/configs/llama2/*.yaml)
TORCHTUNE = {"lora": ("q_proj", "v_proj"), "qlora": ALL_LINEAR}
NF4_DQ_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # QLoRA, sec. 3


def build(config: dict, device: str = "cpu", layers: int | None = None, dtype=torch.float32):
    from tunelab.core.decoder import Llama, LlamaConfig

    values = {**config, **({"num_hidden_layers": layers} if layers else {})}
    with torch.device(device):
        return Llama(LlamaConfig(**values)).to(dtype)


def adapted(model, method: str, targets, r: int = 8):
    """The model set up for `method`: full (every weight trains), lora or qlora (NF4 + double quantization)."""
    from tunelab.peft.lora import LoRAConfig, apply_lora
    from tunelab.peft.qlora import QLoRAConfig, prepare_qlora

    if method == "lora":
        return apply_lora(model, LoRAConfig(r=r, alpha=2 * r, targets=targets, modules_to_save=()))
    if method == "qlora":
        return prepare_qlora(model, QLoRAConfig(r=r, alpha=2 * r, targets=targets, modules_to_save=()))
    return model


def activations(model, batch: int, length: int) -> int:
    """Bytes autograd saves in one forward pass and next-token loss (measured)."""
    from tunelab.core.evaluation import causal_lm_loss
    from tunelab.quant.report import training_memory

    device = next(model.parameters()).device
    ids = torch.zeros(batch, length, dtype=torch.long, device=device)
    model.train()
    return training_memory(model, lambda: causal_lm_loss(model(ids), ids)).activations


def computed(config: dict, method: str, targets, r: int, weight_bytes: float, state_bytes: float) -> dict:
    """Weights, adapters, gradients and optimizer state from the shapes alone (meta model, no memory)."""
    model = build(config, "meta")
    params = sum(p.numel() for p in model.parameters())
    target = {n: m for n, m in model.named_modules() if n.endswith(tuple(targets)) and hasattr(m, "in_features")}
    adapter = sum(r * (m.in_features + m.out_features) for m in target.values())
    coded = sum(m.in_features * m.out_features for m in target.values())
    if method == "full":
        frozen, trainable = 0.0, params * weight_bytes
        trained_params = params
    else:
        base_bits = NF4_DQ_BITS if method == "qlora" else 8 * weight_bytes
        frozen = (params - coded) * weight_bytes + coded * base_bits / 8
        trainable, trained_params = adapter * state_bytes, adapter
    return {"frozen": frozen, "trainable": trainable, "gradients": trainable,
            "optimizer": 2 * trained_params * state_bytes}


def small_model(batch: int, length: int) -> dict:
    """Measured and computed figures of the IMDB Llama, float32."""
    from tunelab.core.evaluation import causal_lm_loss
    from tunelab.quant.report import training_memory

    kept = Path(__file__).resolve().parent / "results" / "imdb_lm" / "L6-H384-1600steps"
    rows = {}
    for method in ("full", "lora", "qlora"):
        if (kept / "model.safetensors").is_file():
            from tunelab.core.hub import load_pretrained

            model = load_pretrained(kept)[0].float()
        else:
            torch.manual_seed(0)
            model = build(SMALL)
        model = adapted(model, method, ALL_LINEAR)
        ids = torch.zeros(batch, length, dtype=torch.long)
        model.train()
        measured = training_memory(model, lambda: causal_lm_loss(model(ids), ids)).as_dict()
        rows[method] = {"measured": measured,
                        "computed": computed(SMALL, method, ALL_LINEAR, 8, weight_bytes=4, state_bytes=4)}
        print(f"IMDB Llama, {method:>5}: " + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in measured.items()))
    return rows


def llama2_7b(batch: int, length: int) -> dict:
    """torchtune's settings on a meta Llama-2-7B: computed weights, measured and extrapolated activations."""
    rows = {}
    for method in ("full", "lora", "qlora"):
        targets = TORCHTUNE.get(method, ALL_LINEAR)
        # the 4-bit base changes no activation (tested: QLoRA saves what LoRA saves), so the meta run uses LoRA
        one, two = (activations(adapted(build(LLAMA2_7B, "meta", n, torch.bfloat16), "lora" if method == "qlora"
                                        else method, targets), batch, length) for n in (1, 2))
        per_block, outside = two - one, 2 * one - two
        blocks = LLAMA2_7B["num_hidden_layers"]
        block_input = batch * length * LLAMA2_7B["hidden_size"] * 2  # bf16
        figures = computed(LLAMA2_7B, method, targets, 8, weight_bytes=2, state_bytes=2)
        figures["activations"] = outside + blocks * per_block
        figures["activations_checkpointed"] = outside + blocks * block_input + per_block
        weights_etc = figures["frozen"] + figures["trainable"] + figures["gradients"] + figures["optimizer"]
        figures["total_checkpointed"] = weights_etc + figures["activations_checkpointed"]
        rows[method] = figures
        print(f"Llama-2-7B, {method:>5}: " + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in figures.items()))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int)
    add_no_save(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    small = small_model(8, 256)
    big = llama2_7b(2, 512)
    if args.no_save:
        return
    lora, qlora = big["lora"]["total_checkpointed"], big["qlora"]["total_checkpointed"]
    rows = [{"setting": "Llama-2-7B shapes, torchtune's recipes, batch 2 x 512, checkpointing",
             "headline": f"LoRA {lora / GB:.1f} GB, QLoRA {qlora / GB:.1f} GB",
             "figures": (f"frozen weights {big['lora']['frozen'] / GB:.2f} vs {big['qlora']['frozen'] / GB:.2f} GB, "
                         f"activations {big['lora']['activations_checkpointed'] / GB:.2f} GB "
                         f"({big['lora']['activations'] / GB:.1f} GB without checkpointing); full fine-tuning "
                         f"{big['full']['total_checkpointed'] / GB:.1f} GB; torchtune reports 15.57 and 9.29 GB "
                         f"reserved")},
            {"setting": "IMDB Llama (12.6M), fp32, batch 8 x 256, r=8 on every linear layer",
             "headline": ", ".join(f"{m} {r['measured']['total'] / 2**20:,.0f} MiB" for m, r in small.items()),
             "figures": (f"frozen weights {small['lora']['measured']['frozen'] / 2**20:.1f} vs "
                         f"{small['qlora']['measured']['frozen'] / 2**20:.1f} MiB (computed "
                         f"{small['qlora']['computed']['frozen'] / 2**20:.1f}), activations "
                         f"{small['qlora']['measured']['activations'] / 2**20:,.0f} MiB (measured)")}]
    save_run("qlora_memory", "llama2-7b-and-imdb-llama", {"imdb_llama": small, "llama2_7b": big}, rows)
    print(json.dumps({"lora_gb": lora / GB, "qlora_gb": qlora / GB}))


if __name__ == "__main__":
    main()
