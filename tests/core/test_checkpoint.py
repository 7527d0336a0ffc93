"""Tests for tunelab/core/checkpoint.py: round trips, clear errors, atomic replacement."""

import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from tunelab.core import checkpoint, io
from tunelab.core.checkpoint import CheckpointError, load_checkpoint, load_model_weights, save_checkpoint
from tunelab.core.schedule import make_scheduler


class Small(nn.Module):
    def __init__(self, hidden: int = 8, extra: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(10, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, 3)
        if extra:
            self.extra = nn.Linear(3, 3)

    def forward(self, input_ids):
        return self.head(self.norm(self.embedding(input_ids)))


class Tied(nn.Module):
    """A language-model-like module whose output layer shares the embedding matrix."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.lm_head = nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.embedding.weight


def trained(model: nn.Module, steps: int = 3):
    """A model, AdamW and a schedule after a few steps, so every state is non-trivial."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = make_scheduler(optimizer, "linear", 2, 10)
    for _ in range(steps):
        model(torch.randint(0, 10, (4, 5))).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.fixture
def saved(tmp_path):
    model, optimizer, scheduler = trained(Small())
    path = save_checkpoint(tmp_path / "last", model, optimizer, scheduler, {"step": 3, "note": "hi"})
    return path, model, optimizer, scheduler


def test_round_trip_restores_model_optimizer_scheduler_and_rng(saved):
    path, model, optimizer, scheduler = saved
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "optimizer.safetensors",
                                                      "rng.safetensors", "state.json"]
    expected_draws = (torch.rand(3), np.random.rand(), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)

    model2, optimizer2, scheduler2 = trained(Small(), steps=1)  # other values to be overwritten
    state = load_checkpoint(path, model2, optimizer2, scheduler2, restore_rng=True)
    assert state["trainer"] == {"step": 3, "note": "hi"}
    assert torch.equal(torch.rand(3), expected_draws[0])
    assert (np.random.rand(), random.random()) == expected_draws[1:]
    assert same_weights(model, model2)
    assert scheduler2.state_dict() == scheduler.state_dict()
    one, two = optimizer.state_dict(), optimizer2.state_dict()
    assert one["param_groups"] == two["param_groups"]
    for index, values in one["state"].items():
        assert values.keys() == two["state"][index].keys()
        assert all(torch.equal(values[k], two["state"][index][k]) for k in values)


def test_only_safetensors_and_json_on_disk(saved):
    path = saved[0]
    with safe_open(str(path / "optimizer.safetensors"), "pt") as f:
        assert "0.exp_avg" in f.keys() and "0.step" in f.keys()
    state = json.loads((path / "state.json").read_text())
    assert set(state["files"]) == {"model.safetensors", "optimizer.safetensors", "rng.safetensors"}
    assert all(len(entry["sha256"]) == 64 for entry in state["files"].values())


def test_truncated_file_is_named(saved):
    path = saved[0]
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    message = r"model\.safetensors has \d+ bytes but state\.json records \d+.*truncated"
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path, Small())
    with pytest.raises(CheckpointError, match="truncated"):
        load_model_weights(Small(), path / "model.safetensors")


def test_truncated_file_without_state_json(saved, tmp_path):
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((saved[0] / "model.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"lone\.safetensors is not a readable safetensors file"):
        load_model_weights(Small(), lone)


def test_altered_bytes_fail_the_checksum(saved):
    path = saved[0]
    data = bytearray((path / "optimizer.safetensors").read_bytes())
    data[-3] ^= 0xFF  # same size, one tensor value changed: only the checksum can tell
    (path / "optimizer.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors fails its sha256 check.*altered"):
        load_checkpoint(path)


def test_missing_files_are_named(saved, tmp_path):
    path = saved[0]
    (path / "rng.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing file .*rng\.safetensors"):
        load_checkpoint(path)
    (path / "state.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing file .*state\.json"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"missing file .*nowhere\.safetensors"):
        load_model_weights(Small(), tmp_path / "nowhere.safetensors")


def test_corrupt_state_json(saved):
    path = saved[0]
    (path / "state.json").write_text('{"format": "tunelab-checkpoint", "files": {')
    with pytest.raises(CheckpointError, match=r"state\.json is not valid JSON"):
        load_checkpoint(path)


def test_wrong_architecture_lists_keys_and_shapes(saved):
    path = saved[0]
    message = r"shape mismatches \(4\): embedding\.weight: file \(10, 8\) vs model \(10, 16\)"
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path, Small(hidden=16))
    with pytest.raises(CheckpointError, match=r"missing keys \(2\): extra\.bias, extra\.weight"):
        load_model_weights(Small(extra=True), path)
    model, *_ = trained(Small(extra=True))
    save_checkpoint(path, model)
    message = r"does not fit Small: unexpected keys \(2\): extra\.bias, extra\.weight"
    with pytest.raises(CheckpointError, match=message):
        load_model_weights(Small(), path / "model.safetensors")
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        load_checkpoint(path, optimizer=torch.optim.AdamW(Small(extra=True).parameters()))


def test_tied_weights_are_stored_once(tmp_path):
    model = Tied()
    save_checkpoint(tmp_path / "tied", model, save_rng=False)
    with safe_open(str(tmp_path / "tied" / "model.safetensors"), "pt") as f:
        assert len(list(f.keys())) == 1
    loaded = load_model_weights(Tied(), tmp_path / "tied")
    assert torch.equal(loaded.lm_head.weight, model.embedding.weight)
    assert loaded.lm_head.weight is loaded.embedding.weight  # still tied


def test_failure_mid_write_keeps_the_previous_checkpoint(saved, monkeypatch):
    path, model, optimizer, scheduler = saved
    writes = []

    def write_then_fail(file, tensors, metadata=None):
        writes.append(file.name)
        if len(writes) == 2:  # model.safetensors is written, optimizer.safetensors is not
            raise OSError("disk full")
        return original(file, tensors, metadata)

    original = checkpoint._write_tensors
    monkeypatch.setattr(checkpoint, "_write_tensors", write_then_fail)
    changed, other_optimizer, _ = trained(Small(), steps=5)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, changed, other_optimizer)
    assert writes == ["model.safetensors", "optimizer.safetensors"]
    assert [p.name for p in path.parent.iterdir()] == ["last"]  # the temporary folder is gone
    restored = Small()
    load_checkpoint(path, restored)
    assert same_weights(restored, model) and not same_weights(restored, changed)


def test_crash_between_the_renames_is_recovered(saved, monkeypatch):
    path, model, optimizer, scheduler = saved
    renames = []

    def rename_then_die(src, dst):
        renames.append(dst)
        if len(renames) == 2:  # the old checkpoint was moved aside, the new one is not in place yet
            raise KeyboardInterrupt
        return original(src, dst)

    original = io.os.replace  # checkpoints are swapped into place by tunelab.core.io.atomic_folder
    monkeypatch.setattr(io.os, "replace", rename_then_die)
    changed, *_ = trained(Small(), steps=5)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, changed)
    monkeypatch.setattr(io.os, "replace", original)
    assert not path.exists()
    restored = Small()
    load_checkpoint(path, restored)  # reads the checkpoint that was moved aside
    assert same_weights(restored, model)
    save_checkpoint(path, changed)  # the next save puts things back in order
    assert sorted(p.name for p in path.parent.iterdir()) == ["last"]
    assert same_weights(load_model_weights(Small(), path), changed)


def test_a_trainable_only_checkpoint_holds_and_restores_just_what_trains(tmp_path):
    # A frozen pretrained body with a small trained part (a PEFT run): the checkpoint skips the frozen weights.
    torch.manual_seed(1)
    model = Small()
    model.embedding.requires_grad_(False)
    model.norm.requires_grad_(False)
    model.register_buffer("counter", torch.tensor([7.0]))  # buffers are kept: they may change in training
    trained_model, optimizer, _ = trained(model)
    save_checkpoint(tmp_path / "last", trained_model, optimizer, trainable_only=True)
    with safe_open(str(tmp_path / "last" / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["counter", "head.bias", "head.weight"]
    torch.manual_seed(1)  # the same frozen body, rebuilt as a run rebuilds its pretrained model
    fresh = Small()
    fresh.embedding.requires_grad_(False)
    fresh.norm.requires_grad_(False)
    fresh.register_buffer("counter", torch.tensor([0.0]))
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)  # as `trained` builds it
    load_checkpoint(tmp_path / "last", fresh, fresh_optimizer)
    assert same_weights(fresh, trained_model)
    load_model_weights(fresh, tmp_path / "last")  # the weights-only loader reads the same flag
    unfrozen = Small()  # the norm trains here, but the checkpoint has no norm weights: refused by name
    unfrozen.embedding.requires_grad_(False)
    unfrozen.register_buffer("counter", torch.tensor([0.0]))
    with pytest.raises(CheckpointError, match=r"trainable parameters of Small: missing keys \(2\): norm.bias"):
        load_model_weights(unfrozen, tmp_path / "last")
