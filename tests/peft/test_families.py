"""Every PEFT method reads a model family's description, not its classes: LoRA on GPT-2 and Llama against peft."""

import pytest
import torch

from tests.core.decoder_pairs import gpt_pair, llama_pair, padded
from tunelab.core.family import family_of
from tunelab.peft.lora import LoRAConfig, apply_lora, load_adapter, lora_layers, save_adapter

peft = pytest.importorskip("peft", reason="the parity tests compare with Hugging Face peft")

FAMILIES = {"gpt": (gpt_pair, ("c_attn", "c_proj", "c_fc")), "llama": (llama_pair, ("q_proj", "v_proj", "down_proj"))}


def peft_model(hf, targets, seed=0):
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False,
                             task_type="CAUSAL_LM")
    return peft.get_peft_model(hf, config)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adapter_loads_into_ours_with_equal_logits_and_gradients(family, tmp_path):
    make, targets = FAMILIES[family]
    hf, ours = make()
    theirs = peft_model(hf, targets)
    theirs.save_pretrained(tmp_path)
    load_adapter(ours, tmp_path)
    assert len(lora_layers(ours)) == sum(1 for n, _ in theirs.named_modules() if n.endswith(targets) and
                                         hasattr(theirs.get_submodule(n), "lora_A"))
    ids, mask = padded([7, 4], ours.config.vocab_size)
    theirs_logits, ours_logits = theirs(ids, attention_mask=mask).logits, ours(ids, mask)
    real = mask.bool()
    assert (theirs_logits[real] - ours_logits[real]).abs().max() <= 1e-5
    (theirs_logits[real].square().mean()).backward()
    (ours_logits[real].square().mean()).backward()
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    compared = 0
    for name, p in theirs.named_parameters():
        if "lora_" in name:
            path = name.removeprefix("base_model.model.").replace(".default", "")
            ours_name = path.replace("lora_A.weight", "adapters.default.A.weight").replace(
                "lora_B.weight", "adapters.default.B.weight")
            assert (p.grad - ours_grads[ours_name]).abs().max() <= 1e-5, name
            compared += 1
    assert compared == 2 * len(lora_layers(ours))


@pytest.mark.parametrize("family", FAMILIES)
def test_our_adapter_loads_into_peft_with_equal_logits(family, tmp_path):
    make, targets = FAMILIES[family]
    hf, ours = make(seed=2)
    apply_lora(ours, LoRAConfig(r=4, alpha=8, targets=targets, modules_to_save=()))
    for layer in lora_layers(ours).values():  # B starts at zero; make the update visible
        torch.nn.init.normal_(layer.adapters["default"].B.weight, std=0.2)
    save_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    assert loaded.peft_config["default"].fan_in_fan_out is (family == "gpt")
    assert loaded.peft_config["default"].task_type == "CAUSAL_LM"
    ids = torch.randint(3, ours.config.vocab_size, (2, 6))
    with torch.no_grad():
        assert (loaded(ids).logits - ours(ids)).abs().max() <= 1e-5
        merged = loaded.merge_and_unload()  # peft's merge transposes the update for Conv1D: fan_in_fan_out
        assert (merged(ids).logits - ours(ids)).abs().max() <= 1e-5


def test_each_family_describes_itself():
    _, gpt = gpt_pair()
    _, llama = llama_pair()
    assert family_of(gpt).name == "gpt2" and family_of(llama).name == "llama"
    assert family_of(gpt).embeddings(gpt) is gpt.transformer.wte
    assert family_of(llama).blocks(llama) is llama.model.layers
    assert family_of(gpt).is_transposed("transformer.h.0.attn.c_attn") and not family_of(llama).is_transposed(
        "model.layers.0.self_attn.q_proj")
    assert family_of(torch.nn.Linear(2, 2)) is None


def test_an_adapter_mixing_conv1d_and_linear_layers_is_refused_for_peft(tmp_path):
    _, ours = gpt_pair()
    apply_lora(ours, LoRAConfig(r=2, targets=("c_attn", "lm_head"), modules_to_save=()))
    with pytest.raises(ValueError, match="mix Conv1D layers with Linear ones"):
        save_adapter(ours, tmp_path)


IA3_TARGETS = {"gpt": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
               "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"])}


@pytest.mark.parametrize("family", FAMILIES)
def test_ia3_adapters_cross_between_peft_and_ours(family, tmp_path):
    from tunelab.peft.ia3 import ia3_layers
    from tunelab.peft.ia3 import load_adapter as load_ia3
    from tunelab.peft.ia3 import save_adapter as save_ia3

    make, _ = FAMILIES[family]
    hf, ours = make(seed=3)
    targets, feedforward = IA3_TARGETS[family]
    theirs = peft.get_peft_model(hf, peft.IA3Config(target_modules=targets, feedforward_modules=feedforward,
                                                    task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    for name, p in theirs.named_parameters():
        if "ia3_l" in name:
            p.data.normal_(1.0, 0.3)  # away from the identity start, so the comparison can fail
    theirs.save_pretrained(tmp_path / "theirs")
    load_ia3(ours, tmp_path / "theirs")
    assert len(ia3_layers(ours)) == len(targets) * len(family_of(ours).blocks(ours))
    ids = torch.randint(3, ours.config.vocab_size, (2, 6))
    with torch.no_grad():
        expected = theirs(ids).logits
        assert (ours(ids) - expected).abs().max() <= 1e-5
    save_ia3(ours, tmp_path / "ours")
    hf_again, _ = make(seed=3)
    back = peft.PeftModel.from_pretrained(hf_again, tmp_path / "ours").eval()
    assert back.peft_config["default"].fan_in_fan_out is (family == "gpt")
    with torch.no_grad():
        assert (back(ids).logits - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_last_layers_train_the_top_block_the_final_norm_and_the_head(family):
    from tunelab.peft.selective import train_last_layers

    _, ours = FAMILIES[family][0]()
    train_last_layers(ours, 1, modules_to_save=("lm_head",))
    trained = {n for n, p in ours.named_parameters() if p.requires_grad}
    top = "transformer.h.1." if family == "gpt" else "model.layers.1."
    norm = "transformer.ln_f." if family == "gpt" else "model.norm."
    assert trained and all(n.startswith((top, norm, "lm_head")) or n == "transformer.wte.weight" for n in trained)
    assert any(n.startswith(top) for n in trained) and any(n.startswith(norm) for n in trained)
    assert not any(n.startswith(top.replace(".1.", ".0.")) for n in trained)


def test_bitfit_trains_the_biases_of_gpt2_and_refuses_llama_which_has_none():
    from tunelab.peft.selective import apply_bitfit

    _, gpt = gpt_pair()
    apply_bitfit(gpt, modules_to_save=())
    trained = [n for n, p in gpt.named_parameters() if p.requires_grad]
    assert trained and all(n.endswith(".bias") for n in trained)
    _, llama = llama_pair()
    with pytest.raises(ValueError, match="no bias parameter"):
        apply_bitfit(llama, modules_to_save=())


# ---------------------------------------------------------------- prompt and prefix tuning on decoders

P = 4  # virtual tokens


def soft_prompt_pair(family, method, seed=0):
    """peft's soft-prompt model and ours on the same tiny decoder, with the same (perturbed) virtual tokens."""
    from tunelab.peft.prompt import apply_prefix_tuning, apply_prompt_tuning

    hf, ours = FAMILIES[family][0](seed=seed)
    make = peft.PromptTuningConfig if method == "prompt" else peft.PrefixTuningConfig
    theirs = peft.get_peft_model(hf, make(task_type="CAUSAL_LM", num_virtual_tokens=P)).eval()
    apply = apply_prompt_tuning if method == "prompt" else apply_prefix_tuning
    wrapper = apply(ours, num_virtual_tokens=P, modules_to_save=()).eval()
    theirs_weight = theirs.prompt_encoder["default"].embedding.weight
    ours_weight = wrapper.prompt_embeddings if method == "prompt" else wrapper.prefix_embeddings
    with torch.no_grad():
        theirs_weight.add_(0.1 * torch.randn_like(theirs_weight))
        ours_weight.copy_(theirs_weight)
    return theirs, wrapper, theirs_weight, ours_weight


SOFT_PROMPTS = [(f, m) for f in FAMILIES for m in ("prompt", "prefix")]


@pytest.mark.parametrize("family,method", SOFT_PROMPTS)
def test_soft_prompts_give_pefts_logits_and_gradients(family, method):
    theirs, wrapper, theirs_weight, ours_weight = soft_prompt_pair(family, method)
    assert [n for n, p in wrapper.named_parameters() if p.requires_grad] == [
        "prompt_embeddings" if method == "prompt" else "prefix_embeddings"]
    assert ours_weight.numel() == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    ids, mask = padded([7, 4], wrapper.model.config.vocab_size)
    theirs_logits, ours_logits = theirs(input_ids=ids, attention_mask=mask).logits, wrapper(ids, mask)
    extra = P if method == "prompt" else 0  # prompt tuning's output covers the virtual positions too, as peft's
    assert ours_logits.shape == (2, ids.shape[1] + extra, wrapper.model.config.vocab_size)
    real = torch.cat([mask.new_ones(2, extra), mask], dim=1).bool()
    assert (theirs_logits[real] - ours_logits[real]).abs().max() <= 1e-5
    theirs_logits[real].square().mean().backward()
    ours_logits[real].square().mean().backward()
    assert ours_weight.grad.abs().max() > 0
    assert (theirs_weight.grad - ours_weight.grad).abs().max() <= 1e-5


@pytest.mark.parametrize("family,method", SOFT_PROMPTS)
def test_soft_prompt_adapter_files_cross_between_peft_and_ours(family, method, tmp_path):
    from tunelab.peft.prompt import load_adapter as load_prompt
    from tunelab.peft.prompt import save_adapter as save_prompt

    theirs, wrapper, _, _ = soft_prompt_pair(family, method, seed=5)
    theirs.save_pretrained(tmp_path / "theirs")
    _, fresh, _, _ = soft_prompt_pair(family, method, seed=5)
    with torch.no_grad():
        fresh_weight = fresh.prompt_embeddings if method == "prompt" else fresh.prefix_embeddings
        fresh_weight.zero_()  # only the file can make it equal again
    load_prompt(fresh, tmp_path / "theirs")
    ids = torch.randint(3, wrapper.model.config.vocab_size, (2, 6))
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        assert (fresh(ids) - expected).abs().max() <= 1e-5
    save_prompt(wrapper, tmp_path / "ours")
    hf_again, _ = FAMILIES[family][0](seed=5)
    back = peft.PeftModel.from_pretrained(hf_again, tmp_path / "ours").eval()
    assert back.peft_config["default"].task_type == "CAUSAL_LM"
    with torch.no_grad():
        assert (back(input_ids=ids).logits - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("family,method", SOFT_PROMPTS)
def test_generation_with_a_soft_prompt_equals_pefts_and_the_uncached_loop(family, method):
    from tunelab.core.generate import generate

    theirs, wrapper, _, _ = soft_prompt_pair(family, method, seed=7)
    ids = torch.randint(3, wrapper.model.config.vocab_size, (1, 5))
    expected = theirs.generate(input_ids=ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = generate(wrapper, ids, 16, eos_token_id=[])
    assert torch.equal(out, expected[:, -21:])  # the prompt ids followed by the new tokens
    assert torch.equal(generate(wrapper, ids, 16, eos_token_id=[], use_cache=False), out)
    with torch.no_grad():  # the soft prompt changes the next-token distribution
        assert (wrapper(ids)[:, -1] - wrapper.model(ids)[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("family,method", SOFT_PROMPTS)
def test_a_left_padded_row_generates_with_a_soft_prompt_what_it_generates_alone(family, method):
    from tunelab.core.generate import generate

    _, wrapper, _, _ = soft_prompt_pair(family, method, seed=8)
    ids, mask = padded([6, 3], wrapper.model.config.vocab_size, left=True, seed=2)
    out = generate(wrapper, ids, 12, attention_mask=mask, eos_token_id=[])
    alone = generate(wrapper, ids[1:, -3:], 12, eos_token_id=[])
    assert torch.equal(out[1, -12:], alone[0, -12:])


def test_bottleneck_adapters_start_as_the_identity_on_decoders_and_train_only_themselves():
    from tunelab.peft.adapters import adapter_parameters, adapter_style, apply_adapters

    for family, (make, _) in FAMILIES.items():
        for style in ("houlsby", "pfeiffer"):
            _, ours = make()
            ids, mask = padded([7, 4], ours.config.vocab_size)
            with torch.no_grad():
                before = ours(ids, mask)
            names_before = set(ours.state_dict())
            apply_adapters(ours, style=style, reduction_factor=4, modules_to_save=())
            assert adapter_style(ours) == style
            assert names_before <= set(ours.state_dict())  # the model's own weights keep their names
            blocks = len(family_of(ours).blocks(ours))
            assert len(adapter_parameters(ours)) == 4 * blocks * (2 if style == "houlsby" else 1)
            with torch.no_grad():
                assert torch.equal(ours(ids, mask), before)
            assert {n for n, p in ours.named_parameters() if p.requires_grad} == set(adapter_parameters(ours))
            with torch.no_grad():
                for p in adapter_parameters(ours).values():
                    p.normal_(std=0.5)
                assert (ours(ids, mask) - before).abs().max() > 1e-3, (family, style)


@pytest.mark.parametrize("family", FAMILIES)
def test_all_linear_targets_every_linear_layer_but_the_outputs(family):
    make, _ = FAMILIES[family]
    _, ours = make()
    linear = {n for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear)}
    apply_lora(ours, LoRAConfig(r=2, targets="all-linear", modules_to_save=()))
    assert "lm_head" in linear and set(lora_layers(ours)) == linear - {"lm_head"}
    with pytest.raises(ValueError, match="family description"):
        apply_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoRAConfig(r=2, targets="all-linear",
                                                                         modules_to_save=()))
