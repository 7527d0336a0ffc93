"""Masked-language-model pretraining on IMDB text: chunks, a learning run, a Hugging Face folder."""

import pytest
import torch
import transformers

from tunelab.core.data import load_imdb
from tunelab.tasks.imdb_mlm import MlmData, MlmRunConfig, bert_tokenizer, chunk_reviews, imdb_texts, run_imdb_mlm


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory, imdb_dir):
    out = tmp_path_factory.mktemp("mlm") / "run"
    config = MlmRunConfig.from_dict({
        "data": {"data_dir": str(imdb_dir), "limit": 300, "vocab_size": 1500, "max_length": 64},
        "model": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128},
        "train": {"epochs": 2, "batch_size": 32, "lr": 2e-3, "progress": False, "plot": False}})
    return out, run_imdb_mlm(config, out)


def test_a_short_run_learns_to_predict_masked_pieces(mlm_run):
    out, results = mlm_run
    history = [r for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert results["completed"] and results["steps"] > 50
    assert results["val_mlm_loss"] < 6.3  # ~6.0; a uniform guess over 1,500 pieces is ln(1500) = 7.3
    assert results["val_mlm_accuracy"] > 0.05  # ~0.09: at least the frequent pieces ("the", ".", ",")
    assert len(history) > 5


def test_the_run_folder_is_a_hugging_face_masked_lm_with_the_same_logits(mlm_run):
    out, _ = mlm_run
    from tunelab.core.hub import load_pretrained

    ours, tokenizer = load_pretrained(out, task="mlm")
    hf = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "This movie was [MASK], the acting was great."
    enc = hf_tokenizer([text], return_tensors="pt")
    assert enc["input_ids"][0].tolist() == tokenizer.encode(text)
    assert tokenizer.mask_id in enc["input_ids"][0].tolist()  # [MASK] is kept whole, not split
    with torch.no_grad():
        assert (ours(enc["input_ids"]) - hf(**enc).logits).abs().max().item() <= 1e-5
    # and it can be fine-tuned: the classification model loads it, the pooler and head start fresh
    clf, _ = load_pretrained(out, task="classification")
    assert torch.equal(clf.bert.layers[1].ff.linear2.weight, ours.bert.layers[1].ff.linear2.weight)


def test_the_run_registry_loads_an_mlm_run_and_refuses_to_score_it_as_a_classifier(mlm_run):
    from tunelab.core.hub import load_pretrained
    from tunelab.tasks.runs import load_run, predict

    out, _ = mlm_run
    run = load_run(out)
    assert type(run).__name__ == "MlmRun" and run.data.max_length == 64 and not run.model.training
    ours, _ = load_pretrained(out, task="mlm")
    ids = torch.tensor([run.tokenizer.encode("A fine film with a [MASK] ending.")])
    with torch.no_grad():
        assert torch.equal(run.model(ids), ours(ids))  # the best weights the run saved
    with pytest.raises(ValueError, match="imdb-mlm run, not a classifier"):
        predict(out, ["A fine film."])


def test_piece_frequencies_go_into_the_output_bias_not_into_the_word_vectors(mlm_run):
    # The run starts its output bias at the log piece frequencies. From a zero bias, which Adam moves by about lr
    # per step, a short run writes the frequencies into the tied embeddings instead: one direction shared by all
    # word vectors, which the encoder then reads as its input (and a classifier fine-tuned from it stayed at chance).
    out, _ = mlm_run
    from tunelab.core.hub import load_pretrained

    model, _ = load_pretrained(out, task="mlm")
    energy = torch.linalg.svdvals(model.decoder_weight.detach()) ** 2
    assert energy[0] / energy.sum() < 0.45  # 0.24; 0.66 when the bias starts at zero (0.02 at initialisation)
    assert model.decoder_bias.std() > 0.5  # 1.3: the log frequencies; 0.02 when it starts at zero


def test_chunks_cover_the_review_in_cls_sep_windows(imdb_dir):
    texts = list(load_imdb("train", imdb_dir, limit=50)["text"])
    tokenizer = bert_tokenizer(texts, vocab_size=800)
    pieces = tokenizer.encode(texts[0], add_special_tokens=False)
    # HF's WordPiece trainer may split a word differently between trainings (ties in its last merges), so the
    # window is chosen to leave a partial last chunk whatever the exact piece count is.
    max_length = 32 if len(pieces) % 30 else 33
    body = max_length - 2
    chunks = chunk_reviews(tokenizer, texts[:1], max_length=max_length, min_chunk=1)
    assert all(c["input_ids"][0] == tokenizer.cls_id and c["input_ids"][-1] == tokenizer.sep_id for c in chunks)
    assert [i for c in chunks for i in c["input_ids"][1:-1]] == pieces
    assert max(len(c["input_ids"]) for c in chunks) == max_length
    tail = len(pieces) % body
    assert 0 < tail and len(chunks) == len(pieces) // body + 1
    assert len(chunk_reviews(tokenizer, texts[:1], max_length=max_length, min_chunk=tail + 1)) == len(chunks) - 1
    with pytest.raises(ValueError, match="min_chunk=31 is longer than a chunk"):
        chunk_reviews(tokenizer, texts[:1], max_length=32, min_chunk=31)
    # a review shorter than min_chunk is still kept whole
    assert len(chunk_reviews(tokenizer, ["a short one"], max_length=32, min_chunk=16)) == 1


def test_pretraining_texts_never_include_the_test_split(imdb_dir):
    texts = imdb_texts(MlmData(data_dir=str(imdb_dir), limit=60_000))
    train, unsup = load_imdb("train", imdb_dir)["text"], load_imdb("unsupervised", imdb_dir)["text"]
    assert len(texts) == 60_000
    assert set(texts) <= set(train) | set(unsup)
    assert not set(texts) & (set(load_imdb("test", imdb_dir)["text"]) - set(train) - set(unsup))


def test_unknown_settings_are_refused():
    with pytest.raises(ValueError, match=r"unknown model settings \['hidden'\]"):
        MlmRunConfig.from_dict({"model": {"hidden": 3}})


def test_an_interrupted_run_resumes_with_its_own_tokenizer(tmp_path, imdb_dir):
    settings = {"data": {"data_dir": str(imdb_dir), "limit": 60, "vocab_size": 600, "max_length": 32},
                "model": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
                "train": {"epochs": 1, "batch_size": 16, "progress": False, "plot": False}}
    whole = run_imdb_mlm(MlmRunConfig.from_dict(settings), tmp_path / "whole")
    out = tmp_path / "split"
    first = {**settings, "train": {**settings["train"], "max_steps": 3}}
    run_imdb_mlm(MlmRunConfig.from_dict(first), out)
    vocab = (out / "tokenizer.json").read_text()
    resumed = {**settings, "train": {**settings["train"], "resume": True, "out_dir": str(out)}}
    again = run_imdb_mlm(MlmRunConfig.from_dict(resumed), out)
    assert (out / "tokenizer.json").read_text() == vocab  # not retrained
    assert again["steps"] == whole["steps"]
