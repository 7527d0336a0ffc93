"""Causal-LM pretraining on IMDB text: packed blocks, a learning run, samples, exact resume, a Hugging Face folder."""

import json

import pytest
import torch
import transformers

from tunelab.core.io import read_safetensors
from tunelab.tasks.imdb_lm import LmRunConfig, PROMPTS, pack, run_imdb_lm

SETTINGS = {"data": {"limit": 200, "vocab_size": 400, "block_size": 64, "sample_tokens": 6},
            "model": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                      "intermediate_size": 128},
            "train": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "eval_every_steps": 20, "save_every_steps": 10,
                      "progress": False, "plot": False, "mixed_precision": "no"}}


def config(imdb_dir, **train):
    values = json.loads(json.dumps(SETTINGS))
    values["data"]["data_dir"] = str(imdb_dir)
    values["train"].update(train)
    return LmRunConfig.from_dict(values)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, imdb_dir):
    out = tmp_path_factory.mktemp("lm") / "run"
    return out, run_imdb_lm(config(imdb_dir), out)


def test_a_short_run_learns_reviews_far_better_than_chance(lm_run):
    out, results = lm_run
    assert results["completed"] and results["steps"] >= 40
    assert results["val_perplexity"] < 120  # a uniform guess over 400 tokens is 400; bytes+merges of English ~100
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val_loss"] for r in history if "val_loss" in r]
    assert len(losses) >= 2 and losses[-1] < losses[0]


def test_samples_are_written_at_every_evaluation(lm_run):
    out, results = lm_run
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)) and steps[0] == 20 and steps[-1] == results["steps"]
    assert all(len(r["samples"]) == len(PROMPTS) and r["samples"][0].startswith(PROMPTS[0]) for r in records)


def test_the_run_folder_is_a_hugging_face_llama_with_the_same_logits(lm_run):
    from tunelab.tasks.runs import load_run

    out, _ = lm_run
    run = load_run(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "This movie was a delight."
    ids = hf_tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == run.tokenizer.encode(text)
    with torch.no_grad():
        assert (run.model(ids) - hf(ids).logits).abs().max() <= 1e-5
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.num_key_value_heads == 2


def test_an_interrupted_run_resumes_to_the_same_weights(lm_run, tmp_path, imdb_dir):
    out, _ = lm_run
    run_imdb_lm(config(imdb_dir, max_steps=15), tmp_path)
    if (tmp_path / "tokenizer.json").read_text() != (out / "tokenizer.json").read_text():
        pytest.fail("the tokenizer trainer is not deterministic: the runs are not comparable")
    run_imdb_lm(config(imdb_dir, resume=True, out_dir=str(tmp_path)), tmp_path)
    a, b = read_safetensors(out / "model.safetensors"), read_safetensors(tmp_path / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert resumed[0]["step"] == 15  # where the first invocation stopped, then the same samples as without a stop
    assert resumed[1:] == [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_packing_joins_reviews_with_eos_and_cuts_full_blocks(lm_run):
    from tunelab.core.hub import CausalTokenizer

    out, _ = lm_run
    tokenizer = CausalTokenizer.from_folder(out)
    texts = ["A good film.", "Bad.", "It was long and slow and dull."]
    blocks = pack(tokenizer, texts, 4)
    stream = [i for t in texts for i in [*tokenizer.encode(t), tokenizer.eos_id]]
    assert [i for b in blocks for i in b["input_ids"]] == stream[: len(stream) // 4 * 4]
    assert all(len(b["input_ids"]) == 4 for b in blocks)
    with pytest.raises(ValueError, match="not one block"):
        pack(tokenizer, ["Hi"], 64)
