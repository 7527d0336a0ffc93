"""Benchmark: every fine-tuning method on IMDB from MiniLM with the same budget.

Each method trains with `tunelab finetune imdb --model minilm --method METHOD` defaults: the 25,000 training
reviews minus a 10% validation split, at most 256 tokens (head+tail), at most 2 epochs, batch 16, the
method's default options and learning rate (tunelab.tasks.methods), then all 25,000 test reviews (LoRA and
DoRA with the update merged into the weights, as they would be served). Each
method runs in its own subprocess, so that its peak memory is its own, and in its own folder under --out
(named by its label), so that an interrupted method continues with --resume. A finished method is kept as
benchmarks/results/imdb_peft/LABEL.json (LABEL: the method, or --label for a non-default setting: --lr,
--options or --bf16) with its RESULTS.md row (setting: method, options, lr, bf16; headline: test accuracy;
further: trainable parameters, seconds per training step, peak memory, adapter size), and RESULTS.md is
rebuilt. From those files the table and the figure (accuracy against trainable parameters, log x-axis)
are drawn: benchmarks/figures/imdb_peft.{md,png}. Full fine-tuning is the same setting as
benchmarks/imdb_finetune.py; the summary takes its run from there unless `--methods full` ran here.
Targets: LoRA >= 92.0% with under 1% of the parameters trainable, within 0.5 points of full fine-tuning.

    python benchmarks/imdb_peft.py --methods lora              # one method (1 h 20 min to 2 h on 2 CPU cores)
    python benchmarks/imdb_peft.py --resume                    # every PEFT method, continuing interrupted ones
    python benchmarks/imdb_peft.py --limit 400 --test-limit 400 --no-save   # a quick look
    python benchmarks/imdb_peft.py --summary                   # table + figure from the kept runs
    python benchmarks/imdb_peft.py --methods lora --lr 2e-3 --options '{"modules_to_save": ["classifier", "pooler"]}' \
        --label lora-pooler                                     # a non-default setting, kept under its label
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from _common import add_no_save, peak_rss_bytes, resumable, save_run, saved_runs
from tunelab.tasks.methods import METHODS

FIGURES = Path(__file__).resolve().parent / "figures"
LORA_TARGET = 0.92  # the target for LoRA (under 1% trainable), drawn as a line in the figure


def child(method: str, out: Path, args) -> dict:
    from tunelab.tasks.imdb_finetune import FinetuneRunConfig, run_imdb_finetune

    train = {"out_dir": str(out), "resume": resumable(args.resume, out), "progress": not args.quiet}
    if args.epochs:
        train["epochs"] = args.epochs
    if args.lr:
        train["lr"] = args.lr
    if args.bf16:
        train["mixed_precision"] = "bf16"
    options = json.loads(args.options) if args.options else {}
    config = FinetuneRunConfig.from_dict({"model": "minilm", "method": method, "train": train,
                                          "method_options": options,
                                          "data": {"limit": args.limit, "test_limit": args.test_limit}})
    results = run_imdb_finetune(config, out)
    results["peak_memory_bytes"] = peak_rss_bytes()
    results["method_options"], results["lr"], results["bf16"] = config.method_options, config.train.lr, args.bf16
    results["budget"] = (f"{config.data.max_length} tok {config.data.truncation}, {config.train.epochs} ep, "
                         f"batch {config.train.batch_size}")
    results["setting"] = (f"{config.data.max_length} tok {config.data.truncation}, {config.train.epochs} ep, "
                          f"batch {config.train.batch_size}, lr {config.train.lr:g}, options {config.method_options}"
                          + (", bf16 autocast" if args.bf16 else ""))
    (out / "benchmark.json").write_text(json.dumps(results, indent=2))
    return results


def memory(r: dict) -> str:
    return "n/a" if r.get("peak_memory_bytes") is None else f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB"


def options_text(options: dict) -> str:
    """{'r': 4, 'targets': ['q_proj', 'v_proj']} -> 'r=4 targets=q_proj,v_proj'; {} -> 'default options'."""
    words = [f"{key}={','.join(map(str, value)) if isinstance(value, (list, tuple)) else value}"
             for key, value in options.items()]
    return " ".join(words) or "default options"


def results_row(r: dict) -> dict:
    """The RESULTS.md row of a finished method: what sets it apart in the setting, test accuracy as headline."""
    saved = r["adapter_bytes"] if r["adapter_bytes"] is not None else 4 * r["parameters"]
    setting = f"{r['method']}, {options_text(r['method_options'])}, lr {r['lr']:g}"
    if r["bf16"]:
        setting += ", bf16 autocast"
    figures = (f"trainable {r['trainable_parameters']:,} ({r['trainable_percent']:.3f}%), "
               f"{r['train_seconds'] / max(r['steps'], 1):.2f} s/step (validation included), peak memory "
               f"{memory(r)}, saved {saved / 2**20:.2f} MiB; minilm, {r['budget']}, "
               f"best val {r['best_validation']:.2%}")
    return {"setting": setting, "headline": f"{r['test_accuracy']:.2%}", "figures": figures}


def summary() -> None:
    """Markdown table and figure of every run kept in benchmarks/results/imdb_peft (full fine-tuning from
    benchmarks/results/imdb_finetune unless a `full` run was kept here), in the order of METHODS."""
    rows = saved_runs("imdb_peft")
    full = saved_runs("imdb_finetune").get("full")
    if "full" not in rows and full is not None:
        rows["full"] = full
    order = {method: i for i, method in enumerate(METHODS)}

    def rank(item):  # the methods' order, then the label (lora before its variants)
        label, r = item
        return order.get(r.get("method", label), len(order)), label

    rows = dict(sorted(rows.items(), key=rank))
    if not rows:
        print("no finished run under benchmarks/results/imdb_peft")
        return
    lines = ["| run | test accuracy | trainable parameters | trainable % | s / step | peak memory | saved | setting |",
             "|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        saved = r.get("adapter_bytes") or 4 * r["parameters"]  # fp32 model file for full fine-tuning
        percent = 100 * r["trainable_parameters"] / r["parameters"]
        lines.append(f"| {label} | {r['test_accuracy']:.2%} | {r['trainable_parameters']:,} | "
                     f"{percent:.3f}% | {r['train_seconds'] / max(r['steps'], 1):.2f} | "
                     f"{memory(r)} | {saved / 2**20:.2f} MiB | {r.get('setting', '')} |")
    FIGURES.mkdir(exist_ok=True)
    (FIGURES / "imdb_peft.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    # A legend, not labels beside the points: several runs land within a point of each other at similar sizes,
    # so no fixed offset keeps their labels apart. Colour and marker together tell up to 40 runs apart.
    colors, markers = matplotlib.colormaps["tab10"].colors, "osD^v"
    by_accuracy = sorted(rows.items(), key=lambda item: -item[1]["test_accuracy"])
    for i, (label, r) in enumerate(by_accuracy):
        axes.scatter(r["trainable_parameters"], 100 * r["test_accuracy"], s=36, color=colors[i % 10],
                     marker=markers[i // 10 % len(markers)], label=f"{label}: {100 * r['test_accuracy']:.2f}%")
    axes.axhline(100 * LORA_TARGET, color="grey", linestyle="--", linewidth=1, label="LoRA target")
    axes.margins(x=0.1, y=0.1)
    axes.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    axes.set(xscale="log", xlabel="trainable parameters (log scale)", ylabel="IMDB test accuracy (%)",
             title="MiniLM on IMDB: accuracy against trainable parameters")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(FIGURES / "imdb_peft.png", dpi=100)
    print(f"wrote {FIGURES / 'imdb_peft.md'} and {FIGURES / 'imdb_peft.png'}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(m for m in METHODS if m != "full"),
                        help="comma-separated; default: every method but full (see benchmarks/imdb_finetune.py)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/imdb_peft"))
    parser.add_argument("--limit", type=int, help="train subset (a quick look; not kept)")
    parser.add_argument("--test-limit", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the method's, tunelab.tasks.methods)")
    parser.add_argument("--options", help='method options as JSON, e.g. \'{"r": 4}\' (default: the method\'s)')
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--resume", action="store_true", help="continue interrupted methods from their checkpoints")
    parser.add_argument("--bf16", action="store_true", help="train under bf16 autocast (CPU or CUDA); the setting "
                                                                 "says so, the test evaluation stays fp32")
    parser.add_argument("--label", help="name of the run in benchmarks/results/imdb_peft, in the table and of its "
                                        "folder under --out (default: the method; required with --lr, --options "
                                        "or --bf16)")
    parser.add_argument("--quiet", action="store_true")
    add_no_save(parser)
    parser.add_argument("--summary", action="store_true", help="only write the table and figure")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.out / (args.label or args.child), args)))
        return
    if args.summary:
        summary()
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; available: {list(METHODS)}")
    quick = args.limit is not None or args.test_limit is not None
    if (args.lr or args.options or args.bf16) and not args.label and not quick:
        parser.error("a run with --lr, --options or --bf16 is not the method's default setting: name it with --label")
    if args.label in METHODS:
        parser.error(f"--label {args.label} would overwrite that method's default run: choose another name")
    if args.label and len(methods) != 1:
        parser.error("--label names the run of one method; give one method with --methods")
    for method in methods:
        command = [sys.executable, __file__, "--child", method, "--out", str(args.out)]
        for flag in ("limit", "test_limit", "epochs", "lr", "options", "threads", "label"):
            if getattr(args, flag) is not None:
                command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        command += ["--resume"] * args.resume + ["--quiet"] * args.quiet + ["--bf16"] * args.bf16
        subprocess.run(command, check=True)
        r = json.loads((args.out / (args.label or method) / "benchmark.json").read_text())
        print(f"{method}: test accuracy {r['test_accuracy']:.2%} on {r['test_examples']} reviews")
        if not quick and not args.no_save:
            r["method"] = method
            save_run("imdb_peft", args.label or method, r, [results_row(r)])
    if not quick:
        summary()


if __name__ == "__main__":
    main()
