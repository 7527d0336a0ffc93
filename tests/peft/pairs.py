"""What the PEFT parity tests share: our tiny BERT and Hugging Face's with the same weights, a padded batch,
and the plain base model inside a peft model."""

import torch
import transformers

from tunelab.core.bert import BertConfig, BertForSequenceClassification, BertModel, load_hf_state_dict

HF_CLASSES = {BertForSequenceClassification: transformers.BertForSequenceClassification,
              BertModel: transformers.BertModel}


def hf_and_ours(cls=BertForSequenceClassification, **overrides):
    """A tiny random Hugging Face BERT and ours with the same weights (HF initialises, we load)."""
    config = BertConfig.tiny(**overrides)
    hf = HF_CLASSES[cls](transformers.BertConfig(**config.to_hf_dict())).eval()
    ours = cls(config).eval()
    assert load_hf_state_dict(ours, hf.state_dict()) == []
    return hf, ours


def padded_batch(lengths=(9, 6, 3), vocab_size=99):
    """(B, T) random ids right-padded with 0, and the (B, T) mask."""
    T = max(lengths)
    ids = torch.randint(1, vocab_size, (len(lengths), T))
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def plain_hf(pm):
    """A fresh Hugging Face model holding the base weights that peft model `pm` wraps (its original head)."""
    base = pm.get_base_model()
    state = {k.replace(".original_module.", ".").replace(".base_layer.", "."): v
             for k, v in base.state_dict().items()
             if ".modules_to_save." not in k and ".ia3_l." not in k and ".lora_" not in k}
    hf = type(base)(base.config).eval()
    hf.load_state_dict(state)
    return hf


def plain_ours(pm):
    """Our tiny classifier with the base weights that peft model `pm` wraps."""
    ours = BertForSequenceClassification(BertConfig.tiny()).eval()
    assert load_hf_state_dict(ours, plain_hf(pm).state_dict()) == []
    return ours


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}
