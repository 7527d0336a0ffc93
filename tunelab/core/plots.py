"""Training curves from the metrics log: loss (train and validation) and validation accuracy per step.

Draws on a bare matplotlib `Figure` with the Agg canvas, so it works on headless machines and never
changes the pyplot backend of the caller (a notebook keeps its inline backend).
"""

import json
import os
from pathlib import Path


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl file, one JSON object per line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics log at {path}")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(history: list[dict], path, title: str | None = None) -> Path:
    """Save loss and accuracy curves of a training run as a PNG at `path`.

    Args:
        history: metric records as written to metrics.jsonl: training records carry `train_loss`,
            evaluation records `val_loss` and `val_accuracy`; all carry `step`.
        path: the PNG file to write (written to a temporary name, then renamed into place).
        title: optional figure title.
    """
    # Imported here so that `import tunelab` stays fast for code that never plots.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(key):
        points = [(r["step"], r[key]) for r in history if r.get(key) is not None]
        return [s for s, _ in points], [v for _, v in points]

    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    loss_axes.plot(*series("train_loss"), label="train")
    loss_axes.plot(*series("val_loss"), marker="o", label="validation")
    loss_axes.set(xlabel="optimizer step", ylabel="loss", title="loss")
    loss_axes.legend()
    accuracy_axes.plot(*series("val_accuracy"), marker="o", color="tab:orange", label="validation")
    accuracy_axes.set(xlabel="optimizer step", ylabel="accuracy", title="accuracy")
    accuracy_axes.legend()
    if title:
        figure.suptitle(title)
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.85 if title else 0.9, wspace=0.25)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path
