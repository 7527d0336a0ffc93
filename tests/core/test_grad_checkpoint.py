"""Gradient checkpointing of a family's blocks: the same loss and gradients, less kept for the backward pass."""

import pytest
import torch
from torch import nn

from tests.core.decoder_pairs import gpt_pair, padded
from tunelab.core.evaluation import causal_lm_loss
from tunelab.core.grad_checkpoint import gradient_checkpointing, is_checkpointed
from tunelab.quant.report import training_memory


def test_checkpointed_gpt_gives_the_same_loss_and_gradients_with_dropout_and_keeps_less():
    _, model = gpt_pair(resid_pdrop=0.1, attn_pdrop=0.1, embd_pdrop=0.1)
    model.train()
    ids, mask = padded([12, 9], model.config.vocab_size)
    runs = []
    for checkpointed in (False, True):
        gradient_checkpointing(model, checkpointed)
        assert is_checkpointed(model) is checkpointed
        torch.manual_seed(3)  # the recomputed blocks must draw the dropout masks of the first pass
        loss = causal_lm_loss(model(ids, mask), ids)
        loss.backward()
        runs.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad()
    (loss0, grads0), (loss1, grads1) = runs
    assert loss0 == loss1
    assert max((grads0[n] - grads1[n]).abs().max().item() for n in grads0) <= 1e-6
    kept = {c: training_memory(gradient_checkpointing(model, c), lambda: model(ids, mask).sum()).activations
            for c in (False, True)}
    assert kept[True] < 0.5 * kept[False]


def test_evaluation_under_no_grad_is_unchanged_and_a_model_without_family_is_refused():
    _, model = gpt_pair()
    ids, mask = padded([5, 3], model.config.vocab_size)
    with torch.no_grad():
        before = model(ids, mask)
        after = gradient_checkpointing(model)(ids, mask)
    assert torch.equal(before, after)
    with pytest.raises(ValueError, match="family"):
        gradient_checkpointing(nn.Sequential(nn.Linear(2, 2)))
