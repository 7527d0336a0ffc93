"""Checks that training a partly frozen model changes only what it should (selective methods, adapters)."""

import torch


def batch(vocab_size=99, B=4, T=9):
    """(B, T) ids, a mask with the last two positions of row 0 padded, and labels 0/1."""
    ids = torch.randint(1, vocab_size, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, -2:] = 0
    return ids.masked_fill(mask == 0, 0), mask, torch.arange(B) % 2


def train_steps(model, steps=5, lr=1e-2, vocab_size=99):
    """A few AdamW steps on one batch; returns (parameters before, losses). Every parameter goes to the
    optimizer, so what stays unchanged stays so because it is frozen, not because it was left out."""
    ids, mask, labels = batch(vocab_size)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(ids, mask), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return before, losses


def assert_only_trainable_changed(model, before, losses):
    """Every frozen tensor bit-identical, every trainable one changed, and the loss fell."""
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"trainable {name} did not change"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
    assert losses[-1] < losses[0], losses
