"""QLoRA against transformers + peft + bitsandbytes' Linear4bit (NF4, double quantization) on tiny random BERT and
Llama models with the same weights: 4-bit codes, logits, LoRA gradients, adapter files; training, merging, saving.

The models are 64 wide with 128-wide feed-forwards, so that every weight row holds whole blocks of 64: the CPU
kernel of bitsandbytes 0.50 reads a 2-D weight's constants row by row and decodes other shapes wrongly (see
tests/quant/test_nonuniform.py)."""

import copy

import pytest
import torch
from torch import nn

from tests.conftest import assert_close
from tests.core.bert_pairs import hf_and_ours, padded_batch
from tests.core.decoder_pairs import llama_pair, padded
from tunelab.core.family import hf_module_names
from tunelab.core.grad_checkpoint import gradient_checkpointing
from tunelab.peft.lora import LoRAConfig, apply_lora, load_adapter, lora_layers, merge_lora, save_adapter
from tunelab.peft.qlora import QLoRAConfig, frozen_linear_layers, merge_qlora, prepare_qlora, qlora_layers
from tunelab.quant.linear import Linear4bit, load_quantized, save_quantized
from tunelab.quant.report import size_report, training_memory

peft = pytest.importorskip("peft", reason="the QLoRA parity tests compare with Hugging Face peft")
bnb = pytest.importorskip("bitsandbytes", reason="the QLoRA parity tests need bitsandbytes (the test extra)")

BERT = dict(hidden_size=64, intermediate_size=128)
LLAMA = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
HF_TARGETS = {"bert": ["query", "key", "value", "dense"],  # "dense": both output projections and the pooler
              "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def bnb_quantize(hf: nn.Module, targets) -> nn.Module:
    """Swap the targeted nn.Linear layers of a Hugging Face model for bitsandbytes' NF4 + double-quant layers."""
    for name, module in [(n, m) for n, m in hf.named_modules() if isinstance(m, nn.Linear)]:
        if any(name == t or name.endswith("." + t) for t in targets):
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", blocksize=64)
            # In eval mode, on CPUs with AVX512-BF16, bitsandbytes re-packs a 4-bit weight for a faster kernel
            # with its constants rounded to bfloat16 (errors ~1e-3): the comparison is with its exact path.
            q.support_avx512bf16_for_cpu = False
            if module.bias is not None:
                q.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
            hf.set_submodule(name, q.to("cpu"))  # moving the parameter to a device is what quantizes it
    return hf


def models(family: str, seed: int = 0):
    """(Hugging Face model with bitsandbytes layers, our model), same float weights before quantization."""
    if family == "bert":
        torch.manual_seed(seed)
        hf, ours = hf_and_ours(**BERT)
    else:
        hf, ours = llama_pair(seed, **LLAMA)
    return bnb_quantize(hf, HF_TARGETS[family]), ours


def inputs(family: str, model):
    if family == "bert":
        ids, mask = padded_batch((9, 6, 3), model.config.vocab_size)
    else:
        ids, mask = padded([9, 6, 3], model.config.vocab_size)
    return ids, mask


def logits_of(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask)
    return out if isinstance(out, torch.Tensor) else out.logits


def modules_to_save(family):
    return ("classifier",) if family == "bert" else ()


def config(family, **fields):
    return QLoRAConfig(**{"r": 4, "alpha": 8, "modules_to_save": modules_to_save(family), **fields})


def peft_of(hf, family, use_dora=False):
    task = "SEQ_CLS" if family == "bert" else "CAUSAL_LM"
    lc = peft.LoraConfig(r=4, lora_alpha=8, target_modules=HF_TARGETS[family], task_type=task, use_dora=use_dora,
                         init_lora_weights=False)  # random A and B: the update shows in the logits
    return peft.get_peft_model(hf, lc).eval()


@torch.no_grad()
def copy_adapters(theirs, ours):
    """peft's A, B (and DoRA's magnitude) into ours, by Hugging Face module path; returns the pairs copied."""
    hf, names, pairs = theirs.base_model.model, hf_module_names(ours), []
    for name, layer in lora_layers(ours).items():
        ref, ad = hf.get_submodule(names.get(name, name)), layer.adapters["default"]
        pairs += [(f"{name}.A", ad.A.weight, ref.lora_A["default"].weight),
                  (f"{name}.B", ad.B.weight, ref.lora_B["default"].weight)]
        if hasattr(ad, "magnitude"):
            pairs.append((f"{name}.magnitude", ad.magnitude, ref.lora_magnitude_vector["default"].weight))
    if hasattr(ours, "classifier"):
        ref = hf.classifier.modules_to_save["default"]
        pairs += [("classifier.weight", ours.classifier.copies["default"].weight, ref.weight),
                  ("classifier.bias", ours.classifier.copies["default"].bias, ref.bias)]
    for _, a, b in pairs:
        a.copy_(b)
    return pairs


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_our_4bit_codes_are_bitsandbytes_codes_for_the_same_weights(family):
    hf, ours = models(family)
    prepare_qlora(ours, config(family))
    names = hf_module_names(ours)
    layers = qlora_layers(ours)
    assert len(layers) == sum(isinstance(m, bnb.nn.Linear4bit) for m in hf.modules()) > 0
    for name, layer in layers.items():
        base, ref = layer.base, hf.get_submodule(names.get(name, name))
        state = ref.weight.quant_state
        assert torch.equal(base.packed, ref.weight.data.view(-1)), name
        assert torch.equal(base.absmax_codes, state.absmax), name
        assert torch.equal(base.absmax_scales, state.state2.absmax), name
        assert base.absmax_offset.item() == pytest.approx(state.offset.item(), abs=1e-7), name


@pytest.mark.parametrize("family,use_dora", [("bert", False), ("llama", False), ("llama", True)])
def test_logits_and_lora_gradients_equal_peft_on_bitsandbytes(family, use_dora):
    hf, ours = models(family)
    theirs = peft_of(hf, family, use_dora)
    prepare_qlora(ours, config(family, use_dora=use_dora))
    pairs = copy_adapters(theirs, ours)
    ids, mask = inputs(family, ours)
    real = mask.bool() if family == "llama" else slice(None)
    ours_logits, theirs_logits = logits_of(ours, ids, mask), logits_of(theirs, ids, mask)
    assert (ours_logits[real] - theirs_logits[real]).abs().max() <= 1e-5
    ours_logits[real].square().mean().backward()
    theirs_logits[real].square().mean().backward()
    for name, a, b in pairs:
        assert a.grad is not None and b.grad is not None, name
        assert (a.grad - b.grad).abs().max() <= 1e-5, name


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_our_adapter_loads_in_peft_over_bitsandbytes_and_gives_our_logits(family, tmp_path):
    hf, ours = models(family, seed=3)
    prepare_qlora(ours, config(family))
    with torch.no_grad():
        for layer in lora_layers(ours).values():
            nn.init.normal_(layer.adapters["default"].B.weight, std=0.2)
    save_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in loaded.modules()) == len(qlora_layers(ours))
    ids, mask = inputs(family, ours)
    real = mask.bool() if family == "llama" else slice(None)
    with torch.no_grad():
        assert (logits_of(loaded, ids, mask)[real] - logits_of(ours, ids, mask)[real]).abs().max() <= 1e-5


def test_training_changes_only_the_adapter_and_never_the_4bit_weights():
    _, ours = models("llama")
    prepare_qlora(ours, config("llama"))
    trained = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trained and all(".adapters.default." in n for n in trained)
    codes = {n: b.clone() for n, b in ours.named_buffers()}
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = inputs("llama", ours)
    for _ in range(3):
        logits_of(ours, ids, mask).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(b, codes[n]) for n, b in ours.named_buffers())
    changed = {n for n, p in ours.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in trained if n.endswith("A.weight") or n.endswith("B.weight")}


def test_default_targets_are_every_linear_layer_but_the_output_and_frozen_ones_can_be_4bit_too():
    _, llama = models("llama")
    prepare_qlora(llama, config("llama"))
    linear = [n for n, m in llama.named_modules() if n.endswith(("_proj",))]
    assert sorted(qlora_layers(llama)) == sorted(linear) and isinstance(llama.lm_head, nn.Linear)
    _, bert = models("bert")
    prepare_qlora(bert, config("bert", targets=("q_proj", "v_proj"), quantize_frozen=True))
    frozen4 = [n for n, m in bert.named_modules() if isinstance(m, Linear4bit) and not n.endswith(".base")]
    assert "bert.layers.0.attn.k_proj" in frozen4 and "bert.pooler" in frozen4
    assert not any(n.startswith("classifier") for n in frozen4) and frozen_linear_layers(bert) == []


def test_backward_keeps_no_decoded_weight_activations_equal_float_lora():
    """The 4-bit layers save nothing of their weight for the backward pass: the activations autograd keeps are
    exactly those of LoRA on the float model, and the frozen weights take about 4.127/32 of the float bytes."""
    _, float_model = models("llama")
    _, quant_model = models("llama")
    apply_lora(float_model, LoRAConfig(r=4, alpha=8, targets="all-linear", modules_to_save=()))
    prepare_qlora(quant_model, config("llama"))
    ids, mask = inputs("llama", float_model)
    lora = training_memory(float_model, lambda: logits_of(float_model, ids, mask).sum())
    qlora = training_memory(quant_model, lambda: logits_of(quant_model, ids, mask).sum())
    assert qlora.activations == lora.activations > 0
    assert qlora.trainable == lora.trainable and qlora.optimizer == 2 * qlora.trainable
    layers = qlora_layers(quant_model).values()
    quantized_params = sum(layer.base.in_features * layer.base.out_features for layer in layers)
    assert lora.frozen - qlora.frozen == pytest.approx(quantized_params * (4 - 4.127 / 8), rel=0.02)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(family):
    _, ours = models(family)
    if family == "bert":  # dropout on: the recomputed blocks must draw the same masks
        for m in ours.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.1
    prepare_qlora(ours, config(family))
    ours.train()
    ids, mask = inputs(family, ours)
    results = []
    for checkpointed in (False, True):
        gradient_checkpointing(ours, checkpointed)
        torch.manual_seed(5)
        loss = logits_of(ours, ids, mask).square().mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad}))
        ours.zero_grad()
    (loss0, grads0), (loss1, grads1) = results
    assert loss0 == loss1
    for name in grads0:
        assert_close(grads1[name], grads0[name], rtol=0, atol=1e-7)


def test_float_merge_equals_the_adapted_model_and_requantizing_it_does_not():
    """Merging into the decoded base is exact; coding the merged weights in NF4 again moves each to its nearest
    code: an error of the size of the first quantization's (the float model against its 4-bit copy)."""
    _, ours = models("llama", seed=4)
    float_model = copy.deepcopy(ours)
    prepare_qlora(ours, config("llama"))
    ids, mask = inputs("llama", ours)
    with torch.no_grad():
        first_error = (logits_of(ours, ids, mask) - logits_of(float_model, ids, mask)).abs().max().item()
        for layer in lora_layers(ours).values():
            nn.init.normal_(layer.adapters["default"].B.weight, std=0.05)
        adapted = logits_of(ours, ids, mask)
        requant = merge_qlora(copy.deepcopy(ours), requantize=True)
        merged = merge_qlora(ours)
        assert not lora_layers(merged) and not any(isinstance(m, Linear4bit) for m in merged.modules())
        assert (logits_of(merged, ids, mask) - adapted).abs().max() <= 1e-5
        assert sorted(n for n, m in requant.named_modules() if isinstance(m, Linear4bit)) == sorted(
            n for n, m in merged.named_modules() if n.endswith("_proj"))
        error = (logits_of(requant, ids, mask) - adapted).abs().max().item()
    assert 1e-4 < error < 2 * first_error


def test_lora_merge_refuses_a_4bit_base_by_name():
    _, ours = models("llama")
    prepare_qlora(ours, config("llama"))
    with pytest.raises(ValueError, match="merge_qlora"):
        merge_lora(ours)


@pytest.mark.parametrize("packed", [False, True])
def test_save_and_load_round_trip_gives_identical_logits(packed, tmp_path):
    _, ours = models("bert", seed=6)
    prepare_qlora(ours, config("bert"))
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    ids, mask = inputs("bert", ours)
    expected = logits_of(ours, ids, mask)
    if packed:  # the 4-bit base in the file: a model of the same shape with other float weights loads it
        save_quantized(ours, tmp_path / "qlora.safetensors")
        _, other = models("bert", seed=99)
        rebuilt = load_quantized(prepare_qlora(other, config("bert")), tmp_path / "qlora.safetensors")
    else:  # the adapter only: the base is quantized again from the original weights
        save_adapter(ours, tmp_path)
        _, fresh = models("bert", seed=6)
        rebuilt = load_adapter(prepare_qlora(fresh, config("bert")), tmp_path)
    assert torch.equal(logits_of(rebuilt.eval(), ids, mask), expected)


def test_bfloat16_compute_runs_the_base_in_bfloat16_and_stays_close():
    _, a = models("llama")
    _, b = models("llama")
    prepare_qlora(a, config("llama"))
    prepare_qlora(b, config("llama", compute_dtype="bfloat16"))
    b.load_state_dict(a.state_dict())
    ids, mask = inputs("llama", a)
    with torch.no_grad():
        fp32, bf16 = logits_of(a, ids, mask), logits_of(b, ids, mask)
    assert bf16.dtype == torch.float32
    difference = (fp32 - bf16).abs().max().item()
    assert 0 < difference < 0.05 * fp32.abs().max().item()


def test_bad_settings_are_refused_by_name():
    _, ours = models("llama")
    with pytest.raises(ValueError, match="quant_type"):
        QLoRAConfig(quant_type="int4")
    with pytest.raises(ValueError, match="compute_dtype"):
        QLoRAConfig(compute_dtype="float64")
    with pytest.raises(ValueError, match="blocksize"):
        QLoRAConfig(blocksize=48)
    with pytest.raises(ValueError, match="unknown QLoRAConfig fields"):
        prepare_qlora(ours, rank=4)
    with pytest.raises(ValueError, match="exceeds"):
        prepare_qlora(ours, config("llama", r=65))


def test_embeddings_can_be_stored_in_4_bits_unless_tied_to_the_output():
    _, bert = models("bert")
    float_bytes = size_report(bert).bytes
    prepare_qlora(bert, config("bert", quantize_frozen=True, quantize_embeddings=True))
    table = bert.bert.embeddings.word_embeddings
    assert isinstance(table.store, Linear4bit) and table.store.double_quant
    ids, mask = inputs("bert", bert)
    logits_of(bert, ids, mask).sum().backward()  # the adapters still get their gradients
    assert all(p.grad is not None for n, p in bert.named_parameters() if p.requires_grad)
    memory = training_memory(bert, lambda: torch.zeros(()))
    assert memory.frozen < 0.25 * float_bytes  # 4.127 bits for all but norms, biases and positions
    with torch.no_grad():
        adapted = logits_of(bert, ids, mask)
        merged = merge_qlora(bert)
        assert isinstance(merged.bert.embeddings.word_embeddings, nn.Embedding)
        assert (logits_of(merged, ids, mask) - adapted).abs().max() <= 1e-5
    _, tied = llama_pair(0, tie_word_embeddings=True, **LLAMA)
    with pytest.raises(ValueError, match="tied"):
        prepare_qlora(tied, config("llama", quantize_embeddings=True))


def test_parameter_counts_include_the_4bit_weights_as_frozen():
    from tunelab.peft.selective import count_parameters

    _, float_model = models("bert")
    _, quant_model = models("bert")
    apply_lora(float_model, LoRAConfig(r=4, alpha=8, targets="all-linear"))
    prepare_qlora(quant_model, config("bert", quantize_embeddings=True))
    assert count_parameters(quant_model) == count_parameters(float_model)


def test_gpt2_trains_and_merges_through_the_same_family_interface():
    from tests.core.decoder_pairs import gpt_pair

    _, gpt = gpt_pair(n_embd=64, n_head=4)
    prepare_qlora(gpt, config("llama"))
    assert sorted(qlora_layers(gpt)) == sorted(n for n, _ in gpt.named_modules() if n.endswith(("c_attn", "c_proj",
                                                                                                "c_fc")))
    ids, mask = padded([7, 5], gpt.config.vocab_size)
    gpt(ids, mask).square().mean().backward()
    trained = {n: p for n, p in gpt.named_parameters() if p.requires_grad}
    assert all(p.grad is not None for p in trained.values())  # B = 0 at the start: only B's gradient is non-zero
    assert all(p.grad.abs().sum() > 0 for n, p in trained.items() if n.endswith("B.weight"))
    with torch.no_grad():
        for layer in lora_layers(gpt).values():
            nn.init.normal_(layer.adapters["default"].B.weight, std=0.05)
        adapted = gpt(ids, mask)
        assert (merge_qlora(gpt)(ids, mask) - adapted).abs().max() <= 1e-5
