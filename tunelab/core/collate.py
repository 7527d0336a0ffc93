"""Turning examples into padded batches: truncation, dynamic padding, attention masks, bucketing.

Padding only to the longest sequence of each batch ("dynamic padding") and batching reviews of
similar length together (length bucketing) spare most of the compute a fixed-length batch
spends on padding tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

TRUNCATION_SIDES = ("head", "tail", "head+tail")
IGNORE_INDEX = -100  # the default ignore_index of torch.nn.functional.cross_entropy


def truncate(ids: Sequence[int], max_length: int, side: str = "head") -> list[int]:
    """Cut `ids` to at most `max_length` tokens, keeping the head, the tail, or both.

    "head+tail" keeps the first max_length // 4 tokens and the last ones: Sun et al. 2019, "How
    to Fine-Tune BERT for Text Classification" (https://arxiv.org/abs/1905.05583) found that
    keeping 128 head + 382 tail tokens of long IMDB reviews beats head-only or tail-only.
    """
    if side not in TRUNCATION_SIDES:
        raise ValueError(f"unknown truncation side {side!r}; expected one of {TRUNCATION_SIDES}")
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    ids = list(ids)
    if len(ids) <= max_length:
        return ids
    if side == "head":
        return ids[:max_length]
    if side == "tail":
        return ids[len(ids) - max_length :]
    head = max_length // 4
    return ids[:head] + ids[len(ids) - (max_length - head) :]


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_id: int = 0, multiple_of: int = 1, max_length: int | None = None,
    side: str = "right",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists to the longest one, rounded up to a multiple of `multiple_of` but not past
    `max_length` (a longer sequence is padded to its own length, never cut). `side="left"` puts the
    padding in front: the prompts of a batched generation then all end in the last column.

    Returns:
        input_ids (B, T) long and attention_mask (B, T) long, 1 on real tokens, 0 on padding.
    """
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be at least 1, got {multiple_of}")
    if side not in ("right", "left"):
        raise ValueError(f"unknown padding side {side!r}; expected 'right' or 'left'")
    longest = max(len(ids) for ids in sequences)
    rounded = -(-longest // multiple_of) * multiple_of
    longest = rounded if max_length is None else max(longest, min(rounded, max_length))
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)  # (B, T)
    for row, ids in enumerate(sequences):
        span = slice(0, len(ids)) if side == "right" else slice(longest - len(ids), longest)
        input_ids[row, span] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


def _token_ids(example: dict, index: int, encode: Callable[[str], list[int]] | None) -> list[int]:
    """The token ids of one example: its `input_ids` as given, else its encoded `text`."""
    if "input_ids" in example:
        ids = [int(i) for i in example["input_ids"]]
    elif "text" in example:
        if encode is None:
            raise ValueError(f"example {index} has 'text' but the collator was given no encode")
        ids = list(encode(example["text"]))
    else:
        raise ValueError(f"example {index} has neither 'input_ids' nor 'text': {sorted(example)}")
    if not ids:
        raise ValueError(f"example {index} has no tokens")
    return ids


class ClassificationCollator:
    """Batch examples for sequence classification: truncate, add bos/eos, pad to the longest.

    Args:
        encode: text -> token ids, used for examples that hold `text` instead of `input_ids`.
        max_length: the most tokens per sequence, bos and eos included.
        pad_id: id written into padding positions.
        truncation: "head", "tail" or "head+tail" (see `truncate`).
        bos_id: id put first, e.g. [CLS]; None adds nothing.
        eos_id: id put last, e.g. [SEP]; None adds nothing.
        pad_to_multiple_of: round each batch's length up to a multiple of this (never past `max_length`).
            Fewer distinct shapes: on the CPU, oneDNN compiles and caches kernels per shape (up to 1,024 of
            them), so a few hundred batch lengths grow the process by gigabytes over a run.
    """

    def __init__(
        self,
        encode: Callable[[str], list[int]] | None = None,
        max_length: int = 256,
        pad_id: int = 0,
        truncation: str = "head",
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_to_multiple_of: int = 1,
    ):
        if truncation not in TRUNCATION_SIDES:
            raise ValueError(f"unknown truncation {truncation!r}; expected {TRUNCATION_SIDES}")
        n_specials = (bos_id is not None) + (eos_id is not None)
        if max_length <= n_specials:
            raise ValueError(f"max_length={max_length} leaves no room for text beside bos/eos")
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be at least 1, got {pad_to_multiple_of}")
        self.encode, self.max_length, self.pad_id = encode, max_length, pad_id
        self.truncation, self.bos_id, self.eos_id = truncation, bos_id, eos_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self._budget = max_length - n_specials  # text tokens that fit beside bos/eos

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Return `input_ids` (B, T), `attention_mask` (B, T) and, given `label`s, `labels` (B,)."""
        if len(examples) == 0:
            raise ValueError("cannot collate an empty list of examples")
        sequences = []
        for index, example in enumerate(examples):
            ids = truncate(_token_ids(example, index, self.encode), self._budget, self.truncation)
            bos = [] if self.bos_id is None else [self.bos_id]
            eos = [] if self.eos_id is None else [self.eos_id]
            sequences.append(bos + ids + eos)
        input_ids, attention_mask = pad_sequences(sequences, self.pad_id, self.pad_to_multiple_of,
                                                  self.max_length)  # (B, T), (B, T)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}

        has_label = ["label" in example for example in examples]
        if all(has_label):
            batch["labels"] = torch.tensor([int(ex["label"]) for ex in examples])  # (B,)
        elif any(has_label):
            raise ValueError(f"example {has_label.index(False)} has no 'label' but others do")
        return batch


class LanguageModelingCollator:
    """Batch token sequences for next-token prediction: labels are the inputs, padding ignored.

    Labels are not shifted here; the model or loss compares logits at t with labels at t + 1.
    Padding is found from the attention mask rather than from `pad_id`, so `pad_id` may equal a
    real token id (GPT-2 pads with its end-of-text token).

    Args:
        pad_id: id written into padding positions.
        max_length: the most tokens per sequence; longer ones keep their head.
    """

    def __init__(self, pad_id: int = 0, max_length: int = 256):
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        self.pad_id, self.max_length = pad_id, max_length

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Return `input_ids`, `attention_mask` and `labels`, each (B, T); labels -100 on pads."""
        if len(examples) == 0:
            raise ValueError("cannot collate an empty list of examples")
        sequences = [
            truncate(_token_ids(example, index, None), self.max_length)
            for index, example in enumerate(examples)
        ]
        input_ids, attention_mask = pad_sequences(sequences, self.pad_id)  # (B, T), (B, T)
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)  # (B, T)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class LengthBucketSampler(Sampler[list[int]]):
    """Yield batches of indices whose sequences have similar lengths, in a random order.

    Shuffle all indices, cut them into buckets of `bucket_size`, sort each bucket by length, cut
    it into batches and shuffle the batches: batches are nearly length-homogeneous (little
    padding) yet vary from epoch to epoch. The order is a pure function of (seed, epoch), so a
    resumed run sees the same batches. Use it as a DataLoader's `batch_sampler`.

    Args:
        lengths: the length of every example, e.g. its number of tokens.
        batch_size: examples per batch; only the last batch of an epoch may be smaller.
        shuffle: False keeps the indices in order (buckets still sorted), for evaluation.
        seed: seed of the random order.
        bucket_size: examples sorted together, rounded up to a multiple of `batch_size`;
            defaults to 50 batches.
        drop_last: drop the smaller last batch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        bucket_size: int | None = None,
        drop_last: bool = False,
    ):
        super().__init__()
        if len(lengths) == 0:
            raise ValueError("lengths is empty: there is nothing to sample")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        bucket_size = batch_size * 50 if bucket_size is None else bucket_size
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be at least 1, got {bucket_size}")
        self.lengths = np.asarray(lengths)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed = seed
        # A whole number of batches per bucket keeps every batch full except the epoch's last.
        self.bucket_size = math.ceil(bucket_size / batch_size) * batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order `__iter__` yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.lengths)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        batches = []
        for start in range(0, n, self.bucket_size):
            bucket = order[start : start + self.bucket_size]
            bucket = bucket[np.argsort(self.lengths[bucket], kind="stable")]
            for i in range(0, len(bucket), self.batch_size):
                batches.append(bucket[i : i + self.batch_size])
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        for batch in batches:
            yield batch.tolist()


class MaskedLMCollator:
    """Batch token sequences for masked language modelling (BERT's pre-training, Devlin et al. 2019, 3.1).

    Of the real, non-special tokens, `mlm_probability` (15%) are chosen; the model must predict them.
    Of the chosen, 80% are replaced by [MASK], 10% by a random token and 10% left as they are, so the
    model cannot learn that only [MASK] positions matter. Labels hold the original id at chosen
    positions and -100 elsewhere. Every sequence gets at least one chosen token, so no batch has a loss
    over zero labels.

    Args:
        mask_id: id of [MASK]. vocab_size: random replacements are drawn from [0, vocab_size).
        special_ids: ids never chosen ([CLS], [SEP], [PAD], ...).
        pad_id: id written into padding positions. max_length: longer sequences keep their head.
        mlm_probability: share of tokens chosen.
        seed: None draws from torch's global generator (training: new masks every epoch); an int
            makes every call draw from a generator seeded with it (validation: the same masks each time).
    """

    def __init__(self, mask_id: int, vocab_size: int, special_ids: Sequence[int] = (), pad_id: int = 0,
                 max_length: int = 128, mlm_probability: float = 0.15, seed: int | None = None):
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        if not 0 <= mask_id < vocab_size:
            raise ValueError(f"mask_id {mask_id} is not a token id of vocab_size {vocab_size}")
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        self.mask_id, self.vocab_size, self.pad_id, self.max_length = mask_id, vocab_size, pad_id, max_length
        self.special_ids = torch.tensor(sorted({*special_ids, pad_id, mask_id}), dtype=torch.long)
        self.mlm_probability, self.seed = mlm_probability, seed

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Return `input_ids` (masked), `attention_mask` and `labels`, each (B, T)."""
        if len(examples) == 0:
            raise ValueError("cannot collate an empty list of examples")
        sequences = [truncate(_token_ids(example, index, None), self.max_length)
                     for index, example in enumerate(examples)]
        input_ids, attention_mask = pad_sequences(sequences, self.pad_id)  # (B, T), (B, T)
        generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)
        candidates = (attention_mask == 1) & ~torch.isin(input_ids, self.special_ids)  # (B, T)
        if not candidates.any(dim=1).all():
            row = int((~candidates.any(dim=1)).nonzero()[0])
            raise ValueError(f"example {row} has no token that may be masked (only special tokens)")
        draw = torch.rand(input_ids.shape, generator=generator)  # (B, T)
        chosen = candidates & (draw < self.mlm_probability)
        # A row that drew nothing gets its candidate with the smallest draw.
        fallback = draw.masked_fill(~candidates, 2.0).argmin(dim=1)  # (B,)
        empty = ~chosen.any(dim=1)
        chosen[empty, fallback[empty]] = True
        labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)  # (B, T)

        how = torch.rand(input_ids.shape, generator=generator)  # (B, T): 80% mask, 10% random, 10% keep
        masked = input_ids.masked_fill(chosen & (how < 0.8), self.mask_id)
        random_tokens = torch.randint(self.vocab_size, input_ids.shape, generator=generator)
        replace = chosen & (how >= 0.8) & (how < 0.9)
        masked = torch.where(replace, random_tokens, masked)  # (B, T)
        return {"input_ids": masked, "attention_mask": attention_mask, "labels": labels}
