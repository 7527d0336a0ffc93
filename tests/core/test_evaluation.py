"""Tests for tunelab/core/evaluation.py: the losses and evaluate()."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import assert_close
from tunelab.core import train
from tunelab.core.evaluation import causal_lm_loss, cross_entropy_loss, evaluate, to_device

LOGITS = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]]])  # (1, 3, 2): predicts 0, 1, 0
LABELS = torch.tensor([[0, 0, -100]])


class Fixed(nn.Module):
    """Returns LOGITS whatever the input (one parameter, so evaluate can find a device)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids):
        return LOGITS + self.bias


def fixed_batch(examples):
    return {"input_ids": None, "labels": LABELS.expand(len(examples), -1)}


def test_evaluate_counts_only_labelled_positions():
    model = Fixed().train()
    metrics = evaluate(model, [0], collate_fn=fixed_batch)
    assert metrics["n"] == 2 and metrics["accuracy"] == 0.5
    assert_close(torch.tensor(metrics["loss"]), F.cross_entropy(LOGITS[0, :2], LABELS[0, :2]))
    assert model.training  # the mode is restored


def test_evaluate_shifts_for_causal_lm():
    shifted = evaluate(Fixed(), [0], collate_fn=fixed_batch, loss_fn=causal_lm_loss)
    assert shifted["n"] == 1 and shifted["accuracy"] == 1.0  # position 0 predicts label 0 at position 1
    assert_close(torch.tensor(shifted["loss"]), F.cross_entropy(LOGITS[0, :1], LABELS[0, 1:2]))


def test_evaluate_averages_over_examples_not_batches():
    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(1, 2)

        def forward(self, x):
            return self.proj(x)  # (B, 2)

    def collate(examples):
        x = torch.tensor([[e["x"]] for e in examples])  # (B, 1)
        return {"x": x, "labels": torch.tensor([e["y"] for e in examples])}

    examples = [{"x": float(i), "y": i % 2} for i in range(5)]
    model = Linear()
    whole = evaluate(model, examples, collate_fn=collate, batch_size=5)
    split = evaluate(model, examples, collate_fn=collate, batch_size=2)  # batches of 2, 2 and 1
    batch = collate(examples)
    assert whole["n"] == split["n"] == 5 and split["accuracy"] == whole["accuracy"]
    assert_close(torch.tensor(split["loss"]), F.cross_entropy(model(batch["x"]), batch["labels"]))


def test_sort_by_length_gives_the_same_metrics_with_less_padding_longest_batch_first():
    class MeanPool(nn.Module):  # padding-invariant: the mean of the unpadded embeddings
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(20, 4), nn.Linear(4, 2)

        def forward(self, input_ids, attention_mask):
            mask = attention_mask.unsqueeze(-1).float()  # (B, T, 1)
            return self.head((self.embed(input_ids) * mask).sum(1) / mask.sum(1))  # (B, 2)

    padded, longests = [], []

    def collate(examples):
        longest = max(len(e["input_ids"]) for e in examples)
        padded.append(sum(longest - len(e["input_ids"]) for e in examples))
        longests.append(longest)
        ids = torch.tensor([e["input_ids"] + [0] * (longest - len(e["input_ids"])) for e in examples])
        return {"input_ids": ids, "attention_mask": (ids != 0).long(),
                "labels": torch.tensor([e["label"] for e in examples])}

    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 30, (40,), generator=generator).tolist()
    examples = [{"input_ids": torch.randint(1, 20, (n,), generator=generator).tolist(), "label": i % 2}
                for i, n in enumerate(lengths)]
    model = MeanPool()
    in_order = evaluate(model, examples, collate_fn=collate, batch_size=8)
    padding_in_order = sum(padded)
    padded.clear(), longests.clear()
    by_length = evaluate(model, examples, collate_fn=collate, batch_size=8, sort_by_length=True)
    assert longests == sorted(longests, reverse=True) and longests[0] == max(lengths)  # memory freed fits the next
    assert by_length["n"] == in_order["n"] == 40 and by_length["accuracy"] == in_order["accuracy"]
    assert abs(by_length["loss"] - in_order["loss"]) < 1e-6
    assert sum(padded) < padding_in_order / 4
    with pytest.raises(ValueError, match="sort_by_length needs examples that are dicts with an 'input_ids'"):
        evaluate(model, [0, 1], collate_fn=collate, sort_by_length=True)


def test_evaluate_under_bf16_autocast_scores_alike_and_sums_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    data = [{"x": torch.randn(8), "y": i % 3} for i in range(64)]

    def collate(examples):
        return {"input": torch.stack([e["x"] for e in examples]), "labels": torch.tensor([e["y"] for e in examples])}

    class Wrapped(nn.Module):  # evaluate calls model(**batch)
        def __init__(self):
            super().__init__()
            self.net, self.dtypes = model, set()

        def forward(self, input):
            logits = self.net(input)
            self.dtypes.add(logits.dtype)
            return logits

    wrapped = Wrapped()
    full = evaluate(wrapped, data, collate_fn=collate, batch_size=16)
    assert wrapped.dtypes == {torch.float32}
    wrapped.dtypes.clear()
    bf16 = evaluate(wrapped, data, collate_fn=collate, batch_size=16, mixed_precision="bf16")
    assert wrapped.dtypes == {torch.bfloat16} and bf16["n"] == full["n"] == 64
    assert abs(bf16["loss"] - full["loss"]) < 2e-2 and bf16["loss"] != full["loss"]
    assert evaluate(wrapped, data, collate_fn=collate, batch_size=16, device="auto") == full  # as TrainConfig reads it
    with pytest.raises(ValueError, match="mixed_precision"):
        evaluate(wrapped, data, collate_fn=collate, mixed_precision="fp8")


def test_losses_flatten_and_shift():
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    labels[0, 3] = -100
    keep = labels != -100
    assert_close(cross_entropy_loss(logits, labels), F.cross_entropy(logits[keep], labels[keep]))
    keep = labels[:, 1:] != -100
    assert_close(causal_lm_loss(logits, labels), F.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep]))


def test_clear_errors():
    with pytest.raises(ValueError, match="empty data"):
        evaluate(Fixed(), [], collate_fn=fixed_batch)
    with pytest.raises(ValueError, match="no labels other than -100"):
        evaluate(Fixed(), [0], collate_fn=lambda _: {"input_ids": None, "labels": torch.full((1, 3), -100)})
    with pytest.raises(ValueError, match=r"'labels' entry, got dict with keys \['input_ids'\]"):
        to_device({"input_ids": torch.zeros(1)}, torch.device("cpu"))


def test_train_module_re_exports_evaluation():
    assert train.evaluate is evaluate and train.causal_lm_loss is causal_lm_loss
