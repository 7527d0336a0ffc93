"""What every benchmark shares: a description of the machine, and appending a row to RESULTS.md.

A row is, in order (DESIGN.md): the script name, the setting, the headline figure the issue names,
further figures, the machine, the date, the command that reproduces it.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from datetime import date
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = ("| benchmark | setting | headline | further figures | machine | date | command |\n"
          "|---|---|---|---|---|---|---|\n")


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


def append_row(benchmark: str, setting: str, headline: str, figures: str, command: str | None = None) -> None:
    """Append one markdown row to benchmarks/RESULTS.md (creating the table if needed) and print it."""
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\n" + HEADER)
    row = (f"| {benchmark} | {setting} | {headline} | {figures} | {machine()} | {date.today()} | "
           f"`{command or command_line()}` |\n")
    with RESULTS.open("a") as f:
        f.write(row)
    print(row, end="")
