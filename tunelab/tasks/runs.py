"""The run registry: what every saved run folder shares, whichever job wrote it.

A run folder holds run.json, whose "task" names the job that wrote it (`imdb-classification`, `imdb-finetune`,
`imdb-mlm`; a run.json without one is a from-scratch classifier's, as written before runs recorded their task).
Each job registers a loader for its task here, so `load_run`, `evaluate_run` and `predict` serve every kind of
run and the jobs never import each other:

    tunelab.tasks.imdb_classification --register--> runs <--register-- tunelab.tasks.imdb_finetune
    cli.py (evaluate, predict) --> runs.load_run(run_dir) --> the loader of run.json's task

What the jobs also share lives here: reading and validating run.json (`read_record`, `known_settings`), writing
it, and the tail of a training job (best weights, test evaluation, results.json: `finish_run`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from tunelab.core.checkpoint import load_model_weights
from tunelab.core.data import load_imdb
from tunelab.core.train import TrainConfig, TrainResult, evaluate

RUN_FILE = "run.json"
RESULTS_FILE = "results.json"
UNNAMED_TASK = "imdb-classification"  # the task of a run.json that names none
LABELS = ("negative", "positive")  # IMDB's classes, in label order


class Run(Protocol):
    """A saved run loaded back, as evaluate_run and predict use it (ClassifierRun, FinetuneRun)."""

    model: nn.Module  # best weights, eval mode
    collate: Callable  # list of {"input_ids": [...]} -> batch of tensors
    data: object  # the run's data settings: data_dir, seed, max_length, truncation ...

    def encode(self, texts) -> list[dict]: ...


@dataclass(frozen=True)
class RunKind:
    """What the registry knows of one task: its loader, and the classes its model predicts (None: the run is
    not a classifier, e.g. a masked language model, and evaluate/predict refuse it)."""

    task: str
    load: Callable[..., Run]
    labels: tuple[str, ...] | None = LABELS
    hint: str = ""  # what to do with such a run instead, for a refusal


_KINDS: dict[str, RunKind] = {}


def register(task: str, load: Callable[..., Run], labels: tuple[str, ...] | None = LABELS, hint: str = "") -> None:
    """Make `load(run_dir, device=None, **options)` the loader of runs whose run.json names `task`."""
    _KINDS[task] = RunKind(task, load, labels, hint)


def registered_tasks() -> list[str]:
    return sorted(_KINDS)


def known_settings(cls, values: dict, section: str) -> dict:
    """`values` if every key is a field of the dataclass `cls`, else a ValueError naming the unknown ones."""
    if not isinstance(values, dict):
        raise ValueError(f"the {section} settings must be a mapping, got {type(values).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {section} settings {unknown}; known: {sorted(names)}")
    return values


def config_sections(values: dict, sections: dict[str, type]) -> dict[str, dict]:
    """The sections of a run config ({"data": {...}, "train": {...}, ...}; run.json's "task" is ignored), each
    checked against its dataclass: an unknown section or setting is refused by name."""
    values = {k: v for k, v in values.items() if k != "task"}
    unknown = sorted(set(values) - set(sections))
    if unknown:
        raise ValueError(f"unknown config sections {unknown}; expected {sorted(sections)}")
    return {name: dict(known_settings(cls, values.get(name, {}), name)) for name, cls in sections.items()}


def read_record(run_dir: str | Path) -> dict:
    """The run.json of a run folder, with its "task" filled in; a missing, unreadable or foreign one is refused."""
    file = Path(run_dir) / RUN_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a TuneLab run folder: it has no {RUN_FILE} "
                                "(make one with `tunelab train imdb --out DIR`)")
    try:
        record = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{file} is not valid JSON ({error})") from error
    if not isinstance(record, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(record).__name__}")
    task = record.setdefault("task", UNNAMED_TASK)
    if task not in _KINDS:
        raise ValueError(f"{file} names task {task!r}, which this version of TuneLab does not know "
                         f"(known: {registered_tasks()})")
    return record


def write_record(out_dir: Path, record: dict) -> None:
    """Write run.json: the run's settings as the job will use them, with the folder it trains in."""
    record = {**record, "train": {**record.get("train", {}), "out_dir": str(out_dir)}}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RUN_FILE).write_text(json.dumps(record, indent=2))


def load_run(run_dir: str | Path, device: str | None = None, **options) -> Run:
    """Load any run folder with the loader of its task; `options` go to that loader (e.g. merge=False)."""
    kind = _KINDS[read_record(run_dir)["task"]]
    return kind.load(Path(run_dir), device, **options)


def _classifier_run(run_dir: str | Path, device: str | None, what: str) -> tuple[Run, tuple[str, ...]]:
    kind = _KINDS[read_record(run_dir)["task"]]
    if kind.labels is None:
        raise ValueError(f"{run_dir} is an {kind.task} run, not a classifier: {what} needs a classification run"
                         + (f" ({kind.hint})" if kind.hint else ""))
    return kind.load(Path(run_dir), device), kind.labels


def evaluate_run(run_dir, split: str = "test", limit: int | None = None, data_dir: str | None = None,
                 batch_size: int = 128, device: str | None = None, progress: bool = True) -> dict:
    """Accuracy and loss of a saved classification run on an IMDB split ("test", or "train" for a sanity check)."""
    run, _ = _classifier_run(run_dir, device, "evaluate")
    dataset = load_imdb(split, data_dir or run.data.data_dir, limit=limit, seed=run.data.seed)
    examples = [{**x, "label": y} for x, y in zip(run.encode(dataset["text"]), dataset["label"])]
    return evaluate(run.model, examples, collate_fn=run.collate, batch_size=batch_size, device=device,
                    progress=progress, sort_by_length=True)


@torch.no_grad()
def predict(run_dir, texts: list[str], device: str | None = None) -> list[dict]:
    """The class of each text: {"label": e.g. "positive", "probability": p of that label}."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError("predict() needs one or more non-empty texts")
    run, labels = _classifier_run(run_dir, device, "predict")
    batch = run.collate(run.encode(texts))
    probs = torch.softmax(run.model(**{k: v.to(device or "cpu") for k, v in batch.items()}), dim=-1)  # (B, classes)
    return [{"label": labels[int(p.argmax())], "probability": float(p.max())} for p in probs]


def load_best(model: nn.Module, out_dir: Path) -> nn.Module:
    """Put the weights of the best evaluation (checkpoints/best) into `model`, when the run kept one."""
    if (out_dir / "checkpoints" / "best").exists():
        load_model_weights(model, out_dir / "checkpoints" / "best")
    return model


def finish_run(model: nn.Module, out_dir: Path, result: TrainResult, config: TrainConfig, test_examples: list[dict],
               collate: Callable, figures: dict, eval_batch_size: int = 64) -> dict:
    """Score a trained classifier on the test examples and write results.json: the test figures, the training
    run's, and the job's own `figures` (parameter counts, timings ...). Returns what it wrote."""
    test = evaluate(model, test_examples, collate_fn=collate, batch_size=config.eval_batch_size or eval_batch_size,
                    device=config.device, progress=config.progress, sort_by_length=True,
                    mixed_precision=config.eval_precision())
    results = {"test_accuracy": test["accuracy"], "test_loss": test["loss"], "test_examples": test["n"],
               "best_validation": result.best_metric, "best_step": result.best_step, "steps": result.steps,
               **figures, "completed": result.completed}
    (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
    return results
