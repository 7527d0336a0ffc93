"""Gradient checkpointing: keep only each block's input during the forward pass and recompute the block in the
backward pass (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost", arXiv 1604.06174).

Autograd normally keeps, for every block, the tensors its backward needs (attention probabilities, the
feed-forward's wide activations ...). With checkpointing a block keeps its input alone; its backward runs the
block's forward once more, with the random state of the first run (so dropout masks repeat), and then its
backward. Activation memory falls from L blocks' worth to L inputs plus one block's worth; each step costs one
more forward pass. The loss and the gradients are unchanged.

The blocks are the family's `blocks(model)`, so this works for BERT, GPT and Llama alike.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunelab.core.family import family_of


def gradient_checkpointing(model: nn.Module, enable: bool = True) -> nn.Module:
    """Recompute every block of `model` in the backward pass (`enable=False` puts the plain forward back)."""
    family = family_of(model)
    if family is None:
        raise ValueError(f"{type(model).__name__} has no model family description, so its blocks are unknown")
    for block in family.blocks(model):
        if enable and "forward" not in vars(block):
            block.forward = _recomputed(block.forward)
        elif not enable:
            vars(block).pop("forward", None)
    return model


def is_checkpointed(model: nn.Module) -> bool:
    family = family_of(model)
    return family is not None and any("forward" in vars(block) for block in family.blocks(model))


def _recomputed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation and generation: nothing to save, nothing to recompute
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
