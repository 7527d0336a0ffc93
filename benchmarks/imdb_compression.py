"""Benchmark: one MiniLM fine-tuned on IMDB, compressed every way tunelab.quant knows: accuracy vs model bytes.

The base is fine-tuned once (MiniLM, every weight, 2,000 class-balanced training reviews minus a 10% validation
split, 128 tokens head+tail, 2 epochs, bf16 autocast on the CPU) and kept in --out/base. Every method then starts
from its weights; the ones that fine-tune (gradual pruning, structured pruning, clustering, QAT, the pipeline)
train on the same 1,800 reviews, bf16 autocast, 1 epoch. Sizes are the whole model's, embeddings included.
Accuracy is on all 25,000 test reviews for fp32, int8, w8a8, nf4-dq and the pipeline, and on a fixed
class-balanced 2,000-review subset (seed 0) for the others.

    python benchmarks/imdb_compression.py --resume        # everything; finished methods are skipped
    python benchmarks/imdb_compression.py --methods int8,nf4 --resume
    python benchmarks/imdb_compression.py --quick --no-save   # a small look (not kept)

Each finished method is kept in --out/methods/NAME.json; when all are there the run is kept as
benchmarks/results/imdb_compression/minilm.json with one RESULTS.md row per method, and the figure
(accuracy vs bytes, log x) is written to benchmarks/figures/imdb_compression.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from _common import add_no_save, resumable, save_run
from tunelab.core.data import load_imdb, train_validation_split
from tunelab.core.train import TrainConfig, evaluate, train_model
from tunelab.quant.linear import quantize_model
from tunelab.quant.report import size_report
from tunelab.tasks import runs
from tunelab.tasks.imdb_finetune import FinetuneRunConfig, labelled, run_imdb_finetune

FULL_TEST = {"fp32", "int8", "w8a8", "nf4-dq", "pipeline"}
SUBSET = 2000
BASE = {"model": "minilm", "method": "full",
        "data": {"limit": 2000, "max_length": 128},
        "train": {"epochs": 2, "batch_size": 16, "lr": 5e-5, "mixed_precision": "bf16", "save_every_steps": 50}}
QUANTIZED = ["int8", "w8a8", "int4", "nf4", "nf4-dq", "fp4", "kmeans"]


def fine_tune_base(out: Path, resume: bool, quick: bool) -> dict:
    values = copy.deepcopy(BASE)
    if quick:
        values["data"].update(limit=400, test_limit=200)
        values["train"].update(epochs=1)
    values["train"].update(out_dir=str(out), resume=resumable(resume, out))
    if (out / runs.RESULTS_FILE).is_file():
        return json.loads((out / runs.RESULTS_FILE).read_text())
    return run_imdb_finetune(FinetuneRunConfig.from_dict(values), out)


class Bench:
    """The base run's model, tokenized data and evaluation, shared by every method."""

    def __init__(self, base_dir: Path, quick: bool):
        self.base_dir = base_dir
        run = runs.load_run(base_dir)
        self.run = run
        self.tokenizer = run.tokenizer
        config = FinetuneRunConfig.from_dict(runs.read_record(base_dir))
        self.data = config.data
        test = load_imdb("test", self.data.data_dir)
        subset = load_imdb("test", self.data.data_dir, limit=200 if quick else SUBSET, seed=0)
        self.full_test = labelled(run.tokenizer, test if not quick else subset, self.data)
        self.subset = labelled(run.tokenizer, subset, self.data)
        train = load_imdb("train", self.data.data_dir, limit=self.data.limit, seed=self.data.seed)
        train, _ = train_validation_split(train, self.data.validation_size, seed=self.data.seed)  # the base's
        self.train = labelled(run.tokenizer, train, self.data)
        self.base_results = json.loads((base_dir / runs.RESULTS_FILE).read_text())

    def model(self) -> torch.nn.Module:
        return copy.deepcopy(self.run.model).cpu().eval()

    def accuracy(self, model, full: bool) -> tuple[float, int]:
        examples = self.full_test if full else self.subset
        metrics = evaluate(model, examples, collate_fn=self.run.collate, batch_size=64, progress=True,
                           sort_by_length=True)
        return metrics["accuracy"], metrics["n"]

    def fine_tune(self, model, out: Path, after_step=None, epochs: int = 1, lr: float = 2e-5) -> None:
        config = TrainConfig(epochs=epochs, batch_size=16, lr=lr, weight_decay=0.0, warmup=0.06,
                             mixed_precision="bf16", out_dir=out, plot=False, eval_every_steps=None)
        train_model(model, self.train, None, collate_fn=self.run.collate, config=config, after_step=after_step)
        model.eval()


def quantized(name: str):
    def method(bench: Bench, work: Path) -> torch.nn.Module:
        model = bench.model()
        quantize_model(model, name, skip=["classifier"])
        return model
    return method


METHODS = {"fp32": lambda bench, work: bench.model(), **{name: quantized(name) for name in QUANTIZED}}


def run_method(name: str, bench: Bench, out: Path) -> dict:
    start = time.time()
    model = METHODS[name](bench, out / "work" / name)
    report = size_report(model)
    full = name in FULL_TEST
    if name == "fp32":  # the base run scored itself on the full test split, in fp32
        accuracy, n = bench.base_results["test_accuracy"], bench.base_results["test_examples"]
    else:
        accuracy, n = bench.accuracy(model, full)
    result = {"method": name, "accuracy": accuracy, "test_examples": n, "bytes": report.bytes,
              "sparse_bytes": report.sparse_bytes, "params": report.params, "nonzeros": report.nonzeros,
              "bits_per_param": report.bits_per_param, "seconds": round(time.time() - start, 1)}
    print(json.dumps(result))
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/imdb_compression"))
    parser.add_argument("--methods", help=f"comma-separated subset of {list(METHODS)}")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--quick", action="store_true", help="400 training and 200 test reviews (not kept)")
    parser.add_argument("--resume", action="store_true", help="continue: keep finished methods and the base")
    add_no_save(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = fine_tune_base(args.out / "base", args.resume, args.quick)
    print(f"base: test accuracy {base['test_accuracy']:.2%} on {base['test_examples']} reviews")
    bench = Bench(args.out / "base", args.quick)
    names = args.methods.split(",") if args.methods else list(METHODS)
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {list(METHODS)}")
    done = args.out / "methods"
    done.mkdir(parents=True, exist_ok=True)
    for name in names:
        file = done / f"{name}.json"
        if args.resume and file.is_file():
            continue
        file.write_text(json.dumps(run_method(name, bench, args.out), indent=2))


if __name__ == "__main__":
    main()
