"""Benchmark: a small Llama pretrained from scratch as a causal LM on IMDB reviews (the base of SFT, DPO, QLoRA).

`tunelab pretrain-lm imdb` with this benchmark's setting: a byte-level BPE vocabulary of 8,192 trained on the
reviews, a Llama of 6 layers, d=384, GQA 6/2, SwiGLU 1024, tied embeddings; the 50,000 unsupervised + 25,000 train
reviews (never test), 1% of them held out, packed into blocks of 256 tokens; AdamW lr 1e-3 cosine, batch 32,
bf16 autocast on the CPU. The budget is at most 3 hours on 2 CPU cores across resumed runs: --max-steps bounds
the run, --resume continues it from its last checkpoint. Reported: validation perplexity on the held-out
reviews, tokens seen, the loss curve (benchmarks/figures/imdb_lm.png) and sample generations.

    python benchmarks/imdb_lm.py --threads 2 --resume                   # 1,600 steps; kept when it finishes
    python benchmarks/imdb_lm.py --limit 2000 --max-steps 50 --no-save   # a look

The run folder (--out, default benchmarks/out/imdb_lm/run) is a Hugging Face LlamaForCausalLM folder; rebuilding
it on a fresh machine is this command alone. A finished run is kept as benchmarks/results/imdb_lm/<label>.json, and
its model beside it as benchmarks/results/imdb_lm/<label>/ (config.json, tokenizer.json and the weights in bf16,
25 MB; kept on the machine, ignored by git: weights are never committed): the base model the transfer, SFT/DPO
and QLoRA benchmarks start from without two hours of rebuilding.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from _common import RUN_RESULTS, add_training_run_options, parse_with_threads, resumable, save_run
from tunelab.core.hub import load_pretrained, save_pretrained
from tunelab.tasks.imdb_lm import LmRunConfig, run_imdb_lm

FIGURE = Path(__file__).resolve().parent / "figures" / "imdb_lm.png"
RUN_DIR = Path("benchmarks/out/imdb_lm/run")
KEPT_MODEL = RUN_RESULTS / "imdb_lm" / "L6-H384-1600steps"  # the default setting's kept model


def base_model_folder() -> Path:
    """The pretrained LM other benchmarks start from: the kept model when it is here, else the run folder."""
    return KEPT_MODEL if (KEPT_MODEL / "model.safetensors").is_file() else RUN_DIR


def keep_model(run_dir: Path, label: str, results: Path = RUN_RESULTS) -> Path:
    """Copy the run's final model beside its kept JSON with the weights rounded to bf16 (half the bytes)."""
    model, tokenizer = load_pretrained(run_dir, task="causal_lm")
    return save_pretrained(model.to(torch.bfloat16), results / "imdb_lm" / label, tokenizer)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RUN_DIR)
    parser.add_argument("--limit", type=int, help="reviews (default: all 75,000 unsupervised + train)")
    parser.add_argument("--max-steps", type=int, default=1600,
                        help="optimizer steps of 32 x 256 tokens (3.3 s each on 2 cores)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden-size", type=int, default=384)
    parser.add_argument("--eval-every", type=int, default=400)
    add_training_run_options(parser)
    args = parse_with_threads(parser, argv)
    config = LmRunConfig.from_dict({
        "data": {"limit": args.limit},
        "model": {"hidden_size": args.hidden_size, "num_hidden_layers": args.layers},
        "train": {"max_steps": args.max_steps, "eval_every_steps": args.eval_every, "mixed_precision": "bf16",
                  "out_dir": str(args.out), "resume": resumable(args.resume, args.out),
                  **({"device": args.device} if args.device else {})}})
    results = run_imdb_lm(config, args.out)
    hours = results["train_seconds"] / 3600
    print(f"validation perplexity {results['val_perplexity']:.2f} after {results['steps']} steps "
          f"({results['train_tokens_seen']:,} tokens, {hours:.2f} h)")
    for sample in results["samples"]:
        print(f"  {sample!r}")
    if args.limit is None and not args.no_save:
        FIGURE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.out / "curves.png", FIGURE)
        label = f"L{args.layers}-H{args.hidden_size}-{results['steps']}steps"
        setting = (f"Llama L{args.layers} d{args.hidden_size} GQA 6/2, BPE 8192, IMDB unsupervised+train packed "
                   f"x256, {results['steps']} steps of 32, bf16 autocast")
        figures = (f"{results['parameters']:,} params, {results['train_tokens_seen']:,} tokens seen, "
                   f"next-token acc {results['val_next_token_accuracy']:.2%}, {hours:.2f} h; "
                   f"sample: {results['samples'][0][:80]!r}")
        save_run("imdb_lm", label, {**results, "setting": setting, "compute_hours": hours},
                 [{"setting": setting, "headline": f"ppl {results['val_perplexity']:.2f}", "figures": figures}])
        keep_model(args.out, label)
        print(json.dumps({"kept": label}))


if __name__ == "__main__":
    main()
