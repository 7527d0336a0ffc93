"""freeze, BitFit, training the last k layers, and parameter counts equal to peft's."""

import peft
import pytest
import torch
import transformers

from tests.peft.pairs import trainable_names
from tests.peft.training_checks import assert_only_trainable_changed, train_steps
from tunelab.core.bert import BertConfig, BertForMaskedLM, BertForSequenceClassification
from tunelab.core.classifier import ClassifierConfig, TransformerClassifier
from tunelab.core.io import read_safetensors
from tunelab.peft.selective import (
    ParameterCount,
    apply_bitfit,
    count_parameters,
    freeze,
    load_adapter,
    save_adapter,
    train_last_layers,
    unfreeze,
)


def tiny_bert(**overrides):
    return BertForSequenceClassification(BertConfig.tiny(**overrides))


# --- freeze, unfreeze, count_parameters ---------------------------------------------------------------------

def test_freeze_and_unfreeze_switch_every_parameter_and_return_the_model():
    model = tiny_bert()
    assert freeze(model) is model
    assert all(not p.requires_grad for p in model.parameters())
    assert count_parameters(model) == ParameterCount(total=sum(p.numel() for p in model.parameters()), trainable=0)
    assert unfreeze(model) is model
    assert all(p.requires_grad for p in model.parameters())


def test_parameter_count_prints_like_peft():
    count = ParameterCount(total=21_134, trainable=1_090)
    assert str(count) == "trainable params: 1,090 || all params: 21,134 || trainable%: 5.1576"
    assert count.percent == pytest.approx(100 * 1090 / 21134)
    assert ParameterCount(total=0, trainable=0).percent == 0.0


def test_count_parameters_of_bert_equals_the_formula_and_counts_tied_weights_once():
    c = BertConfig.tiny()
    C, F, V, N, L = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers, c.num_labels
    embeddings = (V + c.max_position_embeddings + c.type_vocab_size) * C + 2 * C
    layer = 4 * (C * C + C) + (C * F + F) + (F * C + C) + 4 * C
    pooler, classifier = C * C + C, C * L + L
    assert count_parameters(tiny_bert()) == ParameterCount(embeddings + N * layer + pooler + classifier,
                                                           embeddings + N * layer + pooler + classifier)
    # The MLM decoder *is* the word-embedding matrix: it adds only the transform, its norm and a bias.
    mlm = count_parameters(BertForMaskedLM(c))
    assert mlm.total == embeddings + N * layer + (C * C + C) + 2 * C + V


def hf_bert_classifier():
    config = BertConfig.tiny()
    return transformers.BertForSequenceClassification(transformers.BertConfig(**config.to_hf_dict())).eval()


@pytest.mark.parametrize("make_peft_config", [
    lambda: peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]),
    lambda: peft.LoraConfig(r=2, target_modules=["dense"], modules_to_save=["classifier"], use_dora=True),
    lambda: peft.IA3Config(task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"],
                           feedforward_modules=["output.dense"]),
    lambda: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5),
], ids=["lora", "dora", "ia3", "prompt_tuning"])
def test_count_parameters_of_a_peft_model_equals_peft(make_peft_config, capsys):
    model = peft.get_peft_model(hf_bert_classifier(), make_peft_config())
    trainable, total = model.get_nb_trainable_parameters()
    count = count_parameters(model)
    assert (count.trainable, count.total) == (trainable, total)
    assert 0 < trainable < total
    model.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == str(count)


# --- BitFit ---------------------------------------------------------------------------------------------------

def test_bitfit_on_bert_trains_exactly_the_biases_and_the_classifier():
    model = apply_bitfit(tiny_bert())
    c = model.config
    C, F, N, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_labels
    # per layer: q, k, v, out (4C) + linear1 (F) + linear2 (C) + norm1, norm2 (2C); embedding norm, pooler (C each)
    assert count_parameters(model).trainable == N * (7 * C + F) + 2 * C + (C * L + L)
    per_layer = [f"attn.{p}.bias" for p in ("q_proj", "k_proj", "v_proj", "out_proj")] + [
        "ff.linear1.bias", "ff.linear2.bias", "norm1.bias", "norm2.bias"]
    expected = {f"bert.layers.{i}.{name}" for i in range(N) for name in per_layer}
    expected |= {"bert.embeddings.norm.bias", "bert.pooler.bias", "classifier.weight", "classifier.bias"}
    assert trainable_names(model) == expected


def test_bitfit_training_changes_only_biases_and_the_classifier():
    model = apply_bitfit(tiny_bert())
    before, losses = train_steps(model)
    assert_only_trainable_changed(model, before, losses)


def test_bitfit_on_the_from_scratch_classifier_with_its_head():
    c = ClassifierConfig.tiny()
    model = apply_bitfit(TransformerClassifier(c), modules_to_save=("head",))
    C, F, N = c.d_model, c.d_ff, c.n_layers
    # pre-norm: the same 7C + d_ff per layer, the final LayerNorm's bias, the head in full
    assert count_parameters(model).trainable == N * (7 * C + F) + C + (C * c.num_classes + c.num_classes)
    before, losses = train_steps(model, vocab_size=c.vocab_size)
    assert_only_trainable_changed(model, before, losses)


def test_bitfit_refuses_a_head_that_does_not_exist_and_leaves_the_model_untouched():
    model = TransformerClassifier(ClassifierConfig.tiny())
    with pytest.raises(ValueError, match=r"modules_to_save \['classifier'\] matched no module; .*'head'"):
        apply_bitfit(model)  # the from-scratch model's head is called `head`
    assert all(p.requires_grad for p in model.parameters())


def test_bitfit_refuses_a_model_without_biases():
    with pytest.raises(ValueError, match="apply_bitfit found no bias parameter"):
        apply_bitfit(torch.nn.Sequential(torch.nn.Linear(3, 3, bias=False)), modules_to_save=())


# --- train_last_layers ----------------------------------------------------------------------------------------

def test_train_last_layers_trains_the_top_layer_the_pooler_and_the_classifier():
    model = train_last_layers(tiny_bert(num_hidden_layers=3), k=1)
    expected = {n for n, _ in model.named_parameters()
                if n.startswith(("bert.layers.2.", "bert.pooler.", "classifier."))}
    assert trainable_names(model) == expected
    c = model.config
    C, F, L = c.hidden_size, c.intermediate_size, c.num_labels
    layer = 4 * (C * C + C) + (C * F + F) + (F * C + C) + 4 * C
    assert count_parameters(model).trainable == layer + (C * C + C) + (C * L + L)
    before, losses = train_steps(model)
    assert_only_trainable_changed(model, before, losses)


@pytest.mark.parametrize("k", [1, 2])
def test_train_last_layers_of_the_from_scratch_classifier_includes_its_final_norm(k):
    model = train_last_layers(TransformerClassifier(ClassifierConfig.tiny(n_layers=2)), k, modules_to_save=("head",))
    prefixes = tuple(f"layers.{i}." for i in range(2 - k, 2)) + ("final_norm.", "head.")
    assert trainable_names(model) == {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


@pytest.mark.parametrize("k", [0, 3, -1, 1.0, True])
def test_train_last_layers_refuses_k_outside_the_layer_count(k):
    model = tiny_bert()  # 2 layers
    with pytest.raises(ValueError, match=r"k must be an int between 1 and the number of layers in 'bert.layers' "
                                         r"\(2\), got"):
        train_last_layers(model, k)
    assert all(p.requires_grad for p in model.parameters())


def test_train_last_layers_refuses_a_model_without_a_layer_stack():
    with pytest.raises(ValueError, match="expected one nn.ModuleList named 'layers', found none"):
        train_last_layers(torch.nn.Sequential(torch.nn.Linear(3, 3)), 1, modules_to_save=())


def test_save_adapter_writes_what_trains_and_load_adapter_refuses_another_selection(tmp_path):
    torch.manual_seed(0)
    trained = apply_bitfit(tiny_bert())
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    folder = save_adapter(trained, tmp_path / "bitfit", "bitfit")
    assert set(read_safetensors(folder / "adapter_model.safetensors")) == trainable_names(trained)
    fresh = tiny_bert()
    fresh.load_state_dict({k: v for k, v in trained.state_dict().items() if not k.endswith("bias")}, strict=False)
    load_adapter(apply_bitfit(fresh), folder)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trained.state_dict().values()))
    with pytest.raises(ValueError, match=r"trainable parameters \(it holds a bitfit adapter\): missing tensors"):
        load_adapter(train_last_layers(tiny_bert(), 1), folder)
    with pytest.raises(ValueError, match="no trainable parameters"):
        save_adapter(freeze(tiny_bert()), tmp_path / "nothing")
