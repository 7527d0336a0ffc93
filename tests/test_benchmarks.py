"""benchmarks/RESULTS.md is what `python benchmarks/results_md.py` builds from the kept runs, the
links to the benchmarks' stories in benchmarks/README.md lead somewhere, and imdb_lm's kept model is the run's.

benchmarks/ is not a package (its scripts run as `python benchmarks/NAME.py`), so the generator is loaded
from its path. Nothing here runs a benchmark.
"""

import importlib.util
import json
import re
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT

BENCHMARKS = REPO_ROOT / "benchmarks"


def load_generator():
    spec = importlib.util.spec_from_file_location("results_md", BENCHMARKS / "results_md.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_md_is_current():
    generator = load_generator()
    assert (BENCHMARKS / "RESULTS.md").read_text() == generator.results_markdown(), (
        "benchmarks/RESULTS.md is out of date: run python benchmarks/results_md.py")


KEPT_RUNS = sorted((BENCHMARKS / "results").glob("*/*.json"))


@pytest.mark.parametrize("path", KEPT_RUNS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_kept_run_holds_its_rows(path):
    record = json.loads(path.read_text())
    assert record["label"] == path.stem
    for key in ("machine", "date", "command"):
        assert isinstance(record[key], str) and record[key], f"{path}: no {key}"
    assert record["command"].startswith("python benchmarks/"), record["command"]
    assert record["rows"], f"{path}: a kept run contributes at least one row to RESULTS.md"
    for row in record["rows"]:
        assert set(row) == {"setting", "headline", "figures"}, row
        assert all(isinstance(value, str) and value for value in row.values()), row


def test_every_benchmark_has_a_section(tmp_path):
    """A section per script, even before its first kept run; superseded runs stand apart, marked."""
    generator = load_generator()
    text = generator.results_markdown()
    for script in BENCHMARKS.glob("*.py"):
        if not script.name.startswith("_") and script.stem not in generator.NOT_BENCHMARKS:
            assert f"\n## {script.stem}\n" in text
    (tmp_path / "results" / "demo").mkdir(parents=True)
    common = {"machine": "m", "date": "2026-01-01", "command": "python benchmarks/demo.py"}
    rows = [{"setting": "s", "headline": "1.00x", "figures": "f"}]
    (tmp_path / "results" / "demo" / "old.json").write_text(json.dumps(
        {"label": "old", "rows": rows, **common, "superseded": "earlier code"}))
    (tmp_path / "results" / "demo" / "new.json").write_text(json.dumps({"label": "new", "rows": rows, **common}))
    demo = generator.results_markdown(tmp_path)
    current, superseded = demo.split("Superseded, kept for the record:")
    assert current.count("| demo | s | 1.00x |") == 1
    assert "| demo | s (superseded: earlier code) | 1.00x |" in superseded


def test_links_to_benchmark_stories_find_their_section():
    """README.md's results table and RESULTS.md link to sections of benchmarks/README.md that exist."""
    headings = re.findall(r"^#+ (.+)$", (BENCHMARKS / "README.md").read_text(), flags=re.M)
    anchors = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
    links = re.findall(r"\(benchmarks/README\.md#([\w-]+)\)", (REPO_ROOT / "README.md").read_text())
    links += re.findall(r"\(README\.md#([\w-]+)\)", (BENCHMARKS / "RESULTS.md").read_text())
    assert links and not set(links) - anchors, f"no such section in benchmarks/README.md: {set(links) - anchors}"


def test_imdb_lm_keeps_a_bf16_copy_of_its_model_that_loads_back(tmp_path, monkeypatch):
    from tunelab.core.decoder import Llama, LlamaConfig
    from tunelab.core.hub import load_pretrained, save_pretrained
    from tunelab.core.io import read_safetensors

    monkeypatch.syspath_prepend(str(BENCHMARKS))  # imdb_lm imports its sibling _common
    monkeypatch.delitem(sys.modules, "imdb_lm", raising=False)
    import imdb_lm

    torch.manual_seed(0)
    run = save_pretrained(Llama(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=48)), tmp_path / "run")
    kept = imdb_lm.keep_model(run, "tiny", results=tmp_path / "results")
    assert kept == tmp_path / "results" / "imdb_lm" / "tiny"
    assert {t.dtype for t in read_safetensors(kept / "model.safetensors").values()} == {torch.bfloat16}
    full, _ = load_pretrained(run, task="causal_lm")
    half, _ = load_pretrained(kept, task="causal_lm")
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        expected, got = full(ids), half(ids)
    expected, got = getattr(expected, "logits", expected), getattr(got, "logits", got)
    assert next(half.parameters()).dtype == torch.float32  # loaded back into float32 parameters
    assert not torch.equal(got, expected)  # the weights were rounded ...
    torch.testing.assert_close(got, expected, atol=0.02, rtol=0)  # ... to bf16, and the model is the same model

