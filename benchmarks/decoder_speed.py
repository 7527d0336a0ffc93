"""Benchmark: our Llama against Hugging Face's on the CPU: a training step, a LoRA step, cached generation.

One not-toy Llama (8 layers, d=512, GQA 8/2, SwiGLU 1376, vocab 16,384), the same random weights on both sides
(ours loads Hugging Face's state dict), each side in its own subprocess, `--rounds` rounds alternating, the best
round of each kept:

    ours / hf              full training step (forward + next-token loss + backward + AdamW), batch x length
    ours-lora / peft-lora  LoRA r=8 on q_proj and v_proj: ours (tunelab.peft) vs transformers + peft
    ours-lora-bf16 /       the same LoRA step under bf16 autocast on both sides (unsloth's 16-bit base, the
      peft-lora-bf16       one of its tricks a CPU can use): reported beside the fp32 headline
    generation             greedy tokens per second with the KV cache, 32-token prompts, 64 new tokens,
                           batch 1 and batch 8: tunelab.core.generate vs model.generate
    matvec floor           the linear layers' matrix-vector products alone at batch 1, in ours: the least time
                           any fp32 implementation spends per generated token (every weight is read once)

Targets: full step <= 0.9x Hugging Face's time; LoRA step <= 0.7x HF + peft's; generation >= 2x HF's tokens/s at
batch 1.

    python benchmarks/decoder_speed.py --threads 2               # kept, RESULTS.md rebuilt
    python benchmarks/decoder_speed.py --steps 2 --rounds 1 --batch 2 --no-save   # a quick look
"""

from __future__ import annotations

import time

import torch

from _common import save_run, speed_comparison, time_training

CONFIG = dict(vocab_size=16384, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False)
R, ALPHA = 8, 16
PROMPT, NEW = 32, 64
IMPLS = ("ours", "hf", "ours-lora", "peft-lora", "ours-lora-bf16", "peft-lora-bf16")


def build(impl: str):
    """The model of `impl` and run(ids, mask) -> logits; every side starts from the same random weights."""
    import transformers

    from tunelab.core.decoder import Llama, LlamaConfig, load_hf_state_dict

    transformers.logging.set_verbosity_error()
    config = LlamaConfig(**CONFIG)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_dict("LlamaForCausalLM")))
    if impl.startswith("ours"):
        model = Llama(config)
        load_hf_state_dict(model, hf.state_dict())
        if impl.startswith("ours-lora"):
            from tunelab.peft.lora import LoRAConfig, apply_lora

            apply_lora(model, LoRAConfig(r=R, alpha=ALPHA, targets=("q_proj", "v_proj"), modules_to_save=()))
        forward = model
    else:
        model = hf
        if impl.startswith("peft-lora"):
            import peft

            model = peft.get_peft_model(hf, peft.LoraConfig(task_type="CAUSAL_LM", r=R, lora_alpha=ALPHA,
                                                            target_modules=["q_proj", "v_proj"]))

        def forward(ids, mask):
            return model(input_ids=ids, attention_mask=mask).logits
    if not impl.endswith("-bf16"):
        return model, forward

    def run(ids, mask):  # the frozen base's matmuls in bf16 (this CPU's native 16-bit path), adapters in fp32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(ids, mask).float()
    return model, run


@torch.no_grad()
def matvec_floor(model, repeats: int = 20, rounds: int = 3) -> float:
    """Seconds per token of the linear layers' (1, in) x (in, out) products alone, the best of `rounds`: what
    a batch-1 decoding step cannot go below in fp32, since each of them streams its weight from memory."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(1, 1, m.in_features) for m in linears]

    def step():
        for linear, x in zip(linears, inputs):
            torch.nn.functional.linear(x, linear.weight)

    step()  # warm-up
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


@torch.no_grad()
def tokens_per_second(impl: str, model, batch: int, rounds: int = 2) -> float:
    """Greedy cached generation of NEW tokens after PROMPT-token prompts; the best of `rounds`."""
    from tunelab.core.generate import generate

    model.eval()
    ids = torch.randint(0, CONFIG["vocab_size"], (batch, PROMPT))
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        if impl == "ours":
            out = generate(model, ids, NEW, eos_token_id=[])
        else:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        seconds = time.perf_counter() - start
        assert out.shape == (batch, PROMPT + NEW)
        best = max(best, batch * NEW / seconds)
    return best


def child(impl: str, args) -> dict:
    model, run = build(impl)
    result = time_training(model, run, args.batch, args.length, args.steps, args.warmup,
                           vocab_size=CONFIG["vocab_size"])
    result["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if impl in ("ours", "hf"):
        model.requires_grad_(False)
        for batch in (1, 8):
            result[f"generate{batch}"] = tokens_per_second(impl, model, batch)
        if impl == "ours":
            result["matvec_floor"] = matvec_floor(model)
    return result


def main(argv=None) -> None:
    found = speed_comparison(__doc__.splitlines()[0], __file__, IMPLS, child, argv)
    if found is None:  # this was a child
        return
    args, best, rounds = found
    for impl in ("ours", "hf"):
        for batch in (1, 8):
            best[impl][f"generate{batch}"] = max(r[f"generate{batch}"] for r in rounds[impl])
    floor = best["ours"]["matvec_floor"] = min(r["matvec_floor"] for r in rounds["ours"])
    ceiling = 1 / floor / best["hf"]["generate1"]  # the batch-1 ratio a forward of matvecs alone would reach
    trainable = {impl: rs[0]["trainable"] for impl, rs in rounds.items()}
    if trainable["ours-lora"] != trainable["peft-lora"]:
        raise SystemExit(f"LoRA trains {trainable['ours-lora']:,} parameters here and {trainable['peft-lora']:,} in "
                         "peft: not a like-for-like comparison")
    step = best["ours"]["step"] / best["hf"]["step"]
    lora = best["ours-lora"]["step"] / best["peft-lora"]["step"]
    lora_bf16 = best["ours-lora-bf16"]["step"] / best["peft-lora-bf16"]["step"]
    bf16_gain = best["ours-lora-bf16"]["step"] / best["peft-lora"]["step"]  # ours in bf16 over peft in fp32
    gen = {b: best["ours"][f"generate{b}"] / best["hf"][f"generate{b}"] for b in (1, 8)}
    print(f"ours/HF: training step {step:.2f}x, LoRA step {lora:.2f}x (vs peft; {lora_bf16:.2f}x with both in bf16, "
          f"{bf16_gain:.2f}x ours in bf16 over peft in fp32), "
          f"generation tokens/s {gen[1]:.2f}x at batch 1, {gen[8]:.2f}x at batch 8; the matvecs alone: "
          f"{floor * 1e3:.2f} ms per token, {ceiling:.2f}x HF's tokens/s at most")
    if args.no_save:
        return
    shape = f"llama L8 d512 GQA 8/2 V16k, batch {args.batch}x{args.length}, AdamW, fp32"
    rows = [
        {"setting": f"train, {shape}", "headline": f"{step:.2f}x",
         "figures": f"ours {best['ours']['step']:.2f} s vs HF {best['hf']['step']:.2f} s per step; peak memory "
                    f"{best['ours']['memory'] / 2**20:.0f} vs {best['hf']['memory'] / 2**20:.0f} MiB"},
        {"setting": f"lora-train, r{R} q,v, {shape}", "headline": f"{lora:.2f}x",
         "figures": f"ours {best['ours-lora']['step']:.2f} s vs HF+peft {best['peft-lora']['step']:.2f} s per step; "
                    f"under bf16 autocast {best['ours-lora-bf16']['step']:.2f} vs "
                    f"{best['peft-lora-bf16']['step']:.2f} s ({lora_bf16:.2f}x; {bf16_gain:.2f}x peft's fp32)"},
        {"setting": f"generate, greedy with KV cache, {PROMPT}-token prompts, {NEW} new tokens",
         "headline": f"{gen[1]:.2f}x",
         "figures": f"batch 1: ours {best['ours']['generate1']:.0f} vs HF {best['hf']['generate1']:.0f} tokens/s; "
                    f"batch 8: {best['ours']['generate8']:.0f} vs {best['hf']['generate8']:.0f} ({gen[8]:.2f}x); "
                    f"the matvecs alone {floor * 1e3:.2f} ms per token: {ceiling:.2f}x HF at most in fp32"},
    ]
    save_run("decoder_speed", f"batch{args.batch}x{args.length}-threads{torch.get_num_threads()}",
             {"best": best, "ratios": {"train": step, "lora-train": lora, "lora-train-bf16": lora_bf16,
                                       "lora-train-bf16-over-fp32": bf16_gain,
                                       "generate1": gen[1], "generate8": gen[8], "generate1-ceiling": ceiling},
              "trainable_parameters": trainable}, rows)


if __name__ == "__main__":
    main()
