"""generate() against transformers' model.generate on the same random weights, and the sampling filters."""

import pytest
import torch

from tests.core.decoder_pairs import gpt_pair, llama_pair, padded
from tunelab.core.generate import generate, top_k_filter, top_p_filter


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_greedy_equals_hugging_face_token_for_token(family, use_cache):
    hf, ours = (gpt_pair if family == "gpt" else llama_pair)(seed=3)
    ids = torch.randint(3, ours.config.vocab_size, (1, 5))
    expected = hf.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = generate(ours, ids, 24, eos_token_id=[], use_cache=use_cache)
    assert out.shape == (1, 29)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_batched_left_padded_greedy_equals_hugging_face_and_each_row_alone(family):
    hf, ours = (gpt_pair if family == "gpt" else llama_pair)(seed=4)
    ids, mask = padded([6, 2, 4], ours.config.vocab_size, left=True, seed=1)
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    out = generate(ours, ids, 20, attention_mask=mask, eos_token_id=[])
    assert torch.equal(out, expected)
    for row, n in enumerate([6, 2, 4]):
        alone = generate(ours, ids[row:row + 1, -n:], 20, eos_token_id=[])
        assert torch.equal(alone[0, -20:], out[row, -20:])


def test_repetition_penalty_equals_hugging_face():
    hf, ours = llama_pair(seed=5)
    ids = torch.randint(3, 97, (2, 4))
    expected = hf.generate(ids, max_new_tokens=20, do_sample=False, repetition_penalty=1.8, eos_token_id=None,
                           pad_token_id=0)
    assert torch.equal(generate(ours, ids, 20, repetition_penalty=1.8, eos_token_id=[]), expected)


def test_a_stop_token_ends_its_row_only():
    _, ours = gpt_pair(seed=6)
    ids = torch.randint(3, 97, (2, 4))
    free = generate(ours, ids, 12, eos_token_id=[])
    stop = int(free[0, 4 + 3])  # row 0's 4th new token becomes the stop token
    out = generate(ours, ids, 12, eos_token_id=stop, pad_token_id=1)
    first = int((free[0, 4:] == stop).nonzero()[0])  # where row 0 first emits it
    assert torch.equal(out[0, :4 + first + 1], free[0, :4 + first + 1])
    assert (out[0, 4 + first + 1:] == 1).all()  # then padding
    row1_stops = (free[1, 4:] == stop).nonzero()
    if len(row1_stops) == 0:  # row 1 never emits it: it runs the whole way, as before
        assert torch.equal(out[1], free[1])
    assert out.shape[1] <= free.shape[1]


def test_generation_stops_when_every_row_has_finished():
    _, ours = gpt_pair(seed=6)
    ids = torch.randint(3, 97, (1, 4))
    free = generate(ours, ids, 10, eos_token_id=[])
    out = generate(ours, ids, 10, eos_token_id=int(free[0, 5]))
    assert out.shape[1] <= 6 + 1 and torch.equal(out, free[:, :out.shape[1]])


def test_sampling_is_reproducible_under_a_seed_and_varies_without():
    _, ours = llama_pair(seed=7)
    ids = torch.randint(3, 97, (3, 4))
    draw = lambda seed: generate(ours, ids, 15, do_sample=True, temperature=1.5, eos_token_id=[],
                                 generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))


def test_top_k_and_top_p_never_emit_a_filtered_token():
    _, ours = gpt_pair(seed=8)
    ids = torch.randint(3, 97, (64, 3))
    with torch.no_grad():
        logits = ours(ids)[:, -1]  # (64, V): the first step's distribution
    for kwargs, keep in (({"top_k": 5}, top_k_filter(logits, 5)), ({"top_p": 0.5}, top_p_filter(logits, 0.5))):
        allowed = torch.isfinite(keep)
        assert (allowed.sum(-1) < 97).all()  # the filter removed something
        for seed in range(5):
            out = generate(ours, ids, 1, do_sample=True, eos_token_id=[], generator=torch.Generator().manual_seed(seed),
                           **kwargs)
            assert allowed.gather(1, out[:, -1:]).all(), kwargs


def test_filters_match_hugging_face_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 50) * 3
    ids = torch.zeros(4, 1, dtype=torch.long)
    assert torch.equal(torch.isfinite(top_k_filter(logits, 7)), torch.isfinite(TopKLogitsWarper(7)(ids, logits)))
    for p in (0.1, 0.5, 0.9):
        assert torch.equal(torch.isfinite(top_p_filter(logits, p)), torch.isfinite(TopPLogitsWarper(p)(ids, logits)))


def test_streamer_sees_every_new_token():
    _, ours = gpt_pair(seed=9)
    ids = torch.randint(3, 97, (2, 3))
    seen = []
    out = generate(ours, ids, 6, eos_token_id=[], streamer=lambda t: seen.append(t.clone()))
    assert torch.equal(torch.stack(seen, 1), out[:, 3:])


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.0), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
])
def test_bad_arguments_are_refused(kwargs, message):
    _, ours = gpt_pair()
    with pytest.raises(ValueError, match=message):
        generate(ours, torch.ones(1, 2, dtype=torch.long), **{"max_new_tokens": 3, **kwargs})


def test_right_padded_prompts_are_refused():
    _, ours = gpt_pair()
    ids, mask = padded([3, 2], 97)
    with pytest.raises(ValueError, match="padded on the left"):
        generate(ours, ids, 3, attention_mask=mask)


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory, imdb_dir):
    """A tiny random Llama with a byte-level BPE tokenizer trained on a few reviews, saved as a model folder."""
    import pyarrow.parquet as pq

    from tunelab.core.hub import CausalTokenizer, save_pretrained
    from tunelab.core.text import train_tokenizer

    texts = pq.read_table(imdb_dir / "train.parquet", columns=["text"]).column("text").to_pylist()[::200]
    tokenizer = CausalTokenizer(train_tokenizer(texts, kind="byte_bpe", vocab_size=300), "<|endoftext|>", "<|pad|>")
    _, model = llama_pair(seed=11, vocab_size=tokenizer.vocab_size, eos_token_id=0, bos_token_id=0)
    folder = tmp_path_factory.mktemp("lm")
    save_pretrained(model, folder, tokenizer)
    return folder


def test_generate_text_batches_left_padded_prompts_like_each_alone(lm_folder):
    from tunelab.core.generate import generate_text
    from tunelab.core.hub import load_pretrained

    model, tokenizer = load_pretrained(lm_folder)
    prompts = ["This movie was", "I"]
    together = generate_text(model, tokenizer, prompts, 12, eos_token_id=[])
    alone = [generate_text(model, tokenizer, p, 12, eos_token_id=[])[0] for p in prompts]
    assert together == alone and all(len(t) > 0 for t in together)
    pieces = []
    streamed = generate_text(model, tokenizer, prompts[0], 12, on_text=pieces.append, eos_token_id=[])
    assert "".join(pieces) == streamed[0]


def test_cli_generate_streams_the_continuation(lm_folder, capsys):
    from tunelab import cli

    assert cli.main(["generate", str(lm_folder), "The film", "--max-new-tokens", "8", "--greedy"]) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("The film") and len(greedy.strip()) > len("The film")
    assert cli.main(["generate", str(lm_folder), "The film", "--max-new-tokens", "8", "--greedy"]) == 0
    assert capsys.readouterr().out == greedy  # greedy is deterministic
    assert cli.main(["generate", str(lm_folder), "A", "B", "--max-new-tokens", "5", "--seed", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 2 and lines[0].startswith("A")


def test_cli_generate_refuses_an_encoder_folder(tmp_path, capsys):
    from tests.core.bert_pairs import hf_and_ours
    from tunelab import cli
    from tunelab.core.bert import BertModel
    from tunelab.core.hub import save_pretrained

    _, ours = hf_and_ours(BertModel)
    save_pretrained(ours, tmp_path / "bert")
    assert cli.main(["generate", str(tmp_path / "bert"), "hi"]) == 2
    assert "error" in capsys.readouterr().err
