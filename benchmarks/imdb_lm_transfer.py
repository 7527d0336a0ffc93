"""Benchmark: the IMDB-pretrained Llama fine-tuned as a sentiment classifier, against random weights.

The base is `benchmarks/imdb_lm.py`'s kept model, else its run folder (a Hugging Face LlamaForCausalLM folder with
its BPE tokenizer). `load_pretrained(folder, task="classification")` puts a new linear `score` head on the decoder,
read at the last real token (an EOS appended to every review, the boundary the LM learned to predict: it has seen the
whole review) or the mean of the hidden states (--pooling mean). The same architecture, tokenizer and budget from
random weights is the control. Labelled reviews: 500, 2,000 and 22,500 (seeded samples of the train split; 1,000
other train reviews are the validation set that picks the best epoch); each size trains for a fixed number of epochs
(the same for both starts), AdamW lr 3e-4 with warmup and a cosine decay, batch 16, reviews cut to 256 tokens
(head+tail), bf16 autocast on the CPU for training and evaluation (a forward twice as fast as in float32 here).
Reported: accuracy on the 25,000 test reviews, for each size and start: the transfer curve.

ULMFiT (Howard & Ruder 2018, https://arxiv.org/abs/1801.06146, table 7) reached 94.4% on IMDB from an LM pretrained
on IMDB alone, with far more compute; the point here is the measured gain over random weights at few labels.

    python benchmarks/imdb_lm_transfer.py --threads 2 --resume      # every cell; each finished one is kept
    python benchmarks/imdb_lm_transfer.py --sizes 500 --limit-test 500 --no-save   # a look

Each finished cell is kept as benchmarks/results/imdb_lm_transfer/<size>-<start>.json; the figure
benchmarks/figures/imdb_lm_transfer.png is drawn again from the kept cells after each one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from _common import add_training_run_options, parse_with_threads, resumable, save_run, saved_runs
from imdb_lm import base_model_folder
from tunelab.core.collate import ClassificationCollator, LengthBucketSampler
from tunelab.core.data import load_imdb, train_validation_split
from tunelab.core.decoder import decoder_from_hf_config
from tunelab.core.hub import load_pretrained
from tunelab.core.train import TrainConfig, train_model
from tunelab.tasks import runs

BENCHMARK = "imdb_lm_transfer"
SIZES = (500, 2000, 22500)
EPOCHS = {500: 8, 2000: 4, 22500: 1}  # the same for both starts: equal budgets
STARTS = ("pretrained", "random")
VALIDATION = 1000  # picks the best epoch; evaluated once per epoch, so kept small
FIGURE = Path(__file__).resolve().parent / "figures" / f"{BENCHMARK}.png"


def build(lm_dir: Path, start: str, pooling: str):
    """(classifier, tokenizer): the LM's decoder with a new head, or the same architecture from random weights."""
    model, tokenizer = load_pretrained(lm_dir, task="classification", num_labels=2, pooling=pooling)
    if start == "random":
        torch.manual_seed(0)
        config = json.loads((lm_dir / "config.json").read_text())
        model = decoder_from_hf_config(config, task="classification", num_labels=2, pooling=pooling)
    return model, tokenizer


def examples(tokenizer, dataset) -> list[dict]:
    """Each review's BPE ids (the collator cuts them and appends EOS) with its label."""
    ids = tokenizer.encode_batch(list(dataset["text"]), add_special_tokens=False)
    return [{"input_ids": x or [tokenizer.eos_id], "label": int(y)} for x, y in zip(ids, dataset["label"])]


def run_cell(args, size: int, start: str) -> dict:
    out = args.out / f"{size}-{start}"
    model, tokenizer = build(args.lm, start, args.pooling)
    train_all, validation = train_validation_split(load_imdb("train"), VALIDATION, seed=0)
    labelled = train_all.shuffle(seed=0).select(range(min(size, len(train_all))))
    collate = ClassificationCollator(max_length=args.max_length, pad_id=tokenizer.pad_id, truncation="head+tail",
                                     eos_id=tokenizer.eos_id, pad_to_multiple_of=32)
    train_examples, val_examples = examples(tokenizer, labelled), examples(tokenizer, validation)
    config = TrainConfig(epochs=EPOCHS.get(size, 1), batch_size=16, lr=args.lr, weight_decay=0.01, warmup=0.06,
                         schedule="cosine", mixed_precision="bf16", eval_mixed_precision=True, out_dir=out,
                         resume=resumable(args.resume, out), save_every_steps=100, eval_batch_size=64,
                         **({"device": args.device} if args.device else {}))
    sampler = LengthBucketSampler([len(e["input_ids"]) for e in train_examples], config.batch_size, seed=0)
    runs.write_record(out, {"task": BENCHMARK, "size": size, "start": start, "lm": str(args.lm)})
    result = train_model(model, train_examples, val_examples, collate_fn=collate, config=config,
                         batch_sampler=sampler)
    runs.load_best(model, out)
    test = examples(tokenizer, load_imdb("test", limit=args.limit_test, seed=0))
    figures = {"size": size, "start": start, "epochs": config.epochs, "pooling": args.pooling,
               "train_seconds": result.history[-1]["time"] if result.history else None}
    return runs.finish_run(model, out, result, config, test, collate, figures)


def draw(kept: dict[str, dict]) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for start, style in zip(STARTS, ("o-", "s--")):
        cells = sorted((r["size"], r["test_accuracy"]) for r in kept.values() if r.get("start") == start)
        if cells:
            ax.plot(*zip(*cells), style, label=f"{start} Llama")
    ax.set_xscale("log")
    sizes = sorted({r["size"] for r in kept.values()})
    ax.set_xticks(sizes, [f"{size:,}" for size in sizes], minor=False)
    ax.minorticks_off()
    ax.set_xlabel("labelled training reviews")
    ax.set_ylabel("test accuracy (25,000 reviews)")
    ax.set_title("IMDB sentiment: pretraining on IMDB text vs random weights")
    ax.grid(alpha=0.3)
    ax.legend()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=120, bbox_inches="tight")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm", type=Path, default=base_model_folder(),
                        help="the pretrained LM folder (default: imdb_lm's kept model, else its run folder)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/imdb_lm_transfer"))
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--starts", nargs="+", choices=STARTS, default=list(STARTS))
    parser.add_argument("--pooling", choices=("last", "mean"), default="last")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--limit-test", type=int, help="test reviews (default: all 25,000)")
    add_training_run_options(parser)
    args = parse_with_threads(parser, argv)
    if not (args.lm / "model.safetensors").is_file():
        raise SystemExit(f"{args.lm} holds no pretrained LM: run benchmarks/imdb_lm.py first (or pass --lm)")
    full = args.limit_test is None and args.pooling == "last"
    for size in args.sizes:
        for start in args.starts:
            label = f"{size}-{start}"
            if args.resume and full and label in saved_runs(BENCHMARK):
                print(f"{label}: kept already")
                continue
            results = run_cell(args, size, start)
            print(f"{label}: test accuracy {results['test_accuracy']:.2%} ({results['test_examples']:,} reviews)")
            if full and not args.no_save:
                setting = (f"Llama from imdb_lm ({start}), {size:,} labelled reviews x {results['epochs']} epochs, "
                           f"last-token head, 256 tokens, bf16 autocast (training and evaluation)")
                save_run(BENCHMARK, label, results, [{
                    "setting": setting, "headline": f"{results['test_accuracy']:.2%}",
                    "figures": f"{results['test_examples']:,} test reviews, {results['steps']} steps, "
                               f"{(results['train_seconds'] or 0) / 60:.0f} min"}])
                draw(saved_runs(BENCHMARK))  # the curve so far: a session may stop before the last cell


if __name__ == "__main__":
    main()
