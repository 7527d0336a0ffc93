"""The size report: parameters, bytes, bits per parameter and non-zeros of any model."""

import torch
from torch import nn

from tunelab.core.bert import BertConfig, BertForMaskedLM
from tunelab.quant.report import size_report


def test_float_model_is_32_bits_per_parameter():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    report = size_report(model)
    assert report.params == 10 * 20 + 20 + 20 * 3 + 3
    assert report.bytes == 4 * report.params
    assert report.bits_per_param == 32.0 and report.ratio == 1.0
    assert "total" in report.table()


def test_tied_weights_count_once():
    model = BertForMaskedLM(BertConfig.tiny())
    assert size_report(model).params == sum(p.numel() for p in model.parameters())  # parameters() dedups too


def test_half_precision_and_zeros():
    model = nn.Linear(8, 4, bias=False).half()
    with torch.no_grad():
        model.weight[:2] = 0
    report = size_report(model)
    assert report.bits_per_param == 16.0
    assert report.nonzeros == 16 and report.sparsity == 0.5


def test_compressed_modules_report_themselves():
    class Packed(nn.Module):
        def size_info(self):
            return {"params": 100, "bytes": 50, "nonzeros": 90}

    model = nn.Sequential(Packed(), nn.Linear(5, 5, bias=False))
    report = size_report(model)
    assert report.params == 125 and report.bytes == 50 + 100 and report.nonzeros == 90 + 25
    assert set(report.by_kind()) == {"Packed", "Linear"}


def test_sparse_bytes_count_a_bitmask_and_the_non_zeros():
    model = nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        model.weight[:, 16:] = 0  # 75% zeros
    report = size_report(model)
    assert report.bytes == 64 * 16 * 4
    assert report.sparse_bytes == 64 * 16 // 8 + 256 * 4  # 1 bit per weight + 256 float32 values
    dense = size_report(nn.Linear(64, 16, bias=False))
    assert dense.sparse_bytes == dense.bytes  # no zeros: the dense layout is the smaller one


def test_training_memory_on_the_meta_device_equals_the_real_models():
    """Shapes alone give the same accounting: a 7B-shaped model can be sized without its weights. (The meta
    device runs attention by its math path, which keeps the attention probabilities; so does the CPU here.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tunelab.core.decoder import Llama, LlamaConfig
    from tunelab.core.evaluation import causal_lm_loss
    from tunelab.peft.lora import LoRAConfig, apply_lora
    from tunelab.quant.report import training_memory

    figures = []
    for device in ("cpu", "meta"):
        torch.manual_seed(0)
        with torch.device(device):
            model = Llama(LlamaConfig.tiny())
        apply_lora(model, LoRAConfig(r=4, targets="all-linear", modules_to_save=()))
        ids = torch.zeros(2, 16, dtype=torch.long, device=device)
        with sdpa_kernel(SDPBackend.MATH):
            figures.append(training_memory(model, lambda: causal_lm_loss(model(ids), ids)))
    real, meta = figures
    assert real == meta and real.activations > 0 and real.frozen > 0
