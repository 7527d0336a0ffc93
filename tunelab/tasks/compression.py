"""Compress a trained IMDB classifier: quantize, prune or cluster the run's model and save it as a new run.

    tunelab compress RUN_DIR --method nf4-dq --out DIR
      -> runs.load_run(RUN_DIR) (any classifier run: from scratch, fine-tuned, an adapter merged in)
      -> the compression (tunelab.quant) -> DIR/model.safetensors + DIR/run.json + DIR/results.json

The new folder is a run like any other: `tunelab evaluate DIR` and `tunelab predict DIR` read it. Its run.json
names the source run (its tokenizer and architecture come from there) and what rebuilds the compressed layers
before the weights load: the quantized layers' layout, the shapes left by structured pruning, the clustered
layers. Every tensor is stored (packed codes, scales, codebooks, pruned weights) in safetensors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from tunelab.core.io import atomic_folder, read_safetensors, write_safetensors
from tunelab.quant import cluster, prune
from tunelab.quant.linear import QUANT_METHODS, load_quantized, quantize_model, save_quantized
from tunelab.quant.report import size_report
from tunelab.tasks import runs

TASK = "imdb-compressed"
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class Compression:
    """One way `tunelab compress` shrinks a model.

    apply(model, options, skip, embeddings) compresses the float model in place and returns what run.json keeps
    besides the options (JSON-able); save(model, file) writes the compressed weights; load(model, file, record)
    turns a float model of the source architecture into the saved compressed one.
    """

    name: str
    summary: str
    apply: Callable[[nn.Module, dict, list[str], bool], dict]
    options: dict = field(default_factory=dict)  # the method's options and their defaults
    save: Callable[[nn.Module, Path], None] = lambda model, file: write_safetensors(file, model.state_dict())
    load: Callable[[nn.Module, Path, dict], None] = (
        lambda model, file, record: model.load_state_dict(read_safetensors(file), strict=True))


def _quantization(name: str) -> Compression:
    def apply(model, options, skip, embeddings):
        quantize_model(model, name, skip=skip, embeddings=embeddings, **options)
        return {}

    defaults = {k: v for k, v in QUANT_METHODS[name].options.items()
                if k in ("group_size", "blocksize", "threshold", "bits")}
    return Compression(name, QUANT_METHODS[name].summary, apply, defaults, save_quantized,
                       lambda model, file, record: load_quantized(model, file))


def _magnitude_prune(model, options, skip, embeddings):
    kinds = (nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)
    prune.magnitude_prune(model, options["amount"], scope=options["scope"], skip=skip or None,
                          kinds=kinds)
    prune.make_permanent(model)
    return {}


def _structured_prune(model, options, skip, embeddings):
    prune.prune_heads(model, options["amount"], n=options["norm"])
    prune.prune_neurons(model, options["amount"], n=options["norm"])
    structure = prune.shrink_structure(model)
    prune.make_permanent(model)  # the masks went with the removed rows and columns
    return {"structure": structure}


def _load_structured(model, file, record):
    prune.apply_structure(model, record["structure"])
    model.load_state_dict(read_safetensors(file), strict=True)


def _cluster(model, options, skip, embeddings):
    cluster.cluster_weights(model, n_clusters=options["clusters"], init=options["init"], skip=skip,
                            embeddings=embeddings)
    return {}


COMPRESSIONS = {c.name: c for c in [
    *(_quantization(name) for name in QUANT_METHODS),
    Compression("prune", "zero the smallest weights (magnitude pruning, per layer or global)", _magnitude_prune,
                {"amount": 0.5, "scope": "layer"}),
    Compression("prune-structured", "remove the weakest attention heads and feed-forward neurons (a smaller model)",
                _structured_prune, {"amount": 0.4, "norm": 2}, load=_load_structured),
    Compression("cluster", "share weights: a k-means codebook per layer, one small index per weight", _cluster,
                {"clusters": 16, "init": "kmeans++"}, cluster.save_clustered,
                lambda model, file, record: cluster.load_clustered(model, file)),
]}


def compress_run(run_dir: str | Path, method: str, out_dir: str | Path, options: dict | None = None,
                 skip: list[str] | tuple[str, ...] = (), embeddings: bool = True) -> dict:
    """Compress the model of a classifier run into a new run folder; return its size figures (results.json).

    Args:
        run_dir: a classifier run folder (`tunelab train`, `tunelab finetune`, or a compressed run).
        method: a key of COMPRESSIONS. options: that method's options (unknown ones are refused).
        out_dir: the new run folder (written atomically; an existing one is refused).
        skip: module names kept in floating point (e.g. ["classifier"]). embeddings: compress embeddings too.
    """
    if method not in COMPRESSIONS:
        raise ValueError(f"unknown compression method {method!r}; expected one of {sorted(COMPRESSIONS)}")
    compression = COMPRESSIONS[method]
    unknown = sorted(set(options or {}) - set(compression.options))
    if unknown:
        raise ValueError(f"{method} takes the options {sorted(compression.options)}, not {unknown}")
    settings = {**compression.options, **(options or {})}
    run_dir, out_dir = Path(run_dir).resolve(), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} already exists and is not empty: choose another output folder")
    source_record = runs.read_record(run_dir)
    if source_record["task"] == TASK:
        raise ValueError(f"{run_dir} is already a compressed run: compress its source run "
                         f"{source_record['source']} instead")
    model = runs.load_run(run_dir).model.cpu().eval()
    before = size_report(model)
    kept = compression.apply(model, settings, list(skip), embeddings)
    after = size_report(model)
    record = {"task": TASK, "source": str(run_dir), "source_task": source_record["task"], "method": method,
              "options": settings, "skip": list(skip), "embeddings": embeddings, **kept}
    results = {"method": method, "params": after.params, "bytes": after.bytes, "float32_bytes": before.bytes,
               "ratio": before.bytes / after.bytes, "bits_per_param": after.bits_per_param,
               "nonzeros": after.nonzeros, "sparsity": after.sparsity}
    with atomic_folder(out_dir) as tmp:
        compression.save(model, tmp / WEIGHTS)
        (tmp / runs.RUN_FILE).write_text(json.dumps(record, indent=2))
        (tmp / runs.RESULTS_FILE).write_text(json.dumps(results, indent=2))
    return results


def load_run(run_dir: str | Path, device: str | None = None) -> runs.Run:
    """The compressed model of a `compress_run` folder on the source run's tokenizer and data settings."""
    run_dir = Path(run_dir)
    record = runs.read_record(run_dir)
    source = Path(record["source"])
    if not (source / runs.RUN_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} was compressed from {source}, which is gone: the compressed run reads "
                                "its tokenizer and architecture from there")
    if not (run_dir / WEIGHTS).is_file():
        raise FileNotFoundError(f"{run_dir} has no {WEIGHTS}")
    run = runs.load_run(source)
    model = run.model.cpu()
    compression = COMPRESSIONS.get(record["method"])
    if compression is None:
        raise ValueError(f"{run_dir}/run.json names compression method {record['method']!r}, which this version "
                         f"of TuneLab does not know (known: {sorted(COMPRESSIONS)})")
    compression.load(model, run_dir / WEIGHTS, record)
    run.model = model.to(device or "cpu").eval()
    return run


runs.register(TASK, load_run)
