"""Our BERT against transformers' BERT with the same random weights: every layer, every head, one step."""

import pytest
import torch
import transformers

from tests.core.bert_pairs import hf_and_ours, padded_batch
from tunelab.core.bert import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    StateDictMismatch,
    hf_to_tunelab,
    load_hf_state_dict,
    tunelab_to_hf_state_dict,
)

CONFIGS = [
    dict(),
    dict(num_attention_heads=2, num_hidden_layers=1, intermediate_size=64),
    dict(num_attention_heads=8, num_hidden_layers=3, intermediate_size=20, hidden_act="gelu_new", num_labels=3),
    dict(hidden_size=24, num_attention_heads=3, intermediate_size=96, hidden_act="relu", type_vocab_size=1),
]


LENGTHS = (11, 7, 3, 11)


def pair(cls, attn_impl="fused", **overrides):
    """Our model and Hugging Face's with the same random weights."""
    hf, ours = hf_and_ours(cls, attn_impl=attn_impl, **overrides)
    return ours, hf


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("overrides", CONFIGS)
@pytest.mark.parametrize("attn_impl", ["fused", "explicit"])
def test_hidden_states_and_pooled_output_match_hugging_face(overrides, attn_impl):
    ours, hf = pair(BertModel, attn_impl, **overrides)
    ids, mask = padded_batch(LENGTHS)
    with torch.no_grad():
        out = ours(ids, mask, output_hidden_states=True)
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == ours.config.num_hidden_layers + 1
    for layer, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        real = mask.bool()  # padded positions too, but compare the real ones by name first
        assert max_diff(a[real], b[real]) <= 1e-5, f"layer {layer}"
        assert max_diff(a, b) <= 1e-5, f"layer {layer} (padding positions)"
    assert max_diff(out.pooler_output, ref.pooler_output) <= 1e-5


@pytest.mark.parametrize("overrides", CONFIGS)
def test_classification_logits_match_hugging_face(overrides):
    ours, hf = pair(BertForSequenceClassification, **overrides)
    ids, mask = padded_batch(LENGTHS)
    with torch.no_grad():
        logits = ours(ids, mask)
        ref = hf(input_ids=ids, attention_mask=mask).logits
    assert logits.shape == (4, ours.config.num_labels)
    assert max_diff(logits, ref) <= 1e-5


def test_token_type_ids_are_used_like_hugging_face():
    ours, hf = pair(BertForSequenceClassification)
    ids, mask = padded_batch(LENGTHS)
    types = (torch.arange(ids.shape[1]) >= 4).long().expand_as(ids)
    with torch.no_grad():
        a, b = ours(ids, mask, types), hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        assert max_diff(a, b) <= 1e-5
        assert max_diff(a, ours(ids, mask)) > 1e-4  # the segment embedding changed something


def test_masked_lm_logits_match_and_the_decoder_is_tied():
    ours, hf = pair(BertForMaskedLM)
    ids, mask = padded_batch(LENGTHS)
    with torch.no_grad():
        assert max_diff(ours(ids, mask), hf(input_ids=ids, attention_mask=mask).logits) <= 1e-5
        ours.bert.embeddings.word_embeddings.weight[5] += 1.0  # moving an input row moves its output row
    assert ours.decoder_weight.data_ptr() == ours.bert.embeddings.word_embeddings.weight.data_ptr()


def test_init_decoder_bias_makes_an_untrained_masked_lm_predict_piece_frequencies():
    config = BertConfig.tiny()
    model = BertForMaskedLM(config).eval()
    ranks = torch.randperm(config.vocab_size) + 1.0
    counts = (10_000 / ranks**1.5).long()  # Zipf-like: a few frequent pieces, many rare ones
    frequencies = (counts + 1) / (counts + 1).sum()
    unigram = float(-(frequencies * frequencies.log()).sum())
    ids = torch.randint(config.vocab_size, (4, 16))

    def expected_loss():  # the cross-entropy of a blank whose piece is drawn from the frequencies
        with torch.no_grad():
            return float(-(frequencies * model(ids).log_softmax(-1)).sum(-1).mean())

    before, embeddings = expected_loss(), model.decoder_weight.clone()
    model.init_decoder_bias(counts)
    assert torch.equal(model.decoder_weight, embeddings)  # only the bias moved
    assert before > unigram + 1.0  # 4.6 (~ln V) against a unigram entropy of 2.5
    assert expected_loss() < unigram + 0.05  # the untrained model already sits on the unigram line
    with pytest.raises(ValueError, match="token_counts must have shape"):
        model.init_decoder_bias(counts[:-1])


@pytest.mark.parametrize("cls", [BertForSequenceClassification, BertForMaskedLM])
def test_one_training_step_gives_hugging_faces_loss_gradients_and_weights(cls):
    ours, hf = pair(cls)
    ours.train(), hf.train()  # dropout is 0 in the tiny config: train mode is deterministic
    ids, mask = padded_batch(LENGTHS)
    if cls is BertForSequenceClassification:
        labels = torch.tensor([0, 1, 1, 0])
    else:
        labels = ids.masked_fill(torch.rand(ids.shape) > 0.3, -100).masked_fill(mask == 0, -100)
        labels[0, 1] = ids[0, 1]
    logits = ours(ids, mask)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
    assert abs(loss.item() - ref.loss.item()) <= 1e-5
    loss.backward(), ref.loss.backward()
    ours_params = dict(ours.named_parameters())
    compared = 0
    for hf_name, p in hf.named_parameters():
        name = hf_to_tunelab(ours, hf_name)
        if name is None:  # the tied MLM decoder: its gradient is folded into the word embeddings
            continue
        assert max_diff(ours_params[name].grad, p.grad) <= 1e-5, hf_name
        compared += 1
    assert compared == len(ours_params)
    for model in (ours, hf):
        torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    hf_after = tunelab_to_hf_state_dict(ours)
    for hf_name, p in hf.state_dict().items():
        if hf_name in hf_after:
            assert max_diff(hf_after[hf_name], p) <= 1e-5, hf_name


def test_a_state_dict_with_a_stray_key_a_missing_key_or_a_wrong_shape_is_refused_by_name():
    ours, hf = pair(BertModel)
    state = dict(hf.state_dict())
    state["encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(3)
    del state["encoder.layer.1.output.dense.bias"]
    state["pooler.dense.weight"] = torch.zeros(5, 5)
    with pytest.raises(StateDictMismatch) as error:
        load_hf_state_dict(BertModel(ours.config), state)
    message = str(error.value)
    assert "encoder.layer.0.attention.self.rotary.weight" in message
    assert "layers.1.ff.linear2.bias" in message
    assert "pooler.dense.weight: file (5, 5) vs model (32, 32)" in message


def test_a_checkpoint_with_more_layers_than_the_model_is_refused():
    _, hf = pair(BertModel, num_hidden_layers=3)
    with pytest.raises(StateDictMismatch, match="encoder.layer.2"):
        load_hf_state_dict(BertModel(BertConfig.tiny(num_hidden_layers=2)), hf.state_dict())


def test_a_bare_encoder_loads_into_a_classifier_whose_head_is_allowed_to_be_new():
    ours, hf = pair(BertModel)
    clf = BertForSequenceClassification(ours.config)
    with pytest.raises(StateDictMismatch, match="classifier.weight"):
        load_hf_state_dict(clf, hf.state_dict())
    assert load_hf_state_dict(clf, hf.state_dict(), allow_missing=("classifier.",)) == \
        ["classifier.weight", "classifier.bias"]
    torch.testing.assert_close(clf.bert.layers[0].attn.q_proj.weight, ours.layers[0].attn.q_proj.weight)


def test_bad_inputs_name_the_problem():
    model = BertModel(BertConfig.tiny())
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        model(torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        model(torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 99\)"):
        model(torch.full((1, 4), 99))
    with pytest.raises(ValueError, match="does not match"):
        model(torch.ones(2, 4, dtype=torch.long), torch.ones(2, 5))


def test_config_round_trips_through_hugging_face_and_refuses_other_models():
    config = BertConfig.tiny(hidden_act="gelu_new", num_labels=3)
    hf = transformers.BertConfig(**config.to_hf_dict("BertForSequenceClassification"))
    assert BertConfig.from_hf_dict(hf.to_dict()) == config
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        BertConfig.from_hf_dict({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="divisible"):
        BertConfig.tiny(hidden_size=30)
    with pytest.raises(ValueError, match="unsupported hidden_act 'swish'"):
        BertConfig.tiny(hidden_act="swish")
