"""Tests for tunelab/core/train.py on a synthetic task: the label says whether token 7 occurs."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from tunelab.core.checkpoint import CheckpointError, load_model_weights
from tunelab.core.plots import read_metrics
from tunelab.core.train import TrainConfig, epoch_batches, evaluate, make_optimizer, train_model

VOCAB_SIZE, TARGET = 20, 7


def make_examples(n: int, seed: int) -> list[dict]:
    """Balanced examples of 3-8 tokens; label 1 exactly when token 7 occurs."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        length = int(torch.randint(3, 9, (1,), generator=generator))
        tokens = torch.randint(2, VOCAB_SIZE, (length,), generator=generator)
        tokens[tokens == TARGET] = 2
        label = i % 2
        if label:
            tokens[torch.randint(0, length, (1,), generator=generator)] = TARGET
        examples.append({"input_ids": tokens.tolist(), "label": label})
    return examples


def collate(examples: list[dict]) -> dict:
    longest = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.zeros(len(examples), longest, dtype=torch.long)
    attention_mask = torch.zeros(len(examples), longest, dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, : len(example["input_ids"])] = torch.tensor(example["input_ids"])
        attention_mask[row, : len(example["input_ids"])] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": torch.tensor([e["label"] for e in examples])}


class BagClassifier(nn.Module):
    """Sum of the real tokens' embeddings, LayerNorm, a hidden layer with dropout, class logits."""

    def __init__(self, dim: int = 16, dropout: float = 0.2):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB_SIZE, dim)
        self.norm = nn.LayerNorm(dim)
        self.hidden = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dim, 2)

    def forward(self, input_ids, attention_mask):
        x = (self.embedding(input_ids) * attention_mask.unsqueeze(-1)).sum(dim=1)  # (B, C)
        return self.head(self.dropout(torch.relu(self.hidden(self.norm(x)))))  # (B, 2)


class EpochBatches:
    """A minimal batch sampler with set_epoch: a reversed or plain order, depending on the epoch."""

    def __init__(self, n: int, batch_size: int):
        self.n, self.batch_size, self.epoch = n, batch_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = list(range(self.n))[:: -1 if self.epoch % 2 else 1]
        return iter([order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)])

    def __len__(self):
        return -(-self.n // self.batch_size)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data():
    return make_examples(192, seed=1), make_examples(96, seed=2)


def fresh_model(seed: int = 0) -> BagClassifier:
    torch.manual_seed(seed)
    return BagClassifier()


def fit(train, val=None, model=None, **config):
    """train_model on the synthetic task with TrainConfig.tiny(**config)."""
    model = model if model is not None else fresh_model()
    return train_model(model, train, val, collate_fn=collate, config=TrainConfig.tiny(**config))


def without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def test_learns_the_synthetic_task(data, tmp_path):
    train, val = data
    config = TrainConfig.tiny(epochs=5, batch_size=16, lr=3e-2, out_dir=tmp_path, log_every_steps=4)
    result = train_model(fresh_model(), train, val, collate_fn=collate, config=config)
    assert result.completed and result.steps == 5 * 12
    evals = [r for r in result.history if "val_accuracy" in r]
    assert len(evals) == 5 and [r["epoch"] for r in evals] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert evals[-1]["val_accuracy"] >= 0.95  # chance is 0.5
    losses = [r["train_loss"] for r in result.history if "train_loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    assert result.best_metric == max(r["val_accuracy"] for r in evals)


def test_metrics_log_and_curves(data, tmp_path):
    train, val = data
    config = TrainConfig.tiny(epochs=2, batch_size=32, out_dir=tmp_path, log_every_steps=2, plot=True,
                              progress=True)
    result = train_model(fresh_model(), train, val, collate_fn=collate, config=config)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records == result.history == read_metrics(tmp_path / "metrics.jsonl")
    train_records = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in train_records] == [2, 4, 6, 8, 10, 12]
    assert all({"step", "epoch", "train_loss", "lr", "grad_norm", "time"} <= set(r) for r in train_records)
    val_records = [r for r in records if "val_loss" in r]
    assert [(r["step"], r["val_n"]) for r in val_records] == [(6, 96), (12, 96)]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "checkpoints" / "last" / "model.safetensors").is_file()
    assert (tmp_path / "checkpoints" / "best" / "model.safetensors").is_file()


@pytest.mark.parametrize("accum, interrupt_at, sampler, eval_every", [
    (1, 7, False, None),  # mid-epoch
    (1, 12, False, None),  # exactly at the end of the first epoch
    (3, 5, False, None),  # accumulation: 12 batches, 4 steps per epoch
    (2, 9, True, 4),  # a batch sampler with set_epoch, and evaluations every 4 steps
])
def test_resume_equals_uninterrupted_run(data, tmp_path, accum, interrupt_at, sampler, eval_every):
    train, val = data
    settings = dict(epochs=3, batch_size=16, grad_accum_steps=accum, eval_every_steps=eval_every,
                    log_every_steps=3, schedule="cosine", warmup=0.2)

    def run(out_dir, model, **overrides):
        return train_model(model, train, val, collate_fn=collate,
                           batch_sampler=EpochBatches(len(train), 16) if sampler else None,
                           config=TrainConfig.tiny(**settings, out_dir=out_dir, **overrides))

    full_model = fresh_model()
    full = run(tmp_path / "full", full_model)
    interrupted = run(tmp_path / "resumed", fresh_model(), max_steps=interrupt_at)
    assert not interrupted.completed and interrupted.steps == interrupt_at
    resumed_model = fresh_model(seed=123)  # a different init: everything must come from the checkpoint
    resumed = run(tmp_path / "resumed", resumed_model, resume=True)

    assert resumed.completed and resumed.steps == full.steps
    for (name, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), name
    assert without_time(resumed.history) == without_time(full.history)
    assert without_time(read_metrics(tmp_path / "resumed" / "metrics.jsonl")) == without_time(full.history)
    assert (resumed.best_metric, resumed.best_step) == (full.best_metric, full.best_step)
    best_full, best_resumed = fresh_model(), fresh_model()
    load_model_weights(best_full, tmp_path / "full" / "checkpoints" / "best" / "model.safetensors")
    load_model_weights(best_resumed, tmp_path / "resumed" / "checkpoints" / "best")
    for a, b in zip(best_full.state_dict().values(), best_resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_with_the_same_max_steps_takes_no_step(data, tmp_path):
    train, val = data
    model = fresh_model()
    first = fit(train, val, model, out_dir=tmp_path, epochs=2, batch_size=16, max_steps=5)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    again = fit(train, val, model, out_dir=tmp_path, epochs=2, batch_size=16, max_steps=5, resume=True)
    assert first.steps == again.steps == 5 and not again.completed
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_resume_after_a_crash_between_checkpoints(data, tmp_path):
    """A crash after step 10 resumes from the step-8 checkpoint; the log loses the records after it."""
    train, val = data
    settings = dict(epochs=2, batch_size=16, save_every_steps=4, log_every_steps=1)
    full_model = fresh_model()
    full = fit(train, val, full_model, out_dir=tmp_path / "full", **settings)
    calls = []

    def crash_in_step_11(logits, labels):
        calls.append(1)
        if len(calls) == 11:
            raise KeyboardInterrupt
        return F.cross_entropy(logits, labels)

    with pytest.raises(KeyboardInterrupt):
        train_model(fresh_model(), train, val, collate_fn=collate, loss_fn=crash_in_step_11,
                    config=TrainConfig.tiny(out_dir=tmp_path / "crashed", **settings))
    assert read_metrics(tmp_path / "crashed" / "metrics.jsonl")[-1]["step"] == 10
    resumed_model = fresh_model(seed=7)
    resumed = fit(train, val, resumed_model, out_dir=tmp_path / "crashed", resume=True, **settings)
    assert all(torch.equal(a, b) for a, b in zip(full_model.state_dict().values(),
                                                 resumed_model.state_dict().values()))
    assert without_time(read_metrics(tmp_path / "crashed" / "metrics.jsonl")) == without_time(full.history)
    assert without_time(resumed.history) == without_time(full.history)


def test_resume_without_checkpoint_is_a_clear_error(data, tmp_path):
    train, val = data
    with pytest.raises(CheckpointError, match="no checkpoint at .*last"):
        fit(train, val, out_dir=tmp_path, resume=True)


def test_resume_with_other_data_is_refused(data, tmp_path):
    train, val = data
    fit(train, val, out_dir=tmp_path, max_steps=3)
    with pytest.raises(ValueError, match="cannot resume"):
        fit(train[:100], val, out_dir=tmp_path, resume=True)


def test_best_checkpoint_reproduces_best_metric(data, tmp_path):
    train, val = data
    result = fit(train, val, epochs=3, batch_size=16, out_dir=tmp_path)
    model = load_model_weights(fresh_model(seed=5), tmp_path / "checkpoints" / "best" / "model.safetensors")
    assert evaluate(model, val, collate_fn=collate)["accuracy"] == result.best_metric


def test_nan_loss_names_the_step(data):
    train, val = data
    calls = []

    def loss_turning_nan(logits, labels):
        calls.append(1)
        loss = F.cross_entropy(logits, labels)
        return loss * float("nan") if len(calls) == 3 else loss

    with pytest.raises(FloatingPointError, match=r"loss is nan at step 3 \(epoch 1\)"):
        train_model(fresh_model(), train, val, collate_fn=collate, loss_fn=loss_turning_nan,
                    config=TrainConfig.tiny())


def test_nan_loss_with_accumulation_names_the_optimizer_step(data):
    train, _ = data
    calls = []

    def loss_turning_inf(logits, labels):
        calls.append(1)
        return F.cross_entropy(logits, labels) + (float("inf") if len(calls) == 30 else 0.0)

    # 24 batches per epoch, 4 per step: call 30 is in step 8, the second step of epoch 2.
    with pytest.raises(FloatingPointError, match=r"loss is inf at step 8 \(epoch 2\)"):
        train_model(fresh_model(), train, collate_fn=collate, loss_fn=loss_turning_inf,
                    config=TrainConfig.tiny(epochs=3, grad_accum_steps=4))


def test_early_stopping_after_patience(data, tmp_path):
    train, val = data
    # lr = 0 leaves the weights (and the metric) unchanged: every evaluation after the first is no better.
    config = TrainConfig.tiny(epochs=10, batch_size=32, lr=0.0, early_stopping_patience=2, out_dir=tmp_path)
    result = train_model(fresh_model(), train, val, collate_fn=collate, config=config)
    evals = [r for r in result.history if "val_accuracy" in r]
    assert result.stopped_early and result.completed
    assert len(evals) == 3 and result.steps == 3 * 6 and result.best_step == 6


def test_early_stopping_keeps_going_while_improving(data):
    train, val = data
    result = fit(train, val, epochs=4, batch_size=16, metric="loss", metric_mode="min",
                 early_stopping_patience=1)
    assert not result.stopped_early and result.steps == 4 * 12


def test_gradient_clipping_bounds_the_update_norm(data):
    train, _ = data
    norms = []

    def record_grad_norm(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    handle = register_optimizer_step_pre_hook(record_grad_norm)
    try:
        clipped = fit(train, max_grad_norm=0.05)
        clipped_norms, norms[:] = list(norms), []
        fit(train, max_grad_norm=None)
    finally:
        handle.remove()
    assert len(clipped_norms) == clipped.steps == 48
    assert max(clipped_norms) <= 0.05 * (1 + 1e-5)
    assert max(norms) > 0.05  # without clipping the bound is exceeded, so the check above means something
    assert max(r["grad_norm"] for r in clipped.history) > 0.05  # the log shows the norm before clipping


def test_optimizer_groups_skip_decay_on_biases_and_norms():
    model = fresh_model()
    model.hidden.bias.requires_grad_(False)
    decay, no_decay = make_optimizer(model, lr=1e-3, weight_decay=0.1).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = sorted(names[id(p)] for p in decay["params"])
    assert decayed == ["embedding.weight", "head.weight", "hidden.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["head.bias", "norm.bias", "norm.weight"]


def test_optimizer_is_the_fused_adamw_and_steps_like_the_op_by_op_one():
    model = fresh_model().eval()  # no dropout: the two copies see the same gradients
    reference = copy.deepcopy(model)
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.1)
    assert all(group["fused"] for group in optimizer.param_groups)
    names, twins = {id(p): n for n, p in model.named_parameters()}, dict(reference.named_parameters())
    plain = torch.optim.AdamW([{"params": [twins[names[id(p)]] for p in g["params"]], "weight_decay": g["weight_decay"]}
                               for g in optimizer.param_groups], lr=1e-2, fused=False)
    ids = torch.randint(0, VOCAB_SIZE, (4, 6), generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        for m, opt in ((model, optimizer), (reference, plain)):
            opt.zero_grad()
            m(ids, torch.ones_like(ids)).square().mean().backward()
            opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)
    assert not torch.equal(model.head.weight, fresh_model().head.weight)  # the steps moved the weights


def test_epoch_order_is_a_function_of_seed_and_epoch():
    first = epoch_batches(50, 8, seed=3, epoch=1)
    assert first == epoch_batches(50, 8, seed=3, epoch=1)
    assert first != epoch_batches(50, 8, seed=3, epoch=2)
    assert sorted(i for batch in first for i in batch) == list(range(50))
    assert [len(batch) for batch in first] == [8] * 6 + [2]


def test_bad_configs_are_refused(data):
    train, val = data
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step")
    with pytest.raises(ValueError, match="grad_accum_steps"):
        TrainConfig(grad_accum_steps=0)
    with pytest.raises(ValueError, match="resume=True needs out_dir"):
        TrainConfig(resume=True)
    with pytest.raises(ValueError, match="needs val_data"):
        fit(train, early_stopping_patience=1)
    with pytest.raises(ValueError, match="'labels'"):
        train_model(fresh_model(), train, collate_fn=lambda e: collate(e)["input_ids"],
                    config=TrainConfig.tiny())


def test_bf16_autocast_on_the_cpu_when_asked(data):
    train, val = data
    model = fresh_model()
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    dtypes = set()
    linear.register_forward_hook(lambda module, inputs, output: dtypes.add((module.training, output.dtype)))
    result = fit(train, val, model, epochs=5, batch_size=16, lr=3e-2, mixed_precision="bf16")
    assert (True, torch.bfloat16) in dtypes and (True, torch.float32) not in dtypes  # every training step
    assert (False, torch.float32) in dtypes and (False, torch.bfloat16) not in dtypes  # validation in fp32
    assert next(model.parameters()).dtype == torch.float32  # autocast leaves the master weights in fp32
    assert result.best_metric >= 0.9
    dtypes.clear()
    bf16_eval = fit(train, val, model, epochs=1, batch_size=16, mixed_precision="bf16", eval_mixed_precision=True)
    assert (False, torch.bfloat16) in dtypes and (False, torch.float32) not in dtypes  # validation autocast too
    assert bf16_eval.best_metric >= 0.9
    dtypes.clear()
    fit(train, val, model, epochs=1, batch_size=16, mixed_precision="auto")  # auto: none on the CPU
    assert (True, torch.float32) in dtypes and (True, torch.bfloat16) not in dtypes
    with pytest.raises(ValueError, match="mixed_precision must be auto, bf16 or no, got 'fp16'"):
        TrainConfig(mixed_precision="fp16")
    with pytest.raises(ValueError, match="needs the CPU or a CUDA device that supports bf16, got meta"):
        fit(train, val, fresh_model().to("meta"), device="meta", mixed_precision="bf16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_on_cuda(data):
    train, val = data
    model = fresh_model()
    result = fit(train, val, model, epochs=5, batch_size=16, lr=3e-2, device="cuda", mixed_precision="bf16")
    assert next(model.parameters()).dtype == torch.float32  # autocast leaves the master weights in fp32
    assert result.best_metric >= 0.9
