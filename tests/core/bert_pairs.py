"""What the BERT parity tests share (tests/core, tests/peft): a tiny random Hugging Face BERT and ours with the
same weights, and a padded batch of ids."""

import torch
import transformers

from tunelab.core.bert import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel, load_hf_state_dict

HF_CLASSES = {BertModel: transformers.BertModel,
              BertForSequenceClassification: transformers.BertForSequenceClassification,
              BertForMaskedLM: transformers.BertForMaskedLM}


def hf_and_ours(cls=BertForSequenceClassification, **overrides):
    """A tiny random Hugging Face BERT and ours with the same weights (HF initialises, we load every weight)."""
    config = BertConfig.tiny(**overrides)
    hf = HF_CLASSES[cls](transformers.BertConfig(**config.to_hf_dict())).eval()
    ours = cls(config).eval()
    assert load_hf_state_dict(ours, hf.state_dict()) == []  # every weight filled, none left at init
    return hf, ours


def padded_batch(lengths=(9, 6, 3), vocab_size=99):
    """(B, T) random ids right-padded with 0, and the (B, T) mask."""
    T = max(lengths)
    ids = torch.randint(1, vocab_size, (len(lengths), T))
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask
