"""Tests for tunelab.core.collate: truncation, the two collators and LengthBucketSampler."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tunelab.core.collate import (
    ClassificationCollator,
    LanguageModelingCollator,
    LengthBucketSampler,
    pad_sequences,
    truncate,
)
from tunelab.core.text import build_vocab


def test_truncate_sides():
    ids = list(range(10))
    assert truncate(ids, 4, "head") == [0, 1, 2, 3]
    assert truncate(ids, 4, "tail") == [6, 7, 8, 9]
    assert truncate(ids, 8, "head+tail") == [0, 1, 4, 5, 6, 7, 8, 9]  # 8 // 4 = 2 head tokens
    assert truncate(ids, 1, "head+tail") == [9]
    assert truncate(ids, 10, "tail") == ids and truncate(ids, 50) == ids


def test_truncate_head_plus_tail_as_in_sun_et_al():
    ids = list(range(1000))
    kept = truncate(ids, 510, "head+tail")
    assert kept == list(range(127)) + list(range(1000 - 383, 1000))


def test_truncate_errors():
    with pytest.raises(ValueError, match="'middle'"):
        truncate([1, 2], 1, "middle")
    with pytest.raises(ValueError, match="max_length"):
        truncate([1, 2], 0)


def test_pads_to_longest_in_batch_with_mask_and_labels():
    collate = ClassificationCollator(max_length=256, pad_id=0)
    batch = collate([
        {"input_ids": [5, 6, 7], "label": 1},
        {"input_ids": torch.tensor([8]), "label": 0},
    ])
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))  # T=3, not 256
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([1, 0]))
    assert all(t.dtype == torch.long for t in batch.values())


def test_pad_id_is_respected():
    input_ids, attention_mask = pad_sequences([[3], [4, 5]], pad_id=9)
    assert torch.equal(input_ids, torch.tensor([[3, 9], [4, 5]]))
    assert torch.equal(attention_mask, torch.tensor([[1, 0], [1, 1]]))


def test_pad_to_multiple_of_rounds_the_batch_length_up_but_never_past_max_length():
    input_ids, attention_mask = pad_sequences([[3, 4, 5], [6]], pad_id=9, multiple_of=4)
    assert torch.equal(input_ids, torch.tensor([[3, 4, 5, 9], [6, 9, 9, 9]]))
    assert torch.equal(attention_mask, torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]))
    assert pad_sequences([[3, 4, 5], [6]], multiple_of=4, max_length=3)[0].shape == (2, 3)
    assert pad_sequences([[3, 4, 5], [6]], multiple_of=4, max_length=2)[0].shape == (2, 3)  # padded, never cut
    collate = ClassificationCollator(max_length=10, pad_to_multiple_of=8)
    assert collate([{"input_ids": [1, 2, 3]}])["input_ids"].shape == (1, 8)
    assert collate([{"input_ids": list(range(9))}])["input_ids"].shape == (1, 10)  # 16 would pass max_length
    with pytest.raises(ValueError, match="pad_to_multiple_of must be at least 1, got 0"):
        ClassificationCollator(pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="multiple_of must be at least 1"):
        pad_sequences([[1]], multiple_of=0)


def test_text_examples_are_encoded():
    vocab = build_vocab(["a great film", "a bad film"])
    collate = ClassificationCollator(vocab.encode, max_length=8)
    batch = collate([{"text": "A great, great film!", "label": 1}, {"text": "bad", "label": 0}])
    # itos: <pad>, <unk>, a, film, great, bad; "," and "!" are unknown (1).
    assert batch["input_ids"][0].tolist() == [2, 4, 1, 4, 3, 1]
    assert batch["input_ids"][1].tolist() == [5, 0, 0, 0, 0, 0]
    assert batch["attention_mask"].sum(dim=1).tolist() == [6, 1]


def test_truncation_with_bos_and_eos_stays_within_budget():
    example = {"input_ids": list(range(10, 20)), "label": 0}
    head = ClassificationCollator(max_length=5, bos_id=2, eos_id=3)([example])
    assert head["input_ids"].tolist() == [[2, 10, 11, 12, 3]]
    tail = ClassificationCollator(max_length=5, truncation="tail", bos_id=2, eos_id=3)([example])
    assert tail["input_ids"].tolist() == [[2, 17, 18, 19, 3]]
    both = ClassificationCollator(max_length=10, truncation="head+tail", bos_id=2, eos_id=3)
    assert both([example])["input_ids"].tolist() == [[2, 10, 11, 14, 15, 16, 17, 18, 19, 3]]
    short = ClassificationCollator(max_length=10, bos_id=2)([{"input_ids": [7], "label": 0}])
    assert short["input_ids"].tolist() == [[2, 7]]


def test_unlabelled_batches_have_no_labels():
    batch = ClassificationCollator()([{"input_ids": [1, 2]}, {"input_ids": [3]}])
    assert "labels" not in batch and batch["input_ids"].shape == (2, 2)
    with pytest.raises(ValueError, match="example 1 has no 'label'"):
        ClassificationCollator()([{"input_ids": [1], "label": 0}, {"input_ids": [3]}])


def test_collator_errors_name_the_example():
    collate = ClassificationCollator(max_length=4)
    with pytest.raises(ValueError, match="example 1 has no tokens"):
        collate([{"input_ids": [1], "label": 0}, {"input_ids": [], "label": 1}])
    with pytest.raises(ValueError, match="example 0 has 'text'.*no encode"):
        collate([{"text": "hello", "label": 0}])
    with pytest.raises(ValueError, match="example 0 has neither"):
        collate([{"tokens": [1], "label": 0}])
    with pytest.raises(ValueError, match="empty list"):
        collate([])
    with pytest.raises(ValueError, match="max_length=2"):
        ClassificationCollator(max_length=2, bos_id=1, eos_id=2)
    with pytest.raises(ValueError, match="'middle'"):
        ClassificationCollator(truncation="middle")


def test_language_modeling_labels_ignore_padding():
    collate = LanguageModelingCollator(pad_id=5, max_length=4)
    # pad_id 5 is also a real token here (as GPT-2's end-of-text is): the mask decides.
    batch = collate([{"input_ids": [1, 5, 2, 3, 4]}, {"input_ids": [6, 7]}])
    assert batch["input_ids"].tolist() == [[1, 5, 2, 3], [6, 7, 5, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[1, 5, 2, 3], [6, 7, -100, -100]]
    with pytest.raises(ValueError, match="example 0 has no tokens"):
        collate([{"input_ids": []}])


def _review_like_lengths(n=2000):
    """Lengths spread like IMDB review lengths in tokens (long right tail)."""
    return np.random.default_rng(0).lognormal(mean=5.3, sigma=0.7, size=n).astype(int) + 1


def _padding(batches, lengths):
    """Padding tokens spent when each batch is padded to its longest sequence."""
    return sum(len(b) * lengths[b].max() - lengths[b].sum() for b in map(np.asarray, batches))


def test_bucket_sampler_covers_every_index_once():
    lengths = _review_like_lengths()
    sampler = LengthBucketSampler(lengths, batch_size=32)
    batches = list(sampler)
    assert len(sampler) == len(batches) == 63  # ceil(2000 / 32)
    assert sorted(i for batch in batches for i in batch) == list(range(2000))
    assert sum(len(batch) < 32 for batch in batches) == 1  # only one short batch

    dropped = LengthBucketSampler(lengths, batch_size=32, drop_last=True)
    assert len(dropped) == len(list(dropped)) == 62
    assert all(len(batch) == 32 for batch in dropped)


def test_bucket_sampler_wastes_far_less_padding_than_random_batches():
    lengths = _review_like_lengths()
    bucketed = list(LengthBucketSampler(lengths, batch_size=32))
    shuffled = np.random.default_rng(0).permutation(len(lengths))
    random_batches = [shuffled[i : i + 32] for i in range(0, len(lengths), 32)]
    assert _padding(bucketed, lengths) < 0.1 * _padding(random_batches, lengths)


def test_bucket_sampler_is_a_pure_function_of_seed_and_epoch():
    lengths = _review_like_lengths(500)
    sampler = LengthBucketSampler(lengths, batch_size=16, bucket_size=64, seed=7)
    epoch0 = list(sampler)
    assert list(LengthBucketSampler(lengths, batch_size=16, bucket_size=64, seed=7)) == epoch0
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0
    sampler.set_epoch(0)
    assert list(sampler) == epoch0
    assert list(LengthBucketSampler(lengths, batch_size=16, bucket_size=64, seed=8)) != epoch0


def test_bucket_sampler_without_shuffle_is_sorted_within_buckets():
    lengths = [5, 1, 4, 2, 3, 9, 8, 7]
    sampler = LengthBucketSampler(lengths, batch_size=2, shuffle=False, bucket_size=4)
    # Bucket 0 holds indices 0-3 (lengths 5, 1, 4, 2), bucket 1 indices 4-7 (3, 9, 8, 7).
    assert list(sampler) == [[1, 3], [2, 0], [4, 7], [6, 5]]
    sampler.set_epoch(3)
    assert list(sampler) == [[1, 3], [2, 0], [4, 7], [6, 5]]


def test_bucket_sampler_feeds_a_data_loader():
    lengths = _review_like_lengths(64)
    examples = [{"input_ids": list(range(1, n + 1)), "label": n % 2} for n in lengths]
    sampler = LengthBucketSampler(lengths, batch_size=8)
    collate = ClassificationCollator(max_length=10_000)
    loader = DataLoader(examples, batch_sampler=sampler, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == 8
    assert sum(batch["attention_mask"].sum().item() for batch in batches) == lengths.sum()


def test_bucket_sampler_errors():
    with pytest.raises(ValueError, match="empty"):
        LengthBucketSampler([], batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        LengthBucketSampler([3, 4], batch_size=0)


def test_masked_lm_collator_chooses_15_percent_and_applies_80_10_10():
    from tunelab.core.collate import MaskedLMCollator

    collate = MaskedLMCollator(mask_id=4, vocab_size=1000, special_ids=(1, 2), pad_id=0, max_length=600, seed=0)
    examples = [{"input_ids": [1, *range(10, 510), 2]} for _ in range(40)] + [{"input_ids": [1, 7, 2]}]
    batch = collate(examples)
    original, _ = pad_sequences([e["input_ids"] for e in examples], 0)
    chosen = batch["labels"] != -100
    assert torch.equal(batch["labels"][chosen], original[chosen])
    real = batch["attention_mask"].bool() & ~torch.isin(original, torch.tensor([1, 2]))
    assert not (chosen & ~real).any()  # never a special token or padding
    rate = chosen[:40].float().mean().item() * 512 / 500
    assert abs(rate - 0.15) < 0.01
    masked = (batch["input_ids"] == 4) & chosen
    kept = (batch["input_ids"] == original) & chosen
    n = chosen.sum().item()
    assert abs(masked.sum().item() / n - 0.8) < 0.02 and abs(kept.sum().item() / n - 0.1) < 0.02
    assert torch.equal(batch["input_ids"][~chosen], original[~chosen])  # the rest is untouched
    assert chosen[40].sum() == 1  # the short review still got one token to predict
    assert torch.equal(collate(examples)["input_ids"], batch["input_ids"])  # seeded: same masks each call


def test_masked_lm_collator_refuses_a_row_with_nothing_to_mask():
    from tunelab.core.collate import MaskedLMCollator

    with pytest.raises(ValueError, match="example 1 has no token that may be masked"):
        collate = MaskedLMCollator(mask_id=4, vocab_size=10, special_ids=(1, 2))
        collate([{"input_ids": [1, 5, 2]}, {"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match="mlm_probability"):
        MaskedLMCollator(mask_id=4, vocab_size=10, mlm_probability=0.0)


def test_left_padding_puts_every_sequence_at_the_end():
    from tunelab.core.collate import pad_sequences

    ids, mask = pad_sequences([[5, 6, 7], [8]], pad_id=1, side="left")
    assert ids.tolist() == [[5, 6, 7], [1, 1, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="padding side 'middle'"):
        pad_sequences([[1]], side="middle")
