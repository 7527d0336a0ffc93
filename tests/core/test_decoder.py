"""Our GPT-2 and Llama against transformers' with the same random weights: logits, every layer, the cache, a step."""

import pytest
import torch
import transformers

from tests.core.decoder_pairs import ALL, gpt_pair, llama_pair, pair, padded
from tunelab.core import decoder
from tunelab.core.decoder import (
    GPT,
    GPTConfig,
    KVCache,
    Llama,
    LlamaConfig,
    apply_rotary,
    decoder_from_hf_config,
    hf_to_tunelab_state_dict,
    rotate_half,
    tunelab_to_hf_state_dict,
)


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", ALL)
def test_logits_and_hidden_states_equal_hugging_face(name):
    hf, ours = pair(name)
    ids, mask = padded([9, 5, 1], ours.config.vocab_size)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, output_hidden_states=True)
        _, states = ours.forward_hidden(ids, mask, output_hidden_states=True)
        logits = ours(ids, mask)
    real = mask.bool()
    assert len(states) == len(expected.hidden_states) == len(ours.blocks) + 1
    for layer, (a, b) in enumerate(zip(states, expected.hidden_states)):
        assert max_diff(a[real], b[real]) <= 1e-5, f"hidden states of layer {layer}"
    assert max_diff(logits[real], expected.logits[real]) <= 1e-5


@pytest.mark.parametrize("attn_impl", ["fused", "explicit"])
def test_a_mask_without_padding_takes_the_causal_path_and_equals_hugging_face(attn_impl, monkeypatch):
    hf, ours = llama_pair(attn_impl=attn_impl)
    ids = torch.randint(0, ours.config.vocab_size, (2, 7))
    built = []
    make_bias = decoder.make_attention_bias
    monkeypatch.setattr(decoder, "make_attention_bias", lambda *a, **k: built.append(a[0]) or make_bias(*a, **k))
    with torch.no_grad():
        expected = hf(ids, attention_mask=torch.ones_like(ids)).logits
        logits = ours(ids, torch.ones_like(ids))
    assert all(mask is None for mask in built)  # the mask of ones was dropped before any layer read it
    assert (len(built) == 0) == (attn_impl == "fused")  # the fused kernel masks by itself (is_causal)
    assert max_diff(logits, expected) <= 1e-5
    with torch.no_grad():
        assert torch.equal(logits, ours(ids))


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "llama-mqa-theta"])
def test_left_padding_with_position_ids_equals_hugging_face_and_the_row_alone(name):
    hf, ours = pair(name)
    ids, mask = padded([8, 3, 6], ours.config.vocab_size, left=True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=positions).logits
        logits = ours(ids, mask, positions)
        alone = ours(ids[1:2, -3:])  # row 1 without its padding
    real = mask.bool()
    assert max_diff(logits[real], expected[real]) <= 1e-5
    assert max_diff(logits[1, -3:], alone[0]) <= 1e-5


@pytest.mark.parametrize("attn_impl", ["fused", "explicit"])
@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_cached_logits_equal_the_full_forward(family, attn_impl):
    _, ours = (gpt_pair if family == "gpt" else llama_pair)(attn_impl=attn_impl)
    ids, mask = padded([10, 7], ours.config.vocab_size, left=True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = ours(ids, mask, positions)
        cache = ours.new_cache(2, 16)
        parts = [ours(ids[:, :6], mask[:, :6], positions[:, :6], cache)]  # the prompt, then one token at a time
        for t in range(6, 10):
            parts.append(ours(ids[:, t:t + 1], mask[:, :t + 1], positions[:, t:t + 1], cache))
    assert cache.length == 10
    real = mask.bool()
    assert max_diff(torch.cat(parts, dim=1)[real], full[real]) <= 1e-5


def test_cache_without_a_mask_several_tokens_at_a_time():
    _, ours = llama_pair()
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(2, 9)
        cached = torch.cat([ours(ids[:, :4], cache=cache), ours(ids[:, 4:7], cache=cache),
                            ours(ids[:, 7:], cache=cache)], dim=1)
    assert max_diff(cached, full) <= 1e-5


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_one_training_step_equals_hugging_face(family):
    hf, ours = (gpt_pair if family == "gpt" else llama_pair)()
    hf.train(), ours.train()
    ids, mask = padded([9, 6], ours.config.vocab_size)
    labels = ids.masked_fill(~mask.bool(), -100)
    expected = hf(ids, attention_mask=mask, labels=labels).loss
    logits = ours(ids, mask)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    expected.backward()
    loss.backward()
    assert abs(loss.item() - expected.item()) <= 1e-5
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    ours_grads = hf_to_tunelab_state_dict(ours, {n: p.grad for n, p in hf.named_parameters()})
    for name, p in ours.named_parameters():
        assert max_diff(p.grad, ours_grads[name]) <= 1e-5, name
    assert hf_grads


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "llama-mha-tied"])
def test_state_dict_round_trip_loads_in_hugging_face(name):
    hf, ours = pair(name, seed=1)
    state = tunelab_to_hf_state_dict(ours)
    if ours.config.tie_word_embeddings:
        assert "lm_head.weight" not in state
    config = ours.config.to_hf_dict(type(hf).__name__)
    fresh = type(hf)(type(hf.config)(**config)).eval()
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ids = torch.randint(3, ours.config.vocab_size, (2, 7))
    with torch.no_grad():
        assert max_diff(fresh(ids).logits, ours(ids)) <= 1e-5


def test_gpt2_weights_are_transposed_conv1d_and_the_head_is_tied():
    hf, ours = gpt_pair()
    conv = hf.transformer.h[0].attn.c_attn
    assert isinstance(conv, transformers.pytorch_utils.Conv1D)
    assert torch.equal(ours.transformer.h[0].attn.c_attn.weight, conv.weight.t())
    assert ours.lm_head.weight is ours.transformer.wte.weight


def test_tied_llama_head_shares_the_embedding_and_untied_does_not():
    tied, untied = Llama(LlamaConfig.tiny(tie_word_embeddings=True)), Llama(LlamaConfig.tiny())
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_rotary_is_a_rotation_of_each_half_split_pair():
    x = torch.randn(1, 1, 3, 8)
    angle = torch.rand(1, 1, 3, 4) * 6
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    y = apply_rotary(x, cos, sin)
    assert torch.allclose(rotate_half(rotate_half(x)), -x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-6)  # a rotation keeps the length
    # pair (0, 4) rotates by angle[..., 0]
    expected0 = x[..., 0] * angle[..., 0].cos() - x[..., 4] * angle[..., 0].sin()
    assert torch.allclose(y[..., 0], expected0, atol=1e-6)


def test_config_round_trip_through_hugging_face_dicts():
    llama = LlamaConfig.tiny(rope_theta=123.0, head_dim=16)
    hf = transformers.LlamaConfig(**llama.to_hf_dict("LlamaForCausalLM"))
    back = LlamaConfig.from_hf_dict(hf.to_dict())
    assert back == llama
    gpt = GPTConfig.tiny(n_inner=40)
    assert GPTConfig.from_hf_dict(transformers.GPT2Config(**gpt.to_hf_dict("GPT2LMHeadModel")).to_dict()) == gpt
    assert isinstance(decoder_from_hf_config(hf.to_dict()), Llama)
    assert isinstance(decoder_from_hf_config({"model_type": "gpt2", **gpt.to_hf_dict("GPT2LMHeadModel")}), GPT)


@pytest.mark.parametrize("bad, message", [
    (dict(num_attention_heads=4, num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(hidden_size=30, num_attention_heads=4), "divisible"),
    (dict(head_dim=7), "even"),
    (dict(hidden_act="tanhh"), "hidden_act"),
])
def test_bad_llama_configs_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig.tiny(**bad)


def test_unsupported_hugging_face_options_are_refused():
    with pytest.raises(ValueError, match="rope type 'linear'"):
        LlamaConfig.from_hf_dict({"rope_parameters": {"rope_type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        GPTConfig.from_hf_dict({"scale_attn_by_inverse_layer_idx": True})
    with pytest.raises(ValueError, match="not a decoder"):
        decoder_from_hf_config({"model_type": "bert"})


def test_bad_inputs_are_refused_by_name():
    _, ours = gpt_pair()
    with pytest.raises(ValueError, match="input_ids must lie in"):
        ours(torch.tensor([[1, 200]]))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        ours(torch.tensor([[1, 2]]), torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="learned positions"):
        ours(torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="shape \\(B, T\\)"):
        ours(torch.ones(3, dtype=torch.long))
    cache = ours.new_cache(1, 4)
    ours(torch.ones(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="room for 4 positions"):
        ours(torch.ones(1, 2, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="cache holds 1 sequences"):
        ours(torch.ones(2, 1, dtype=torch.long), cache=cache)


def test_a_checkpoint_that_does_not_fit_is_refused_with_the_names():
    hf, ours = llama_pair()
    state = dict(hf.state_dict())
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(1)
    del state["model.norm.weight"]
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError) as error:
        hf_to_tunelab_state_dict(ours, state)
    text = str(error.value)
    assert "self_attn.extra.weight" in text and "model.norm.weight" in text and "up_proj.weight: file (3, 3)" in text


def test_kv_cache_is_preallocated_and_reorders_rows():
    cache = KVCache(n_layers=2, batch_size=3, n_kv_heads=2, head_dim=4, max_length=8)
    k = torch.randn(3, 2, 5, 4)
    keys, _ = cache.update(0, k, k)
    assert keys.shape == (3, 2, 5, 4) and keys.data_ptr() == cache.keys.data_ptr()
    cache.reorder(torch.tensor([2, 0]))
    assert cache.batch_size == 2 and torch.equal(cache.keys[0, 0, :, :5], k[2])


def test_llama_rmsnorm_runs_in_float32_under_bf16():
    _, ours = llama_pair()
    ids = torch.randint(3, 97, (2, 6))
    with torch.no_grad():
        full = ours(ids)
        half = ours.to(torch.bfloat16)(ids).float()
    assert max_diff(half, full) < 0.1


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_inputs_embeds_equal_hugging_face(family):
    hf, ours = (gpt_pair if family == "gpt" else llama_pair)()
    embeds = torch.randn(2, 6, ours.input_embeddings().embedding_dim)
    with torch.no_grad():
        assert (ours(inputs_embeds=embeds) - hf(inputs_embeds=embeds).logits).abs().max() <= 1e-5
        ids = torch.randint(3, 97, (2, 6))
        assert torch.equal(ours(inputs_embeds=ours.input_embeddings()(ids)), ours(ids))
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        ours(ids, inputs_embeds=embeds)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_a_prefilled_cache_equals_hugging_face_past_key_values(family):
    """Prefix tuning's path: P given key/value positions in front, positions of the tokens starting at P."""
    from transformers import DynamicCache

    hf, ours = (gpt_pair if family == "gpt" else llama_pair)()
    B, P, T = 2, 3, 5
    shape = (B, ours.n_kv_heads, P, ours.head_dim)
    prefixes = [(torch.randn(shape), torch.randn(shape)) for _ in ours.blocks]
    ids = torch.randint(3, 97, (B, T))
    mask = torch.ones(B, P + T, dtype=torch.long)
    mask[1, P:P + 2] = 0  # padding inside the tokens too (right after the prefix: a left-padded row)
    past = DynamicCache()
    for layer, (k, v) in enumerate(prefixes):
        past.update(k.clone(), v.clone(), layer)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, past_key_values=past).logits
        cache = ours.new_cache(B, P + T + 4).prefill(prefixes)
        logits = ours(ids, mask, cache=cache)
    real = mask[:, P:].bool()
    assert cache.length == P + T
    assert (logits[real] - expected[real]).abs().max() <= 1e-5
