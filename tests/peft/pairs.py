"""What the PEFT parity tests share besides tests/core/bert_pairs.py: the plain base model inside a peft model,
and the names of what trains."""

from tunelab.core.bert import BertConfig, BertForSequenceClassification, load_hf_state_dict


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
