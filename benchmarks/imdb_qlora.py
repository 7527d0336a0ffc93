"""Benchmark: QLoRA against LoRA and full fine-tuning on IMDB from MiniLM, with the best LoRA run's budget.

QLoRA trains as `tunelab finetune imdb --model minilm --method qlora` in the setting of the best LoRA run of
benchmarks/imdb_peft.py (`lora-all-r5-bf16`: r=5, alpha 10 on the six linear layers of every block, 2 epochs
of 22,500 reviews at 256 tokens head+tail, batch 16, lr 1e-3, bf16 autocast), with every other frozen weight in
4 bits too (the pooler: `quantize_frozen`; the word embeddings, half of MiniLM: `quantize_embeddings`), then
all 25,000 test reviews (scored merged into a float model, which equals the adapted one). The LoRA and full
fine-tuning accuracies are those kept runs' (benchmarks/results/imdb_peft/lora-all-r5-bf16.json and
imdb_finetune/full.json): an accuracy does not depend on the machine. What does is measured here, side by side
in one process: for each method, one training step at batch 16 x 256 under bf16 autocast (median seconds) and
its memory by `tunelab.quant.report.training_memory`: frozen weights as stored, trained weights, gradients,
AdamW's moments and the activations autograd keeps (measured). The QLoRA training runs in its own subprocess
(its peak resident memory is its own) in --out/qlora, so that an interrupted run continues with --resume.

Targets: QLoRA within 0.5 points of LoRA (QLoRA paper: NF4 + double quantization matches 16-bit LoRA);
frozen-weight bytes <= 0.3x of float32 LoRA's.

    python benchmarks/imdb_qlora.py --threads 2 --resume                # about 2.5 h on 2 cores, then kept
    python benchmarks/imdb_qlora.py --threads 2 --measure-only --no-save  # the side-by-side figures (minutes)
    python benchmarks/imdb_qlora.py --limit 400 --test-limit 400 --no-save  # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from _common import add_no_save, save_run, saved_runs, time_training

HERE = Path(__file__).resolve().parent
LORA_RUN = ("imdb_peft", "lora-all-r5-bf16")
FULL_RUN = ("imdb_finetune", "full")
TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "linear1", "linear2"]
LORA_OPTIONS = {"r": 5, "alpha": 10, "targets": TARGETS}
QLORA_OPTIONS = {**LORA_OPTIONS, "quantize_frozen": True, "quantize_embeddings": True}


def prepared(method: str):
    """MiniLM with a new head, ready to train by `method` (full, lora or qlora) in the benchmark's setting."""
    from tunelab.core.hub import load_pretrained
    from tunelab.tasks.methods import apply_method

    torch.manual_seed(0)
    model, tokenizer = load_pretrained("minilm", task="classification", num_labels=2)
    options = {"full": {}, "lora": LORA_OPTIONS, "qlora": QLORA_OPTIONS}[method]
    return apply_method(model, method, options, tokenizer)


def measure(batch: int, length: int, steps: int) -> dict[str, dict]:
    """Memory accounting and median training-step time of each method, under bf16 autocast, one after another."""
    from tunelab.quant.report import training_memory

    figures = {}
    for method in ("full", "lora", "qlora"):
        model = prepared(method)

        def run(ids, mask, model=model):
            with torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16):
                return model(ids, mask).float()

        ids = torch.randint(1000, 30000, (batch, length))
        model.train()
        memory = training_memory(model, lambda: run(ids, torch.ones_like(ids)).sum()).as_dict()
        timing = time_training(model, run, batch, length, steps, warmup=1)
        figures[method] = {"memory": memory, "step_seconds": timing["step"]}
        print(f"{method:>5}: step {timing['step']:.2f} s; " + ", ".join(f"{k} {v / 2**20:,.1f} MiB"
                                                                        for k, v in memory.items()))
    return figures


def train_qlora(args) -> dict:
    """The QLoRA run, through imdb_peft.py's child (its subprocess, folder and result file)."""
    command = [sys.executable, str(HERE / "imdb_peft.py"), "--child", "qlora", "--out", str(args.out),
               "--label", "qlora", "--options", json.dumps(QLORA_OPTIONS), "--bf16"]
    for flag in ("limit", "test_limit", "threads"):
        if getattr(args, flag) is not None:
            command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    command += ["--resume"] * args.resume + ["--quiet"] * args.quiet
    subprocess.run(command, check=True)
    return json.loads((args.out / "qlora" / "benchmark.json").read_text())


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def rows(qlora: dict, lora: dict, full: dict, measured: dict) -> list[dict]:
    frozen_ratio = measured["qlora"]["memory"]["frozen"] / measured["lora"]["memory"]["frozen"]
    out = []
    for method, r in (("qlora", qlora), ("lora", lora), ("full", full)):
        m = measured[method]
        memory = m["memory"]
        figures = (f"frozen weights {mib(memory['frozen'])}, trained {mib(memory['trainable'])}, optimizer "
                   f"{mib(memory['optimizer'])}, activations {mib(memory['activations'])}, total "
                   f"{mib(memory['total'])}; step {m['step_seconds']:.2f} s (batch 16 x 256, bf16 autocast)")
        if method == "qlora":
            gap = 100 * (r["test_accuracy"] - lora["test_accuracy"])
            figures += f"; {frozen_ratio:.2f}x LoRA's frozen bytes; {gap:+.2f} points against LoRA"
        else:
            figures += f"; accuracy from benchmarks/results/{'/'.join(LORA_RUN if method == 'lora' else FULL_RUN)}"
        out.append({"setting": method, "headline": f"{r['test_accuracy']:.2%}", "figures": figures})
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/imdb_qlora"))
    parser.add_argument("--limit", type=int, help="train subset (a quick look; not kept)")
    parser.add_argument("--test-limit", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--measure-only", action="store_true", help="only the side-by-side step and memory figures")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per method")
    add_no_save(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    measured = measure(16, 256, args.steps)
    if args.measure_only:
        return
    qlora = train_qlora(args)
    print(f"qlora: test accuracy {qlora['test_accuracy']:.2%} on {qlora['test_examples']} reviews")
    quick = args.limit is not None or args.test_limit is not None
    if quick or args.no_save:
        return
    kept = {run: saved_runs(run[0]).get(run[1]) for run in (LORA_RUN, FULL_RUN)}
    if missing := [f"{b}/{label}" for (b, label), r in kept.items() if r is None]:
        raise SystemExit(f"the kept runs {missing} are missing: run benchmarks/imdb_peft.py / imdb_finetune.py first")
    results = {"qlora": qlora, "measured": measured, "options": QLORA_OPTIONS,
               "setting": qlora["setting"], "lora_run": "/".join(LORA_RUN), "full_run": "/".join(FULL_RUN)}
    save_run("imdb_qlora", "minilm-all-r5-bf16", results, rows(qlora, kept[LORA_RUN], kept[FULL_RUN], measured))


if __name__ == "__main__":
    main()
