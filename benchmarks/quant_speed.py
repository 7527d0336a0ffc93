"""Benchmark: MiniLM classifier inference with quantized linear layers, ours against torch.ao, in one run.

Batch 16 x 256 tokens, CPU, inference forwards under torch.no_grad(), timed in interleaved rounds (each round
times every variant in turn; the figure is the median over rounds of each round's median), so that a busy
machine slows every variant alike:

    fp32          the float model
    w8a8          ours: per-token int8 activations, per-channel int8 weights, torch._int_mm (int32 accumulation)
    torch.ao      torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, qint8): the reference
    int8          ours, weight-only int8 (float activations)
    int4 / nf4    ours, 4-bit weight-only (packed codes decoded in every forward)

Every nn.Linear is quantized on both sides (embeddings stay float, as torch.ao keeps them). Target: ours w8a8
<= 1.0x torch.ao's time. Accuracy is not measured here but by imdb_compression.py on the full test split; its
kept figures for fp32 and w8a8 are quoted when they exist.

    python benchmarks/quant_speed.py --threads 2          # kept, RESULTS.md rebuilt
    python benchmarks/quant_speed.py --rounds 1 --no-save # a quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings

import torch
from torch import nn

from _common import add_no_save, saved_runs, save_run
from tunelab.core.hub import load_pretrained
from tunelab.quant.linear import quantize_model

VARIANTS = ("fp32", "w8a8", "torch.ao", "int8", "int4", "nf4")


def build(variant: str, model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model).eval()
    if variant == "torch.ao":
        with warnings.catch_warnings():  # torch.ao's deprecation notices
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    if variant != "fp32":
        quantize_model(model, variant, embeddings=False)
    return model


@torch.no_grad()
def time_forward(model: nn.Module, ids: torch.Tensor, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model(ids)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def kept_accuracy() -> dict:
    """fp32 and w8a8 accuracy from the kept imdb_compression run, when there is one."""
    kept = saved_runs("imdb_compression")
    return {name: kept[name] for name in ("fp32", "w8a8")} if "fp32" in kept and "w8a8" in kept else {}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed forwards per variant per round")
    parser.add_argument("--threads", type=int)
    add_no_save(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base, _ = load_pretrained("minilm", task="classification", num_labels=2)
    models = {v: build(v, base) for v in VARIANTS}
    ids = torch.randint(1000, 30000, (args.batch, args.length))
    ids[:, 0], ids[:, -1] = 101, 102
    reference = models["fp32"](ids)
    for variant, model in models.items():  # warm-up, and a check that each variant still computes the model
        error = (model(ids) - reference).abs().max().item()
        print(f"{variant:9s} max |logit - fp32 logit| = {error:.4f}")
    rounds = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for variant, model in models.items():
            rounds[variant].append(time_forward(model, ids, args.steps))
        print(f"round {r + 1}: " + ", ".join(f"{v} {rounds[v][-1]:.3f}s" for v in VARIANTS))
    seconds = {v: statistics.median(t) for v, t in rounds.items()}
    ratio = seconds["w8a8"] / seconds["torch.ao"]
    print(json.dumps({"seconds": seconds, "w8a8_over_torch_ao": ratio}, indent=2))
    if args.no_save:
        return
    accuracy = kept_accuracy()
    quoted = ""
    if accuracy:
        quoted = (f"; IMDB test accuracy fp32 {accuracy['fp32']['accuracy']:.2%}, w8a8 "
                  f"{accuracy['w8a8']['accuracy']:.2%} ({accuracy['w8a8']['test_examples']:,} reviews, "
                  "imdb_compression)")
    setting = f"minilm classifier forward, batch {args.batch}x{args.length}, every nn.Linear quantized"
    speed = ", ".join(f"{v} {seconds[v]:.3f} s" for v in VARIANTS)
    rows = [{"setting": f"w8a8 vs torch.ao dynamic int8, {setting}", "headline": f"{ratio:.2f}x",
             "figures": f"per forward: {speed}; torch.ao {seconds['fp32'] / seconds['torch.ao']:.2f}x faster "
                        f"than fp32, ours w8a8 {seconds['fp32'] / seconds['w8a8']:.2f}x{quoted}"}]
    save_run("quant_speed", f"batch{args.batch}x{args.length}-threads{torch.get_num_threads()}",
             {"seconds": seconds, "w8a8_over_torch_ao": ratio, "rounds": rounds, "setting": setting}, rows)


if __name__ == "__main__":
    main()
