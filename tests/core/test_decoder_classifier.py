"""A classification head on our decoders against transformers' GPT2/LlamaForSequenceClassification."""

import pytest
import torch
import transformers

from tests.core.decoder_pairs import padded
from tunelab.core.decoder import (
    GPTConfig,
    GPTForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    load_hf_state_dict,
)
from tunelab.core.hub import load_pretrained, save_pretrained

HF = {"gpt": (GPTConfig, GPTForSequenceClassification, transformers.GPT2Config,
              transformers.GPT2ForSequenceClassification, "GPT2ForSequenceClassification"),
      "llama": (LlamaConfig, LlamaForSequenceClassification, transformers.LlamaConfig,
                transformers.LlamaForSequenceClassification, "LlamaForSequenceClassification")}


def classifier_pair(family, num_labels=3, seed=0):
    config_class, ours_class, hf_config_class, hf_class, architecture = HF[family]
    config = config_class.tiny(pad_token_id=0)
    torch.manual_seed(seed)
    hf = hf_class(hf_config_class(**config.to_hf_dict(architecture), num_labels=num_labels)).eval()
    ours = ours_class(config, num_labels)
    load_hf_state_dict(ours, hf.state_dict())
    return hf, ours.eval()


@pytest.mark.parametrize("family", HF)
@pytest.mark.parametrize("left", [False, True])
def test_logits_read_the_last_real_token_as_hugging_face(family, left):
    hf, ours = classifier_pair(family)
    ids, mask = padded([7, 3, 5], ours.config.vocab_size, left=left)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        logits = ours(ids, mask)
    assert logits.shape == (3, 3)
    assert (logits - expected).abs().max() <= 1e-5
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # a left-padded row's positions skip its padding
    with torch.no_grad():
        logits = ours(ids, mask, positions)
    for row, n in enumerate([7, 3, 5]):  # a padded row is classified as it is alone
        alone = ours(ids[row:row + 1, -n:] if left else ids[row:row + 1, :n])
        assert (alone[0] - logits[row]).abs().max() <= 1e-5


@pytest.mark.parametrize("family", HF)
def test_one_training_step_gives_hugging_faces_loss_and_gradients(family):
    hf, ours = classifier_pair(family, num_labels=2, seed=1)
    ids, mask = padded([6, 4], ours.config.vocab_size)
    labels = torch.tensor([1, 0])
    hf_loss = hf(ids, attention_mask=mask, labels=labels).loss
    loss = torch.nn.functional.cross_entropy(ours(ids, mask), labels)
    assert abs(loss.item() - hf_loss.item()) <= 1e-5
    hf_loss.backward()
    loss.backward()
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        grad = theirs[name].grad
        if ".c_" in name and family == "gpt" and p.dim() == 2:  # Conv1D stores (in, out)
            grad = grad.t()
        assert (p.grad - grad).abs().max() <= 1e-5, name


def test_mean_pooling_averages_the_real_tokens_only():
    _, ours = classifier_pair("llama")
    mean = LlamaForSequenceClassification(ours.config, 3, pooling="mean").eval()
    mean.load_state_dict(ours.state_dict())
    ids, mask = padded([6, 2], ours.config.vocab_size)
    with torch.no_grad():
        h, _ = mean.forward_hidden(ids, mask)
        expected = torch.stack([mean.score(h[0, :6].mean(0)), mean.score(h[1, :2].mean(0))])
        assert (mean(ids, mask) - expected).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        LlamaForSequenceClassification(ours.config, 2, pooling="max")


@pytest.mark.parametrize("family", HF)
def test_a_causal_lm_folder_loads_as_a_classifier_and_a_saved_classifier_loads_in_hugging_face(family, tmp_path):
    from tests.core.decoder_pairs import gpt_pair, llama_pair

    _, lm = (gpt_pair if family == "gpt" else llama_pair)(seed=4, pad_token_id=0)
    save_pretrained(lm, tmp_path / "lm")
    classifier, _ = load_pretrained(tmp_path / "lm", task="classification", num_labels=2)
    assert isinstance(classifier, HF[family][1]) and classifier.num_labels == 2
    lm_state = lm.state_dict()
    for name, tensor in classifier.state_dict().items():  # the decoder is the LM's; only `score` is new
        assert name == "score.weight" or torch.equal(tensor, lm_state[name]), name
    torch.nn.init.normal_(classifier.score.weight, std=1.0)
    save_pretrained(classifier, tmp_path / "classifier")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "classifier").eval()
    again, _ = load_pretrained(tmp_path / "classifier", task="classification")
    ids, mask = padded([5, 3], lm.config.vocab_size)
    with torch.no_grad():
        logits = classifier(ids, mask)
        assert (hf(ids, attention_mask=mask).logits - logits).abs().max() <= 1e-5
        assert torch.equal(again(ids, mask), logits)
