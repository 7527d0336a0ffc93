"""The IMDB job end to end on a subset: it learns, saves a run that evaluate/predict can use."""

import json

import pytest
import torch

from tunelab.core.train import TrainConfig
from tunelab.tasks.imdb_classification import DataConfig, ImdbRunConfig, encode_examples, run_imdb_classification
from tunelab.tasks.runs import evaluate_run, load_run, predict

SMALL_MODEL = dict(d_model=32, n_heads=2, n_layers=1, d_ff=64, dropout=0.1)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, imdb_dir):
    """2,000 training reviews, 3 epochs of a 1-layer model: about 15 s on 2 cores."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = tmp_path_factory.mktemp("imdb_run")
    config = ImdbRunConfig(
        data=DataConfig(data_dir=str(imdb_dir), limit=2000, test_limit=1000, max_length=256, vocab_size=8000),
        model=dict(SMALL_MODEL),
        train=TrainConfig(epochs=3, batch_size=32, lr=2e-3, progress=False),
    )
    return out, run_imdb_classification(config, out)


def test_short_run_learns_well_above_chance(trained_run):
    # A model that does not learn sits at 50% on balanced data; 1,000 reviews give a standard error of
    # about 1.6 points, so 70% cannot be reached by luck.
    _, results = trained_run
    assert results["best_validation"] > 0.70
    assert results["test_accuracy"] > 0.70
    assert results["test_examples"] == 1000
    assert results["train_examples"] + results["validation_examples"] == 2000


def test_run_folder_holds_everything_to_reuse_the_model(trained_run):
    out, results = trained_run
    for name in ("run.json", "vocab.json", "metrics.jsonl", "curves.png", "results.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "best" / "model.safetensors").is_file()
    assert json.loads((out / "results.json").read_text()) == results
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("val_accuracy" in r for r in records) == 3  # one evaluation per epoch


def test_evaluate_run_reproduces_the_reported_test_accuracy(trained_run):
    out, results = trained_run
    metrics = evaluate_run(out, limit=1000, progress=False)
    assert metrics["n"] == 1000
    assert metrics["accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-12)


def test_predict_separates_clear_reviews(trained_run):
    out, _ = trained_run
    texts = ["This movie was wonderful, brilliant acting and a great story. I loved it, the best film.",
             "Awful. The worst movie I have ever seen, boring, stupid and a waste of time. Terrible."]
    first, second = predict(out, texts)
    assert (first["label"], second["label"]) == ("positive", "negative")
    assert 0.5 <= first["probability"] <= 1.0


def test_predict_refuses_empty_text(trained_run):
    out, _ = trained_run
    with pytest.raises(ValueError, match="non-empty"):
        predict(out, ["   "])


def test_load_run_names_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run.json"):
        load_run(tmp_path)


def test_config_rejects_unknown_settings():
    with pytest.raises(ValueError, match="epochz"):
        ImdbRunConfig.from_dict({"train": {"epochz": 3}})
    with pytest.raises(ValueError, match="optimiser"):
        ImdbRunConfig.from_dict({"optimiser": {}})


def test_the_seed_alone_fixes_the_run(tmp_path, imdb_dir):
    """Initial weights come from the run's seed, not from whatever used torch's RNG before."""
    config = ImdbRunConfig.from_dict({
        "data": {"data_dir": str(imdb_dir), "limit": 200, "test_limit": 100, "max_length": 32, "vocab_size": 500},
        "model": {"bigram_buckets": 1000},
        "train": {"epochs": 1, "progress": False, "plot": False},
    })
    torch.manual_seed(1)
    first = run_imdb_classification(config, tmp_path / "first")
    torch.rand(1000)  # a different global RNG state
    second = run_imdb_classification(config, tmp_path / "second")
    assert second["test_loss"] == first["test_loss"]
    weights = [load_run(tmp_path / name).model.state_dict() for name in ("first", "second")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_encode_examples_truncates_and_keeps_labels():
    from datasets import Dataset

    from tunelab.core.text import build_vocab

    rows = Dataset.from_dict({"text": ["a b c d e f", "", "zzz"], "label": [1, 0, 1]})
    vocab = build_vocab(["a b c d e f"], min_freq=1)
    examples = encode_examples(rows, vocab, max_length=4, truncation="head+tail")
    assert [e["label"] for e in examples] == [1, 0, 1] and all(type(e["label"]) is int for e in examples)
    # head+tail: a quarter head, the rest tail
    assert vocab.lookup_tokens(examples[0]["input_ids"]) == ["a", "d", "e", "f"]
    unk = vocab["<unk>"]
    assert examples[1]["input_ids"] == [unk] and examples[2]["input_ids"] == [unk]  # never empty
