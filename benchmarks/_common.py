"""What every benchmark shares: a description of the machine, keeping a finished run, timing frames.

A finished run is kept as benchmarks/results/BENCHMARK/LABEL.json with the rows it contributes to
benchmarks/RESULTS.md, which is then rebuilt from all kept runs (results_md.py). A row is, in order
(CONTRIBUTING.md, "Adding a benchmark"): the script name, the setting, the headline figure, further figures,
the machine, the date, the command that reproduces it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

from results_md import write_results  # benchmarks/ is on sys.path when a script in it runs

# One JSON file per finished run (benchmarks/results/BENCHMARK/LABEL.json), kept in git: long runs take hours,
# often several sessions, and RESULTS.md, tables and figures are drawn from these files, not from benchmarks/out.
RUN_RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """CPU model, cores, torch threads and version (GPU name when one is used): what timings depend on."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}{gpu}"


def command_line() -> str:
    """The command that ran this script, as one would type it."""
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def save_run(benchmark: str, label: str, results: dict, rows: list[dict]) -> Path:
    """Keep a finished run as benchmarks/results/BENCHMARK/LABEL.json (its results, the machine, the date and
    the command) with the RESULTS.md rows it contributes (each {"setting", "headline", "figures"}), then
    rebuild RESULTS.md from every kept run and print the rows. A run with the same label is replaced."""
    file = RUN_RESULTS / benchmark / f"{label}.json"
    file.parent.mkdir(parents=True, exist_ok=True)
    record = {"label": label, **results, "rows": rows, "machine": machine(), "date": str(date.today()),
              "command": command_line()}
    file.write_text(json.dumps(record, indent=2) + "\n")
    write_results()
    for row in rows:
        print(f"{benchmark} | {row['setting']} | {row['headline']} | {row['figures']}")
    print(f"kept {file}; rebuilt benchmarks/RESULTS.md")
    return file


def add_no_save(parser: argparse.ArgumentParser) -> None:
    """--no-save (formerly --no-append): a run that keeps nothing and leaves RESULTS.md as it is."""
    parser.add_argument("--no-save", "--no-append", dest="no_save", action="store_true",
                        help="do not keep the run (benchmarks/results) nor rebuild RESULTS.md")


def add_training_run_options(parser: argparse.ArgumentParser) -> None:
    """What every benchmark that trains takes: --threads, --device, --resume and --no-save."""
    parser.add_argument("--threads", type=int)
    parser.add_argument("--device", help="cpu, cuda or auto")
    parser.add_argument("--resume", action="store_true")
    add_no_save(parser)


def parse_with_threads(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """parser.parse_args(argv), then torch.set_num_threads(--threads) when given."""
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def saved_runs(benchmark: str) -> dict[str, dict]:
    """{label: results} of every run `save_run` kept for `benchmark`."""
    folder = RUN_RESULTS / benchmark
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    return {f.stem: json.loads(f.read_text()) for f in files}


# glibc serves allocations above this many bytes with mmap and returns them to the OS when freed, so
# resident memory follows the memory tensors really hold. Without it glibc raises the threshold as
# large blocks are freed and keeps them cached: peak RSS then measures its caching as much as the model.
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 17)}


def resumable(resume: bool, out_dir: Path) -> bool:
    """--resume continues a run that has a checkpoint in `out_dir`; a run not started yet starts fresh."""
    return resume and (Path(out_dir) / "checkpoints" / "last").is_dir()


def rss_bytes() -> int:
    """Resident memory of this process now."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_training(model, run, batch: int, length: int, steps: int, warmup: int, vocab_size: int | None = None) -> dict:
    """Median seconds of an inference forward and of a training step (forward + backward + AdamW on the
    parameters that require grad), and the peak memory the steps add, for `run(ids, mask) -> logits`
    on a (batch, length) batch of MiniLM-range token ids: a 2-class classification loss. With `vocab_size`,
    ids drawn from the whole vocabulary and a causal LM's next-token loss on them instead."""
    from tunelab.core.evaluation import causal_lm_loss
    from tunelab.core.train import make_optimizer

    if vocab_size is None:
        ids = torch.randint(1000, 30000, (batch, length))
        ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
        labels = torch.randint(0, 2, (batch,))
        loss_of = lambda logits: torch.nn.functional.cross_entropy(logits, labels)  # noqa: E731
    else:
        ids = torch.randint(0, vocab_size, (batch, length))
        loss_of = lambda logits: causal_lm_loss(logits, ids)  # noqa: E731
    mask = torch.ones_like(ids)
    model.eval()
    forwards = []
    with torch.no_grad():
        for _ in range(warmup + steps):
            start = time.perf_counter()
            run(ids, mask)
            forwards.append(time.perf_counter() - start)
    model.train()
    optimizer = make_optimizer(model, lr=2e-5, weight_decay=0.01)  # the same AdamW on both sides
    before = rss_bytes()
    step_times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        loss = loss_of(run(ids, mask))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - start)
    return {"forward": statistics.median(forwards[warmup:]), "step": statistics.median(step_times[warmup:]),
            "memory": peak_rss_bytes() - before}


def compare_in_subprocesses(script: str, impls: tuple[str, ...], args) -> dict[str, list[dict]]:
    """Run `script --child IMPL` for each implementation in turn, `args.rounds` times: timings with the
    allocator as users run it, memory in a separate short run under CHILD_ENV. Each child prints its
    `time_training` dict as its last line. Returns {impl: [one dict per round]}."""

    def run_child(impl: str, steps: int, warmup: int, env=None) -> dict:
        command = [sys.executable, script, "--child", impl, "--batch", str(args.batch), "--length",
                   str(args.length), "--steps", str(steps), "--warmup", str(warmup)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
        return json.loads(out.strip().splitlines()[-1])

    results = {impl: [] for impl in impls}
    for round_ in range(args.rounds):
        for impl in impls:
            r = run_child(impl, args.steps, args.warmup)
            r["memory"] = run_child(impl, 2, 1, CHILD_ENV)["memory"]
            results[impl].append(r)
            print(f"round {round_ + 1} {impl:4s}: forward {r['forward']:.3f} s, step {r['step']:.3f} s, "
                  f"peak memory +{r['memory'] / 2**20:.0f} MiB")
    return results


def speed_comparison(description: str, script: str, impls: tuple[str, ...], child, argv=None):
    """The frame of a side-by-side speed benchmark. Parses the options they share; in a child process
    (`--child IMPL`) prints `child(impl, args)` (a `time_training` dict) and returns None; in the parent runs
    every implementation in subprocesses and returns (args, best, rounds): best[impl] holds the best round's
    forward, step and memory, rounds[impl] every round's dict."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads in each subprocess (default: torch's choice)")
    add_no_save(parser)
    parser.add_argument("--child", choices=impls, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return None
    rounds = compare_in_subprocesses(script, impls, args)
    best = {impl: {key: min(r[key] for r in rs) for key in ("forward", "step", "memory")}
            for impl, rs in rounds.items()}
    return args, best, rounds
