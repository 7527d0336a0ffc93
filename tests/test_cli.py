"""The `tunelab` command: a tiny run through train, evaluate and predict, and one-line errors."""

import json

import pytest

from tunelab.cli import build_parser, main

TINY = ["--limit", "200", "--test-limit", "100", "--epochs", "1", "--max-length", "64", "--vocab-size", "2000",
        "--d-model", "16", "--heads", "2", "--layers", "1", "--d-ff", "32", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, imdb_dir):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "imdb", "--data-dir", str(imdb_dir), "--out", str(out), *TINY]) == 0
    return out


def test_train_prints_test_accuracy_and_saves_the_run(run_dir, capsys):
    results = json.loads((run_dir / "results.json").read_text())
    assert results["test_examples"] == 100
    assert 0.0 <= results["test_accuracy"] <= 1.0
    run = json.loads((run_dir / "run.json").read_text())
    assert run["model"]["d_model"] == 16 and run["data"]["max_length"] == 64


def test_evaluate_prints_the_same_accuracy(run_dir, capsys):
    results = json.loads((run_dir / "results.json").read_text())
    assert main(["evaluate", str(run_dir), "--limit", "100"]) == 0
    assert f"test accuracy: {results['test_accuracy']:.2%}" in capsys.readouterr().out


def test_predict_prints_one_line_per_text(run_dir, capsys):
    assert main(["predict", str(run_dir), "great film", "dull film"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert all(line.split("\t")[0] in ("positive", "negative") for line in lines)


def test_config_file_sets_what_options_do_not(tmp_path, imdb_dir, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  d_model: 8\n  n_heads: 2\n  n_layers: 1\n  d_ff: 16\n"
                      "train:\n  epochs: 1\n  batch_size: 64\n")
    out = tmp_path / "run"
    args = ["train", "imdb", "--config", str(config), "--data-dir", str(imdb_dir), "--out", str(out),
            "--limit", "100", "--test-limit", "50", "--max-length", "32", "--quiet"]
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert (run["model"]["d_model"], run["train"]["batch_size"]) == (8, 64)


def test_resume_finishes_an_interrupted_run_with_its_own_settings(tmp_path, imdb_dir):
    """Stopped after 3 steps (max_steps), then `--resume` with only --out: the same run as one that never stopped."""
    stop = tmp_path / "stop.yaml"
    stop.write_text("train:\n  max_steps: 3\n")
    common = ["train", "imdb", "--data-dir", str(imdb_dir), *TINY, "--epochs", "2"]
    assert main([*common, "--out", str(tmp_path / "straight")]) == 0
    assert main([*common, "--config", str(stop), "--out", str(tmp_path / "resumed")]) == 0
    interrupted = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert interrupted["steps"] == 3
    assert main(["train", "imdb", "--data-dir", str(imdb_dir), "--out", str(tmp_path / "resumed"), "--resume",
                 "--quiet"]) == 0
    straight, resumed = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("straight", "resumed"))
    assert resumed["steps"] == straight["steps"] > 3
    assert resumed["test_loss"] == straight["test_loss"]


@pytest.mark.parametrize("argv, expected", [
    (["train", "imdb", "--epochs", "many"], "invalid int value: 'many'"),
    (["train", "cifar"], "invalid choice: 'cifar'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_arguments_give_one_line(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1


def test_compress_then_evaluate_and_predict_the_compressed_run(run_dir, tmp_path, capsys):
    out = tmp_path / "nf4"
    assert main(["compress", str(run_dir), "--method", "nf4-dq", "--out", str(out), "--skip", "head"]) == 0
    printed = capsys.readouterr().out
    assert "x smaller than float32" in printed and str(out) in printed
    assert main(["evaluate", str(out), "--limit", "100"]) == 0
    assert "test accuracy:" in capsys.readouterr().out
    assert main(["predict", str(out), "great film"]) == 0
    assert capsys.readouterr().out.split("\t")[0] in ("positive", "negative")
    # an option the method does not take, and an existing output folder, are one-line errors
    assert main(["compress", str(run_dir), "--method", "nf4", "--amount", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "nf4 takes the options ['blocksize'], not ['amount']" in capsys.readouterr().err
    assert main(["compress", str(run_dir), "--method", "int8", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_bad_input_gives_one_line_not_a_traceback(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert "run.json" in err and len(err.splitlines()) == 1 and "Traceback" not in err

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"epochz": 2}}))
    assert main(["train", "imdb", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "epochz" in capsys.readouterr().err

    assert main(["train", "imdb", "--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert "missing" in capsys.readouterr().err


def test_every_command_has_help(capsys):
    parser = build_parser()
    for argv in (["--help"], ["train", "--help"], ["evaluate", "--help"], ["predict", "--help"],
                 ["finetune", "--help"], ["pretrain-mlm", "--help"], ["compress", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        assert exit_info.value.code == 0
    assert "--max-length" in capsys.readouterr().out


def test_pretrain_mlm_then_finetune_the_pretrained_folder_then_evaluate(tmp_path, imdb_dir, capsys):
    mlm, clf = tmp_path / "mlm", tmp_path / "clf"
    assert main(["pretrain-mlm", "imdb", "--data-dir", str(imdb_dir), "--out", str(mlm), "--limit", "100",
                 "--vocab-size", "800", "--max-length", "32", "--hidden-size", "32", "--layers", "1", "--heads", "2",
                 "--intermediate-size", "64", "--batch-size", "32", "--quiet"]) == 0
    assert "masked-token accuracy" in capsys.readouterr().out
    assert (mlm / "config.json").is_file() and (mlm / "model.safetensors").is_file()
    assert main(["finetune", "imdb", "--model", str(mlm), "--data-dir", str(imdb_dir), "--out", str(clf),
                 "--limit", "64", "--test-limit", "20", "--max-length", "32", "--epochs", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((clf / "results.json").read_text())
    assert f"test accuracy: {results['test_accuracy']:.2%} on 20 reviews" in printed
    assert main(["evaluate", str(clf), "--limit", "20"]) == 0
    assert f"test accuracy: {results['test_accuracy']:.2%}" in capsys.readouterr().out


def test_finetune_refuses_an_unknown_method_or_model_in_one_line(tmp_path, capsys):
    assert main(["finetune", "imdb", "--method", "magic", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown fine-tuning method 'magic'" in err and len(err.splitlines()) == 1
    assert main(["finetune", "imdb", "--model", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "r")]) == 2
    assert "not a model folder" in capsys.readouterr().err
