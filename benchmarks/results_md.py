"""benchmarks/RESULTS.md, written from the kept runs: one section per benchmark, one row per figure.

Every finished benchmark run is kept as benchmarks/results/BENCHMARK/LABEL.json (`save_run` in _common.py):
its numbers, the machine, the date, the command that ran it, and the rows it puts in RESULTS.md ("rows": a
list of {setting, headline, figures}). This module reads those files and nothing else (neither torch nor
the benchmark scripts), so the table can be rebuilt anywhere, and a test checks that the committed file is
what it builds. A run whose file says "superseded" (and why) is listed apart, under its benchmark.

    python benchmarks/results_md.py            # rewrite benchmarks/RESULTS.md
    python benchmarks/results_md.py --check    # exit 1 if benchmarks/RESULTS.md is not current
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
# The order benchmarks/README.md tells them in; a benchmark not listed here follows, alphabetically.
ORDER = ("imdb_scratch", "encoder_speed", "peft_speed", "imdb_finetune", "imdb_mlm", "imdb_peft")
NOT_BENCHMARKS = ("results_md",)  # scripts in benchmarks/ that measure nothing (and _*.py)
HEADER = ("| benchmark | setting | headline | further figures | machine | date | command |\n"
          "|---|---|---|---|---|---|---|\n")
ROW_KEYS = ("setting", "headline", "figures")


def benchmark_names(root: Path = BENCHMARKS) -> list[str]:
    """Every benchmark script in `root` and every folder of kept runs, in ORDER, then alphabetically."""
    scripts = {p.stem for p in root.glob("*.py") if not p.name.startswith("_") and p.stem not in NOT_BENCHMARKS}
    folders = {p.name for p in (root / "results").iterdir() if p.is_dir()} if (root / "results").is_dir() else set()
    names = scripts | folders
    return [n for n in ORDER if n in names] + sorted(names - set(ORDER))


def kept_runs(benchmark: str, root: Path = BENCHMARKS) -> list[dict]:
    """The JSON records of `benchmark`'s kept runs, oldest first (then by label)."""
    folder = root / "results" / benchmark
    records = [json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    return sorted(records, key=lambda r: (r["date"], r["label"]))


def describe(benchmark: str, root: Path = BENCHMARKS) -> str:
    """What the benchmark measures: the first line of its script's docstring (read, not imported)."""
    script = root / f"{benchmark}.py"
    if not script.exists():
        return ""
    docstring = ast.get_docstring(ast.parse(script.read_text()))
    if not docstring:
        return ""
    first = docstring.splitlines()[0].removeprefix("Benchmark: ")
    return first[:1].upper() + first[1:]


def cell(text) -> str:
    """A markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def table_row(benchmark: str, record: dict, row: dict) -> str:
    missing = [key for key in ROW_KEYS if key not in row]
    if missing:
        raise ValueError(f"results/{benchmark}/{record['label']}.json: a row lacks {missing}")
    cells = [benchmark, row["setting"], row["headline"], row["figures"], record["machine"], record["date"],
             f"`{record['command']}`"]
    return "| " + " | ".join(cell(c) for c in cells) + " |\n"


def section(benchmark: str, root: Path = BENCHMARKS) -> str:
    records = kept_runs(benchmark, root)
    current = [r for r in records if not r.get("superseded")]
    superseded = [r for r in records if r.get("superseded")]
    story = f"What it measures, the setting and the caveats: [README.md](README.md#{benchmark})."
    text = f"## {benchmark}\n\n" + " ".join(filter(None, [describe(benchmark, root), story])) + "\n\n"
    if not records:
        return text + "No finished run kept yet.\n"
    if current:
        text += HEADER + "".join(table_row(benchmark, r, row) for r in current for row in r["rows"])
    if superseded:
        text += ("\n" if current else "") + "Superseded, kept for the record:\n\n" + HEADER
        for r in superseded:
            for row in r["rows"]:
                marked = {**row, "setting": f"{row['setting']} (superseded: {r['superseded']})"}
                text += table_row(benchmark, r, marked)
    return text


def results_markdown(root: Path = BENCHMARKS) -> str:
    """The text of benchmarks/RESULTS.md, built from root/results/*/*.json."""
    intro = ("# Benchmark results\n\n"
             "Generated from the kept runs in `benchmarks/results/` by `python benchmarks/results_md.py`: edit those "
             "files, not this one. Every row is one figure of one finished run, with the command that reproduces "
             "it. Timings are ratios measured side by side in one run; memory is the process's peak resident set "
             "(see [README.md](README.md#memory)).\n")
    return intro + "".join("\n" + section(name, root) for name in benchmark_names(root))


def write_results(root: Path = BENCHMARKS) -> Path:
    """Rewrite root/RESULTS.md from the kept runs; returns its path."""
    path = root / "RESULTS.md"
    path.write_text(results_markdown(root))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say whether RESULTS.md is current")
    args = parser.parse_args(argv)
    path = BENCHMARKS / "RESULTS.md"
    if args.check:
        current = path.exists() and path.read_text() == results_markdown()
        print(f"{path} is {'current' if current else 'out of date: run python benchmarks/results_md.py'}")
        return 0 if current else 1
    print(f"wrote {write_results()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
