"""Pruning: masks equal torch.nn.utils.prune's, survive training, follow the cubic schedule; shrunk models are exact."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from tests.conftest import assert_close
from tunelab.core.bert import BertConfig, BertForSequenceClassification
from tunelab.core.classifier import ClassifierConfig, TransformerClassifier
from tunelab.core.io import read_safetensors, write_safetensors
from tunelab.core.train import TrainConfig, train_model
from tunelab.quant.prune import (GradualPruner, apply_masks, apply_structure, cubic_sparsity, global_unstructured,
                                 head_scores, l1_unstructured, ln_structured, magnitude_prune, make_permanent,
                                 mask_heads, mask_neurons, neuron_scores, prune_heads, prune_neurons,
                                 random_unstructured, shrink_structure, sparsity_report)


pytestmark = pytest.mark.usefixtures("one_thread")


def twin_linears(out_features=30, in_features=20, tied=False):
    """Two identical Linear layers, one for torch's pruning and one for ours; `tied` puts many ties in."""
    theirs = nn.Linear(in_features, out_features)
    if tied:
        with torch.no_grad():
            theirs.weight.copy_(torch.randint(-3, 4, theirs.weight.shape).float())
    return theirs, copy.deepcopy(theirs)


def torch_mask(module, name="weight"):
    return getattr(module, name + "_mask").bool()


# ---------------------------------------------------------------- masks equal torch's


@pytest.mark.parametrize("amounts", [(0.3,), (0.3, 0.5), (17, 0.25, 40), (0.0,), (1.0,), (0.5, 0)])
@pytest.mark.parametrize("tied", [False, True])
def test_l1_unstructured_masks_equal_torch_including_repeated_calls(amounts, tied):
    theirs, ours = twin_linears(tied=tied)
    for amount in amounts:
        torch_prune.l1_unstructured(theirs, "weight", amount)
        l1_unstructured(ours, "weight", amount)
        assert torch.equal(ours.weight_mask, torch_mask(theirs))
        assert torch.equal(ours.weight, theirs.weight)  # our parameter holds what torch computes in its hook
    remaining = 600
    for amount in amounts:  # each call prunes among what is still unpruned
        remaining -= amount if isinstance(amount, int) else round(amount * remaining)
    assert int(ours.weight_mask.sum()) == remaining
    assert set(ours.state_dict()) == {"weight", "bias", "weight_mask"}  # ordinary names, plus the mask


def test_random_unstructured_draws_what_torch_draws():
    theirs, ours = twin_linears()
    default_generator = copy.deepcopy(ours)
    torch.manual_seed(7)
    torch_prune.random_unstructured(theirs, "weight", 0.4)
    torch_prune.random_unstructured(theirs, "weight", 50)  # the second draw is over the 360 unpruned entries
    generator = torch.Generator().manual_seed(7)
    random_unstructured(ours, "weight", 0.4, generator=generator)
    random_unstructured(ours, "weight", 50, generator=generator)
    assert torch.equal(ours.weight_mask, torch_mask(theirs))
    assert int(ours.weight_mask.sum()) == 600 - 240 - 50
    torch.manual_seed(7)  # without a generator: torch's global one, as torch uses it
    random_unstructured(default_generator, "weight", 0.4)
    random_unstructured(default_generator, "weight", 50)
    assert torch.equal(default_generator.weight_mask, ours.weight_mask)
    random_unstructured(default_generator, "weight", 50)
    assert not torch.equal(default_generator.weight_mask, ours.weight_mask)


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("dim", [0, 1])
def test_ln_structured_masks_equal_torch(n, dim):
    theirs, ours = twin_linears()
    for amount in (0.3, 4, 0.5):
        torch_prune.ln_structured(theirs, "weight", amount, n=n, dim=dim)
        ln_structured(ours, "weight", amount, n=n, dim=dim)
        assert torch.equal(ours.weight_mask, torch_mask(theirs))
    remaining = (30, 20)[dim]
    for amount in (0.3, 4, 0.5):
        remaining -= amount if isinstance(amount, int) else round(amount * remaining)
    assert int(ours.weight_mask.any(dim=1 - dim).sum()) == remaining  # 30 -> 21 -> 17 -> 9 rows
    assert torch.equal(ours.bias, theirs.bias)  # rows of the weight only, as in torch


def test_ln_structured_on_a_conv_weight_with_ties_equals_torch():
    theirs = nn.Conv2d(6, 8, 3)
    with torch.no_grad():
        theirs.weight[:4] = theirs.weight[4:]  # pairs of channels with equal norms
    ours = copy.deepcopy(theirs)
    torch_prune.ln_structured(theirs, "weight", 3, n=2, dim=0)
    ln_structured(ours, "weight", 3, n=2, dim=0)
    assert torch.equal(ours.weight_mask, torch_mask(theirs))


def test_global_unstructured_equals_torch_and_ranks_layers_together():
    layers = [nn.Linear(20, 30), nn.Linear(30, 10), nn.Linear(10, 5)]
    with torch.no_grad():
        layers[1].weight.mul_(0.1)  # a layer of small weights: global pruning takes most of it
    mine = copy.deepcopy(layers)
    for amount in (0.4, 100):
        torch_prune.global_unstructured([(m, "weight") for m in layers], torch_prune.L1Unstructured, amount=amount)
        global_unstructured([(m, "weight") for m in mine], amount)
        for ours, theirs in zip(mine, layers):
            assert torch.equal(ours.weight_mask, torch_mask(theirs))
    shares = [1 - m.weight_mask.float().mean().item() for m in mine]
    assert shares[1] > 0.9 > shares[0]


def test_magnitude_prune_global_equals_torch_on_a_model_and_skips_the_head():
    model = TransformerClassifier(ClassifierConfig.tiny())
    theirs = copy.deepcopy(model)
    magnitude_prune(model, 0.6, scope="global")
    targets = [(m, "weight") for n, m in theirs.named_modules() if isinstance(m, nn.Linear) and n != "head"]
    torch_prune.global_unstructured(targets, torch_prune.L1Unstructured, amount=0.6)
    for (name, ours), (_, module) in zip(model.named_modules(), theirs.named_modules()):
        if isinstance(ours, nn.Linear) and name != "head":
            assert torch.equal(ours.weight_mask, torch_mask(module)), name
    assert not hasattr(model.head, "weight_mask")


def test_layerwise_magnitude_prune_and_sparsity_report_count_every_zero():
    model = TransformerClassifier(ClassifierConfig.tiny())
    magnitude_prune(model, 0.5)
    report = sparsity_report(model)
    linears = {f"{n}.weight": m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(report.layers) == set(linears)
    for name, numel in linears.items():
        zeros = 0 if name == "head.weight" else round(0.5 * numel)
        assert report.layers[name] == (zeros, numel), name
    assert report.zeros == sum(z for z, _ in report.layers.values()) and report.numel == sum(linears.values())
    assert report.sparsity == pytest.approx(report.zeros / report.numel)
    assert "total" in report.table() and "50.0%" in report.table()
    with_embeddings = TransformerClassifier(ClassifierConfig.tiny())
    magnitude_prune(with_embeddings, 0.5, kinds=(nn.Linear, nn.Embedding))
    assert sparsity_report(with_embeddings).layers["token_embedding.weight"] == (800, 1600)


# ---------------------------------------------------------------- masks through training


def synthetic_examples(n=64, seed=1, vocab=100):
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        tokens = torch.randint(2, vocab, (12,), generator=generator)
        if i % 2:
            tokens[3] = 7
        examples.append({"input_ids": tokens.tolist(), "label": i % 2})
    return examples


def collate(examples):
    return {"input_ids": torch.tensor([e["input_ids"] for e in examples]),
            "labels": torch.tensor([e["label"] for e in examples])}


def train(model, after_step=None):
    config = TrainConfig.tiny(epochs=2, batch_size=16, lr=1e-2, weight_decay=0.1, warmup=0.0)
    return train_model(model, synthetic_examples(), collate_fn=collate, config=config, after_step=after_step)


def test_pruned_weights_stay_exactly_zero_through_adamw_with_apply_masks():
    model = TransformerClassifier(ClassifierConfig.tiny())
    magnitude_prune(model, 0.7)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    unguarded = copy.deepcopy(model)
    train(model, after_step=lambda step: apply_masks(model))
    train(unguarded)
    for name, module in model.named_modules():
        if hasattr(module, "weight_mask"):
            assert (module.weight[~module.weight_mask] == 0).all(), name
            assert not torch.equal(module.weight, before[f"{name}.weight"])  # the kept weights trained
    moved = unguarded.layers[0].ff.linear1
    assert (moved.weight[~moved.weight_mask] != 0).any()  # without apply_masks, AdamW revives them
    make_permanent(model)
    assert not any(name.endswith("_mask") for name in model.state_dict())
    assert set(model.state_dict()) == set(TransformerClassifier(ClassifierConfig.tiny()).state_dict())
    assert sparsity_report(model).layers["layers.0.ff.linear1.weight"][0] == round(0.7 * 32 * 16)


def test_cubic_schedule_follows_the_formula_and_ends_exactly_at_its_final_sparsity():
    s_i, s_f, t0, n, dt = 0.1, 0.9, 5, 4, 3
    for k in range(n + 1):
        t = t0 + k * dt
        expected = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3
        assert cubic_sparsity(t, s_i, s_f, t0, n, dt) == pytest.approx(expected, abs=1e-12)
        assert cubic_sparsity(t + dt - 1, s_i, s_f, t0, n, dt) == cubic_sparsity(t, s_i, s_f, t0, n, dt)
    assert cubic_sparsity(t0 - 1, s_i, s_f, t0, n, dt) == 0.0
    assert cubic_sparsity(t0 + n * dt, s_i, s_f, t0, n, dt) == s_f  # exactly, not approximately
    assert cubic_sparsity(10**6, s_i, s_f, t0, n, dt) == s_f
    values = [cubic_sparsity(t, s_i, s_f, t0, n, dt) for t in range(40)]
    assert values == sorted(values)
    gains = [b - a for a, b in zip(values[t0::dt], values[t0 + dt::dt])][:n]
    assert gains == sorted(gains, reverse=True)  # prunes fast first, slowly at the end


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_gradual_pruner_during_training_reaches_its_final_sparsity_exactly(scope):
    model = TransformerClassifier(ClassifierConfig.tiny())
    pruner = GradualPruner(model, final=0.8, initial=0.2, start_step=0, n_steps=3, interval=2, scope=scope)
    seen = []

    def after_step(step):
        pruner(step)
        seen.append(sparsity_report(model).layers["layers.1.attn.q_proj.weight"][0])

    train(model, after_step=after_step)  # 8 steps; the last event is at step 6
    assert pruner.end_step == 6 and len(seen) == 8
    assert seen == sorted(seen) and seen[0] > 0
    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "head"]
    pruned = [int((~m.weight_mask).sum()) for m in linears]
    if scope == "layer":
        assert pruned == [round(0.8 * m.weight.numel()) for m in linears]
    else:
        assert sum(pruned) == round(0.8 * sum(m.weight.numel() for m in linears))
    for m in linears:
        assert (m.weight[~m.weight_mask] == 0).all()


# ---------------------------------------------------------------- heads and neurons


def tiny_bert(**overrides):
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig.tiny(**overrides)).eval()


def batch(vocab=99, B=3, T=9):
    ids = torch.randint(1, vocab, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    return ids, mask


def test_head_and_neuron_scores_are_the_norms_of_their_weights():
    attn = tiny_bert().bert.layers[0].attn
    D = attn.d_head
    h = 2
    v_rows, o_cols = attn.v_proj.weight[h * D:(h + 1) * D], attn.out_proj.weight[:, h * D:(h + 1) * D]
    assert_close(head_scores(attn, n=1)[h], v_rows.abs().sum() * o_cols.abs().sum())
    assert_close(head_scores(attn)[h], v_rows.norm() * o_cols.norm())
    ff = tiny_bert().bert.layers[0].ff
    assert_close(neuron_scores(ff)[5], ff.linear1.weight[5].norm() * ff.linear2.weight[:, 5].norm())
    mask_heads(attn, [h])
    assert head_scores(attn)[h] == 0 and (attn.q_proj.weight[h * D:(h + 1) * D] == 0).all()


def test_prune_heads_removes_the_lowest_scoring_and_a_second_call_only_the_remaining():
    model = tiny_bert()
    layer = model.bert.layers[1]
    scores = head_scores(layer.attn)
    pruned = prune_heads(model, 1)
    assert pruned["bert.layers.1"] == [int(scores.argmin())]
    again = prune_heads(model, 0.34)  # round(0.34 * 3 remaining) = 1 more head per layer
    assert all(len(heads) == 1 and not set(heads) & set(pruned[name]) for name, heads in again.items())


@pytest.mark.parametrize("family", ["bert", "classifier"])
def test_shrunk_model_has_fewer_parameters_and_the_masked_models_outputs(family):
    if family == "bert":
        model = tiny_bert()  # post-norm, C=32, 4 heads of 8, d_ff=37
        C, D, d_ff = 32, 8, 37
    else:
        torch.manual_seed(0)
        model = TransformerClassifier(ClassifierConfig.tiny(d_model=32, n_heads=4, d_ff=40, vocab_size=99)).eval()
        C, D, d_ff = 32, 8, 40
    prune_heads(model, 0.5)
    prune_neurons(model, 0.3)
    ids, mask = batch()
    with torch.no_grad():
        masked = model(ids, mask)
    n_masked = sum(p.numel() for p in model.parameters())
    structure = shrink_structure(model)
    kept_ff = d_ff - round(0.3 * d_ff)
    assert structure == {name: {"n_heads": 2, "d_head": D, "d_ff": kept_ff} for name in structure}
    assert len(structure) == 2
    removed = 2 * (2 * (3 * (D * C + D) + C * D) + (d_ff - kept_ff) * (2 * C + 1))  # layers x (heads + neurons)
    assert n_masked - sum(p.numel() for p in model.parameters()) == removed
    layer = model.layers[0] if family == "classifier" else model.bert.layers[0]
    assert layer.attn.q_proj.weight.shape == (2 * D, C) and layer.attn.out_proj.weight.shape == (C, 2 * D)
    assert layer.ff.linear1.weight.shape == (kept_ff, C) and layer.ff.linear2.weight.shape == (C, kept_ff)
    with torch.no_grad():
        assert_close(model(ids, mask), masked)
    model.train()
    model(ids, mask).sum().backward()  # the smaller model still trains
    assert layer.attn.q_proj.weight.grad.shape == (2 * D, C)


def test_structure_rebuilds_the_skeleton_and_saved_weights_load_to_identical_logits(tmp_path):
    model = tiny_bert()
    prune_heads(model, 0.25)
    prune_neurons(model, 10)
    magnitude_prune(model, 0.3)  # unstructured masks on top are sliced along with the weights
    structure = shrink_structure(model)
    apply_masks(model)
    assert (model.bert.layers[0].attn.q_proj.weight[~model.bert.layers[0].attn.q_proj.weight_mask] == 0).all()
    make_permanent(model)
    write_safetensors(tmp_path / "model.safetensors", {k: v.contiguous() for k, v in model.state_dict().items()})
    saved = json.loads(json.dumps(structure))  # as the run.json keeps it
    fresh = apply_structure(tiny_bert(), saved)
    fresh.load_state_dict(read_safetensors(tmp_path / "model.safetensors"))  # strict: every shape fits
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids, mask), model(ids, mask))
    with pytest.raises(RuntimeError, match="size mismatch"):
        tiny_bert().load_state_dict(read_safetensors(tmp_path / "model.safetensors"))


def test_a_minilm_shaped_model_shrinks_to_the_expected_shapes():
    config = BertConfig(vocab_size=1000, hidden_size=384, num_hidden_layers=2, num_attention_heads=12,
                        intermediate_size=1536, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config).eval()
    full = sum(p.numel() for p in model.parameters())
    prune_heads(model, 0.5)
    prune_neurons(model, 0.5)
    ids = torch.randint(1, 1000, (2, 16))
    with torch.no_grad():
        masked = model(ids)
    shrink_structure(model)
    attn, ff = model.bert.layers[1].attn, model.bert.layers[1].ff
    assert (attn.n_heads, attn.d_head, attn.q_proj.weight.shape) == (6, 32, (192, 384))
    assert ff.linear1.weight.shape == (768, 384)
    per_layer = 6 * (3 * (32 * 384 + 32) + 384 * 32) + 768 * (2 * 384 + 1)
    assert full - sum(p.numel() for p in model.parameters()) == 2 * per_layer
    with torch.no_grad():
        assert_close(model(ids), masked)


# ---------------------------------------------------------------- refusals name their problem


def test_refusals_name_the_problem():
    layer = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"amount=1.5 is outside \[0, 1\]"):
        l1_unstructured(layer, "weight", 1.5)
    with pytest.raises(ValueError, match=r"amount=-0.1 is outside"):
        l1_unstructured(layer, "weight", -0.1)
    with pytest.raises(ValueError, match="amount=-2 is a negative count"):
        random_unstructured(layer, "weight", -2)
    with pytest.raises(ValueError, match="asks to prune 13 entries of weight, but only 12"):
        l1_unstructured(layer, "weight", 13)
    with pytest.raises(TypeError, match="amount must be a float"):
        l1_unstructured(layer, "weight", "0.5")
    with pytest.raises(TypeError, match="bool True"):
        l1_unstructured(layer, "weight", True)
    with pytest.raises(ValueError, match=r"no parameter 'weights'; its parameters are \['weight', 'bias'\]"):
        l1_unstructured(layer, "weights", 0.5)
    with pytest.raises(ValueError, match="no parameter 'bias'"):
        l1_unstructured(nn.Linear(4, 3, bias=False), "bias", 0.5)
    l1_unstructured(layer, "weight", 10)
    with pytest.raises(ValueError, match="but only 2 are still unpruned"):
        l1_unstructured(layer, "weight", 3)
    with pytest.raises(ValueError, match=r"2 or more dims; bias has shape \(3,\)"):
        ln_structured(layer, "bias", 1)
    with pytest.raises(ValueError, match="dim=2 is out of range"):
        ln_structured(layer, "weight", 1, dim=2)
    with pytest.raises(ValueError, match="n=0"):
        ln_structured(layer, "weight", 1, n=0)
    with pytest.raises(ValueError, match="unknown scope 'model'"):
        magnitude_prune(nn.Sequential(nn.Linear(2, 2)), 0.5, scope="model")
    with pytest.raises(ValueError, match="Sequential has no nn.Linear layer left to prune"):
        magnitude_prune(nn.Sequential(nn.ReLU()), 0.5)
    with pytest.raises(ValueError, match=r"skip names \['clasifier'\] match no module of Sequential"):
        magnitude_prune(nn.Sequential(nn.Linear(2, 2)), 0.5, skip=["clasifier"])
    with pytest.raises(ValueError, match="at least one"):
        global_unstructured([], 0.5)


def test_structured_refusals_name_the_problem():
    model = tiny_bert()
    with pytest.raises(ValueError, match="would prune all 4 remaining heads of bert.layers.0"):
        prune_heads(model, 1.0)
    with pytest.raises(ValueError, match="would remove every head"):
        mask_heads(model.bert.layers[0].attn, [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"heads \[4\] do not exist"):
        mask_heads(model.bert.layers[0].attn, [4])
    with pytest.raises(ValueError, match="would remove every neuron"):
        mask_neurons(model.bert.layers[0].ff, list(range(37)))
    with pytest.raises(ValueError, match="no EncoderLayer"):
        prune_heads(nn.Sequential(nn.Linear(2, 2)), 0.5)
    with torch.no_grad():
        model.bert.layers[1].attn.out_proj.weight.zero_()
    with pytest.raises(ValueError, match="bert.layers.1 has 0 heads"):
        shrink_structure(model)
    fresh = tiny_bert()
    with pytest.raises(ValueError, match="lacks; its encoder layers are"):
        apply_structure(fresh, {"bert.layers.7": {"n_heads": 2, "d_head": 8, "d_ff": 10}})
    with pytest.raises(ValueError, match=r"n_heads=5 must be an int in \[1, 4\]"):
        apply_structure(fresh, {"bert.layers.0": {"n_heads": 5, "d_head": 8, "d_ff": 10}})
    with pytest.raises(ValueError, match="d_head=16"):
        apply_structure(fresh, {"bert.layers.0": {"n_heads": 2, "d_head": 16, "d_ff": 10}})
    with pytest.raises(ValueError, match=r"initial \(0.5\) <= final \(0.2\)"):
        cubic_sparsity(0, 0.5, 0.2, 0, 10, 1)
    with pytest.raises(ValueError, match="interval must be an int >= 1, got 0"):
        GradualPruner(model, 0.5, interval=0)
