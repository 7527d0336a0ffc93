"""Benchmark: one MiniLM fine-tuned on IMDB, compressed every way tunelab.quant knows: accuracy vs model bytes.

The base is fine-tuned once (MiniLM, every weight, 2,000 class-balanced training reviews minus a 10% validation
split, 128 tokens head+tail, 2 epochs, bf16 autocast on the CPU) and kept in --out/base. Every method then starts
from its weights; the ones that fine-tune (gradual pruning, structured pruning, clustering, QAT, the pipeline)
train on the base's 1,800 training reviews again, bf16 autocast, 1 epoch (113 steps of 16) per stage. Magnitude
pruning is layer-wise: every linear layer and every embedding table loses the same fraction of its own weights
(ranked globally, the embeddings' and the linears' magnitudes are not comparable and MiniLM collapses to chance
at 60%). Sizes are the whole model's, embeddings included.
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
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from _common import add_no_save, resumable, save_run, saved_runs
from tunelab.core.data import load_imdb, train_validation_split
from tunelab.core.train import TrainConfig, evaluate, train_model
from tunelab.quant import cluster, prune
from tunelab.quant.linear import quantize_model
from tunelab.quant.uniform import apply_qat, unload_qat
from tunelab.quant.report import size_report
from tunelab.tasks import runs
from tunelab.tasks.imdb_finetune import FinetuneRunConfig, labelled, run_imdb_finetune

FULL_TEST = {"fp32", "int8", "w8a8", "nf4-dq", "pipeline"}
SUBSET = 2000
BASE = {"model": "minilm", "method": "full",
        "data": {"limit": 2000, "max_length": 128},
        "train": {"epochs": 2, "batch_size": 16, "lr": 5e-5, "mixed_precision": "bf16", "save_every_steps": 50}}
FIGURE = Path(__file__).resolve().parent / "figures" / "imdb_compression.png"
SETTING = ("minilm fully fine-tuned on 1,800 IMDB reviews (128 tok head+tail, 2 ep, bf16 autocast), "
           "whole model incl. embeddings, classifier kept float")
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
        self.train = labelled(run.tokenizer, train, self.data)[: 64 if quick else None]
        self.base_results = json.loads((base_dir / runs.RESULTS_FILE).read_text())
        self.fp32_bytes = 4 * size_report(run.model).params

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


BOTH = (nn.Linear, nn.Embedding)  # what pruning reaches: the embeddings are half of MiniLM's weights


def one_shot(amount: float):
    def method(bench: Bench, work: Path) -> nn.Module:
        model = bench.model()
        prune.magnitude_prune(model, amount, scope="layer", kinds=BOTH)
        return prune.make_permanent(model)
    return method


def gradual(amount: float):
    def method(bench: Bench, work: Path) -> nn.Module:
        model = bench.model()
        # cubic schedule from 0 to `amount` over the first 90 of 113 steps (an event every 9), then 23 at `amount`
        pruner = prune.GradualPruner(model, amount, n_steps=10, interval=9, scope="layer", kinds=BOTH)
        bench.fine_tune(model, work, after_step=pruner)
        return prune.make_permanent(model)
    return method


def structured(bench: Bench, work: Path) -> nn.Module:
    model = bench.model()
    prune.prune_heads(model, 0.4)
    prune.prune_neurons(model, 0.4)
    prune.shrink_structure(model)
    prune.make_permanent(model)
    bench.fine_tune(model, work)
    return model


def clustered(bench: Bench, work: Path) -> nn.Module:
    model = bench.model()
    cluster.cluster_weights(model, 16, skip=["classifier"])  # centroids and biases train, indices stay
    bench.fine_tune(model, work, lr=1e-4)
    return model


def qat_int4(bench: Bench, work: Path) -> nn.Module:
    model = bench.model()
    apply_qat(model, bits=4, granularity="group", group_size=64, skip=["classifier"], embeddings=True)
    bench.fine_tune(model, work)
    unload_qat(model)  # the weights on the int4 grid, then stored as int4 codes like "int4"
    quantize_model(model, "int4", skip=["classifier"])
    return model


def pipeline(bench: Bench, work: Path) -> nn.Module:
    """Deep Compression (Han et al. 2016): prune 40% of every layer and embedding table, fine-tune with the masks,
    cluster the survivors into 16 shared values (the zeros keep a frozen zero centroid), fine-tune the centroids at
    the pruning stage's low learning rate; stored as a 1-bit mask + 4-bit indices of the non-zeros (3.4 bits)."""
    model = bench.model()
    prune.magnitude_prune(model, 0.4, scope="layer", kinds=BOTH)
    bench.fine_tune(model, work / "prune", after_step=lambda step: prune.apply_masks(model))
    prune.make_permanent(model)
    cluster.cluster_weights(model, 16, skip=["classifier"], preserve_sparsity=True)
    bench.fine_tune(model, work / "cluster")
    return model


METHODS = {"fp32": lambda bench, work: bench.model(), **{name: quantized(name) for name in QUANTIZED},
           **{f"prune-{int(a * 100)}": one_shot(a) for a in (0.5, 0.7, 0.9)},
           **{f"gradual-{int(a * 100)}": gradual(a) for a in (0.5, 0.7, 0.9)},
           "structured-40": structured, "cluster-16": clustered, "qat-int4": qat_int4, "pipeline": pipeline}


def run_method(name: str, bench: Bench, out: Path) -> dict:
    start = time.time()
    model = METHODS[name](bench, out / "work" / name)
    report = size_report(model)
    full = name in FULL_TEST
    if name == "fp32":  # the base run scored itself on the full test split, in fp32
        accuracy, n = bench.base_results["test_accuracy"], bench.base_results["test_examples"]
    else:
        accuracy, n = bench.accuracy(model, full)
    stored = report.sparse_bytes  # a pruned tensor is stored as a 1-bit mask + its non-zeros when that is smaller
    result = {"method": name, "accuracy": accuracy, "test_examples": n, "bytes": stored, "dense_bytes": report.bytes,
              "float32_bytes": 4 * report.params if name != "structured-40" else bench.fp32_bytes,
              "params": report.params, "nonzeros": report.nonzeros, "bits_per_param": 8 * stored / report.params,
              "seconds": round(time.time() - start, 1)}
    if name == "fp32":
        result["weight_mse"] = weight_errors(model)
    if name == "structured-40":
        result["forward_speedup"] = forward_speedup(bench.model(), model)
    print(json.dumps(result))
    return result


def weight_errors(model: nn.Module) -> dict:
    """Mean squared round-trip error over every linear weight of the encoder, blocks/groups of 64: the QLoRA
    paper's ordering NF4 < FP4 < int4 on normally distributed weights, on MiniLM's fine-tuned weights."""
    from tunelab.quant.nonuniform import quantize_4bit
    from tunelab.quant.uniform import quantize

    errors = {"nf4": 0.0, "fp4": 0.0, "int4": 0.0}
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and "classifier" not in name:
            w = m.weight.detach()
            errors["nf4"] += (quantize_4bit(w, "nf4", 64).dequantize() - w).pow(2).sum().item()
            errors["fp4"] += (quantize_4bit(w, "fp4", 64).dequantize() - w).pow(2).sum().item()
            errors["int4"] += (quantize(w, 4, granularity="group", group_size=64).dequantize() - w).pow(2).sum().item()
            n += w.numel()
    return {k: v / n for k, v in errors.items()}


@torch.no_grad()
def forward_speedup(dense: nn.Module, shrunk: nn.Module, rounds: int = 5) -> float:
    """fp32 forward time / shrunk forward time on a 16 x 128 batch, interleaved rounds, medians."""
    ids = torch.randint(1000, 30000, (16, 128))
    times = {"dense": [], "shrunk": []}
    for _ in range(rounds):
        for key, model in (("dense", dense), ("shrunk", shrunk)):
            start = time.perf_counter()
            model(ids)
            times[key].append(time.perf_counter() - start)
    return statistics.median(times["dense"]) / statistics.median(times["shrunk"])


def keep(result: dict, setting: str) -> None:
    """Keep one method's result as benchmarks/results/imdb_compression/METHOD.json (a RESULTS.md row) and redraw
    the figure from every kept method."""
    ratio = result["float32_bytes"] / result["bytes"]
    figures = (f"{result['bytes']:,} bytes, {ratio:.1f}x smaller than fp32, {result['bits_per_param']:.2f} bits/param, "
               f"{result['test_examples']:,} test reviews")
    if "forward_speedup" in result:
        figures += f", forward {result['forward_speedup']:.2f}x faster than fp32"
    if "weight_mse" in result:
        figures += ", weight MSE " + " < ".join(f"{k} {v:.2e}" for k, v in sorted(result["weight_mse"].items(),
                                                                                  key=lambda kv: kv[1]))
    save_run("imdb_compression", result["method"], {**result, "setting": setting},
             [{"setting": f"{result['method']}, {setting}", "headline": f"{result['accuracy']:.2%}",
               "figures": figures}])
    plot_kept()


def plot_kept() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = saved_runs("imdb_compression")
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in sorted(kept.items(), key=lambda kv: kv[1]["bytes"]):
        ax.scatter(r["bytes"], 100 * r["accuracy"], s=30)
        ax.annotate(name, (r["bytes"], 100 * r["accuracy"]), fontsize=8, xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("model bytes (embeddings included, log scale)")
    ax.set_ylabel("IMDB test accuracy (%)")
    ax.set_title("MiniLM fine-tuned on IMDB, compressed")
    ax.grid(alpha=0.3)
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=120, bbox_inches="tight")
    plt.close(fig)


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
        result = run_method(name, bench, args.out)
        file.write_text(json.dumps(result, indent=2))
        if not (args.quick or args.no_save):
            keep(result, SETTING)


if __name__ == "__main__":
    main()
